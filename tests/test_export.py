"""Export formats: round trips on odd shapes, W8A16 / W4A16 against a float64 reference, a tiny model end to
end in every format, refusal of damaged files, sharding. What other tools make of each format:
tests/test_interop.py."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from podar import (
    CheckpointError,
    ConfigError,
    ExportConfig,
    Pipeline,
    PruningConfig,
    SparsityPatternConfig,
    load_pretrained,
)
from podar.stages.export_io import roundtrip_weight
from podar.stages.quantize import WeightQuant, dequantize, fake_quantize, quantize, weight_scale
from podar.stages.sparse_formats import (
    bitmask_compress,
    bitmask_decompress,
    sparse24_compress,
    sparse24_decompress,
)


def sparse_matrix(rows, cols, density=0.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) > density] = 0
    w[0] = 0  # an all-zero row
    w[-1] = torch.randn(cols, generator=g).abs() + 0.1  # a fully dense row
    return w.to(dtype)


def two_four(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(rows * cols // 4)]).view(rows, cols // 4, 2)
    keep.scatter_(2, idx, True)
    w = w * keep.view(rows, cols)
    w[0] = 0  # an all-zero row: its groups keep zeros
    w[1, 0:4] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a group with a single non-zero
    return w.to(dtype)


@pytest.mark.parametrize("shape", [(7, 13), (5, 8), (3, 1), (9, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_round_trip_odd_shapes(shape, dtype):
    w = sparse_matrix(*shape, dtype=dtype)
    c = bitmask_compress(w)
    assert c["bitmask"].shape == (shape[0], (shape[1] + 7) // 8) and c["bitmask"].dtype == torch.uint8
    assert c["compressed"].numel() == int((w != 0).sum()) and c["compressed"].dtype == dtype
    assert c["row_offsets"][0] == 0 and c["shape"].tolist() == list(shape)
    out = bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"])
    assert out.dtype == dtype and torch.equal(out, w)


@pytest.mark.parametrize("shape", [(6, 12), (3, 20), (5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse24_round_trip(shape, dtype):
    w = two_four(*shape, dtype=dtype)
    c = sparse24_compress(w)
    assert c["compressed"].shape == (shape[0], shape[1] // 2) and c["shape"].shape == (2, 1)
    assert torch.equal(sparse24_decompress(c["shape"], c["compressed"], c["bitmask"]), w)


def test_sparse24_refuses_non_24():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24_compress(w)
    with pytest.raises(ValueError, match="divisible by 4"):
        sparse24_compress(torch.zeros(2, 6))


def reference_fake_quantize(w, bits, group):
    """Symmetric integer quantize-dequantize in float64 with plain loops over rows and groups; also the elements
    whose w / scale lies within 1e-5 of a rounding tie (x.5: float32 and float64 may round them apart)."""
    w = w.double()
    out = torch.zeros_like(w)
    ties = torch.zeros_like(w, dtype=torch.bool)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    g = group or w.shape[1]
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            part = w[r, c0:c0 + g]
            amax = float(part.abs().max())
            scale = amax / ((2 ** bits - 1) / 2) if amax > 0 else 1.0
            scale = float(torch.tensor(scale, dtype=torch.float32))  # stored in float32
            x = part / scale
            out[r, c0:c0 + g] = torch.clamp(torch.round(x), qmin, qmax) * scale
            ties[r, c0:c0 + g] = ((x.abs() % 1) - 0.5).abs() < 1e-5
    return out, ties


@pytest.mark.parametrize("shape", [(7, 64), (4, 128)])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_weight_quantization_matches_reference(shape, bits, group):
    w = sparse_matrix(*shape)
    spec = WeightQuant(bits, group)
    scale = weight_scale(w, spec, torch.float32)
    q = quantize(w, scale, spec)
    assert q.dtype == torch.int8 and scale.shape == (shape[0], shape[1] // (group or shape[1]))
    assert int(q.max()) <= spec.qmax and int(q.min()) >= spec.qmin
    assert (q[w == 0] == 0).all() and scale[0].eq(1.0).all()  # zeros stay zeros; the all-zero row has scale 1
    back = dequantize(q, scale, spec)
    ref, ties = reference_fake_quantize(w, bits, group)
    assert ties.sum() <= scale.numel()  # the extreme of each group lies on one (max |w| / scale = 2^bits / 2 - 0.5)
    torch.testing.assert_close(back.double()[~ties], ref[~ties], rtol=0, atol=1e-6)
    step = scale.repeat_interleave(group or shape[1], dim=1).double()
    assert ((back.double() - ref).abs()[ties] <= step[ties] * 1.0001).all()  # a tie rounds either way
    assert torch.equal(fake_quantize(w, spec, torch.float32), back)
    # combined with sparse compression: the int8 values survive the bitmask round trip exactly
    c = bitmask_compress(q)
    assert torch.equal(bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"]), q)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not divisible by the group size 128"):
        weight_scale(torch.ones(2, 64), WeightQuant(4, 128), torch.float32)


def test_compressed_tensors_packs_podar_integers():
    """compressed-tensors' packer, handed podar's scales, stores exactly podar's integers (its own decompressor
    gives podar's quantize-dequantize bit for bit)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    from podar.stages.export_io import _scheme

    w = sparse_matrix(8, 128)
    for spec in (WeightQuant(8), WeightQuant(4, 32)):
        for dtype in (torch.float32, torch.bfloat16):
            scale = weight_scale(w, spec, dtype)
            packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, _scheme(spec, ["x"]))
            assert packed["weight_packed"].dtype == torch.int32
            assert packed["weight_packed"].numel() * 4 == w.numel() * spec.bits // 8
            back = PackedQuantizationCompressor.decompress(packed, _scheme(spec, ["x"]))["weight"]
            assert torch.equal(back, fake_quantize(w, spec, dtype)), (spec, dtype)


def test_corrupt_bitmask_data_refused():
    w = sparse_matrix(4, 10)
    c = bitmask_compress(w)
    with pytest.raises(ValueError, match="values for"):
        bitmask_decompress(c["shape"], c["compressed"][:-1], c["bitmask"], c["row_offsets"])
    with pytest.raises(ValueError, match="row_offsets"):
        bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"] + 1)


CASES = [("dense", "none", "unstructured"), ("dense", "w8a16", "unstructured"), ("dense", "w4a16", "2:4"),
         ("sparse-bitmask", "none", "unstructured"), ("sparse-bitmask", "w8a16", "unstructured"),
         ("sparse-24-bitmask", "none", "2:4"), ("sparse-24-bitmask", "w8a16", "2:4"),
         ("sparse-bitmask", "none", "2:4")]


def _expected_bytes(w, fmt, quant, dtype):
    """Bytes of one pruned layer's tensors as written."""
    rows, cols = w.shape
    dsize = torch.tensor([], dtype=dtype).element_size()
    if quant is not None and fmt == "dense":  # weight_packed (int32), weight_scale (R, G), weight_shape (2,) int64
        return rows * cols * quant.bits // 8 + rows * (cols // quant.group(cols)) * dsize + 2 * 8
    values = 1 if quant is not None else dsize
    scales = rows * dsize if quant is not None else 0
    if fmt == "dense":
        return rows * cols * values + scales
    if fmt == "sparse-bitmask":
        nnz = int((roundtrip_weight(w, quant, dtype) != 0).sum())
        return nnz * values + rows * ((cols + 7) // 8) + rows * 8 + 2 * 8 + scales
    return rows * cols // 2 * values + rows * ((cols + 7) // 8) + 2 * 8 + scales


@pytest.mark.parametrize("fmt,quant,pattern", CASES)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tiny_model_end_to_end_every_format(tiny_config, tmp_path, fmt, quant, pattern, dtype):
    cfg = tiny_config.with_pattern(SparsityPatternConfig.nm_2_4()) if pattern == "2:4" else tiny_config
    cfg = cfg.with_export(ExportConfig(format=fmt, quantization=quant, dtype=dtype, group_size=32))
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    result = p.run()
    assert result.ok, result.failure
    ex = result.metrics["exporting"]
    assert ex["format"] == fmt and ex["tensors_checked"] > 0
    model = p.context.model
    reloaded = load_pretrained(tmp_path / "r" / "export", dtype=torch.float32)
    targets = set(p.context.state.targets)
    torch_dtype = getattr(torch, dtype)
    spec = WeightQuant.named(quant, 32)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        want = roundtrip_weight(tensor, spec, torch_dtype) if module in targets else tensor.to(torch_dtype)
        assert torch.equal(reloaded.state_dict()[name], want.float()), name
    meta = json.loads((tmp_path / "r" / "export" / "podar_export.json").read_text())
    assert meta["format"] == fmt and meta["quantization"] == quant
    config = json.loads((tmp_path / "r" / "export" / "config.json").read_text())
    if fmt != "dense":  # a model type no other tool knows
        assert config["model_type"] == f"podar-{fmt}" and config["podar_original"]["model_type"] == "llama"
        assert "quantization_config" not in config
    elif spec is not None:
        qc = config["quantization_config"]
        assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["format"] == "pack-quantized"
        assert qc["version"] and qc["config_groups"]["group_0"]["weights"]["num_bits"] == spec.bits
        assert set(qc["config_groups"]["group_0"]["targets"]) == targets and qc["ignore"] == ["lm_head"]
    expected = sum(_expected_bytes(model.get_submodule(n).weight, fmt, spec, torch_dtype) for n in targets)
    assert ex["pruned_layers_bytes"] == expected


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_sparse_formats_keep_the_biases_of_pruned_layers(corpus, tmp_path, fmt):
    """Qwen2's q/k/v carry biases: a compressed layer's weight is stored in pieces under its name, its bias as is;
    the reload keeps both (it once dropped every tensor under a compressed layer's name, the bias among them)."""
    from helpers import make_tiny_config

    cfg = make_tiny_config(corpus, arch="qwen2")
    if fmt == "sparse-24-bitmask":
        cfg = cfg.with_pattern(SparsityPatternConfig.nm_2_4())
    p = Pipeline(cfg.with_export(ExportConfig(format=fmt)), run_dir=tmp_path / "r", progress=False)
    assert p.run().ok
    reloaded = load_pretrained(tmp_path / "r" / "export", dtype=torch.float32).state_dict()
    biases = {n: t for n, t in p.context.model.state_dict().items() if n.endswith("_proj.bias")}
    assert biases and all(torch.equal(reloaded[n], t) for n, t in biases.items())


def test_plain_transformers_loads_dense_export(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    assert Pipeline(tiny_config, run_dir=tmp_path / "r", progress=False).run().ok
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "r" / "export"))


def test_sparse24_export_needs_24_pattern():
    with pytest.raises(ValidationError, match="needs pattern 2:4"):
        PruningConfig(export=ExportConfig(format="sparse-24-bitmask"))


@pytest.fixture
def exported(tiny_config, tmp_path):
    cfg = tiny_config.with_export(ExportConfig(format="sparse-bitmask", dtype="float16", max_shard_size="40KB"))
    assert Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run().ok
    return tmp_path / "r" / "export"


def test_sharded_with_index(exported):
    shards = sorted(exported.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert any(k.endswith(".bitmask") for k in index["weight_map"])
    load_pretrained(exported)


def test_corrupted_file_refused_naming_it(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"'{shard}' does not match its sha256"):
        load_pretrained(exported)


def test_truncated_file_refused_naming_it(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(shard)):
        load_pretrained(exported)
    # without the sha256 check, safetensors itself refuses the truncated file, still naming it
    with pytest.raises(CheckpointError, match=f"'{shard}' is corrupt or truncated"):
        load_pretrained(exported, verify=False)


def test_missing_file_refused(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(exported)


def test_w4a16_needs_a_dense_format():
    with pytest.raises(ValidationError, match="holds w8a16 only"):
        ExportConfig(format="sparse-bitmask", quantization="w4a16")


def test_int8_is_the_old_name_of_w8a16():
    with pytest.warns(FutureWarning, match="now 'w8a16'"):
        assert ExportConfig(quantization="int8").quantization == "w8a16"


def test_group_size_that_does_not_divide_is_refused_before_any_work(tiny_config, tmp_path):
    cfg = tiny_config.with_export(ExportConfig(quantization="w4a16", group_size=48))
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide layer 'model.layers.0.self_attn.q_proj' "
                                          r"\(64 input columns\).*export.group_size: 64 divides them all"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()


def test_transformers_here_refuses_a_sparse_export(exported):
    """The sparse formats are podar's: this environment's transformers refuses them rather than loading the
    pruned Linears randomly initialised (tests/test_interop.py runs the same check in other pinned versions)."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="podar-sparse-bitmask"):
        AutoModelForCausalLM.from_pretrained(str(exported))


# ---------------------------------------------------------------- vLLM's compressed-tensors scheme rules
# vLLM does not install on this CPU machine; these are its rules for weight-only integer checkpoints, from
# vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py (``_is_wNa16_group_channel``,
# ``_get_scheme_from_parts`` → CompressedTensorsWNA16 when the format is pack-quantized and num_bits is in
# WNA16_SUPPORTED_BITS = [4, 8]; ``get_quant_method``: a Linear in ``ignore`` stays unquantized, any other must
# match a target or loading raises) and marlin's supported group sizes (-1 / channel, 32, 64, 128).


def vllm_scheme(qc: dict, linears: set[str]) -> dict[str, str]:
    """Layer name → the vLLM scheme it would get ("WNA16" or "unquantized"); ValueError where vLLM refuses."""
    assert qc["quant_method"] == "compressed-tensors"
    out = {}
    for layer in sorted(linears):
        if layer in qc["ignore"]:
            out[layer] = "unquantized"
            continue
        groups = [g for g in qc["config_groups"].values() if layer in g["targets"]]
        if not groups:
            raise ValueError(f"Unable to find matching target for {layer} in the compressed-tensors config")
        scheme = groups[0]
        w, fmt = scheme["weights"], scheme.get("format") or qc["format"]
        ok = (scheme.get("input_activations") is None and w["symmetric"] and not w["dynamic"]
              and w["strategy"] in ("channel", "group") and w["type"] == "int" and fmt == "pack-quantized"
              and w["num_bits"] in (4, 8) and (w["strategy"] == "channel" or w["group_size"] in (32, 64, 128)))
        if not ok:
            raise ValueError(f"No compressed-tensors compatible scheme was found for {layer}")
        out[layer] = "WNA16"
    return out


@pytest.mark.parametrize("quant", ["w8a16", "w4a16"])
def test_quantized_export_matches_vllm_wna16_rules(tiny_config, tmp_path, quant):
    cfg = tiny_config.with_export(ExportConfig(quantization=quant, group_size=32))
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    assert p.run().ok
    qc = json.loads((tmp_path / "r" / "export" / "config.json").read_text())["quantization_config"]
    linears = {n for n, m in p.context.model.named_modules() if isinstance(m, torch.nn.Linear)}
    schemes = vllm_scheme(qc, linears)
    assert {n for n, s in schemes.items() if s == "WNA16"} == set(p.context.state.targets)
    assert schemes["lm_head"] == "unquantized"
    # the rules refuse what vLLM refuses: a Linear named nowhere, an asymmetric scheme
    with pytest.raises(ValueError, match="matching target"):
        vllm_scheme({**qc, "ignore": []}, linears)
    bad = json.loads(json.dumps(qc))
    bad["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(ValueError, match="compatible scheme"):
        vllm_scheme(bad, linears)


# ---------------------------------------------------------------- GGUF (llama.cpp)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_gguf_export_reads_back_through_transformers(tiny_config, tmp_path, gguf_type):
    """The export stage reloads the GGUF with transformers' loader and compares every tensor bit for bit (the
    pruned layers as gguf's reference quantize-dequantize); here the file itself is read with gguf's reader."""
    import gguf

    cfg = tiny_config.with_export(ExportConfig(format="gguf", gguf_type=gguf_type))
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    result = p.run()
    assert result.ok, result.failure
    ex = result.metrics["exporting"]
    assert ex["tensors_checked"] == len(p.context.model.state_dict())  # lm_head too: tied to token_embd
    reader = gguf.GGUFReader(str(tmp_path / "r" / "export" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.1.ffn_down.weight"] == gguf_type.upper()
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types
    ratio = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}[gguf_type]  # bytes per 32 weights / 64 in f16
    assert ex["pruned_layers_ratio_vs_fp16"] == pytest.approx(ratio)
    # the tokenizer travels in the file: the same ids as the run's own
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "r" / "export"), gguf_file="model.gguf")
    text = "the model prunes weights ."
    assert tok(text).input_ids == p.context.tokenizer(text).input_ids


def test_gguf_refuses_other_architectures_before_any_work(corpus, tmp_path):
    from helpers import make_tiny_config

    cfg = make_tiny_config(corpus, arch="gpt2").with_export(ExportConfig(format="gguf"))
    with pytest.raises(ConfigError, match="writes Llama-architecture models; this one is 'gpt2'"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()


def test_gguf_blocks_need_whole_rows(corpus, tmp_path):
    from helpers import make_tiny_config

    cfg = make_tiny_config(corpus, hidden_size=48).with_export(ExportConfig(format="gguf", gguf_type="q4_0"))
    with pytest.raises(ConfigError, match="blocks of 32 weights; layer 'model.layers.0.self_attn.q_proj' has 48"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()


def test_gguf_quantizes_with_its_own_type():
    with pytest.raises(ValidationError, match="quantizes with export.gguf_type"):
        ExportConfig(format="gguf", quantization="w8a16")


def test_tensors_written_and_compared_a_part_at_a_time(tiny_config, tmp_path, monkeypatch):
    """The writer casts, and the check compares, a large tensor a few rows at a time (a 262k-token embedding is
    never cast or compared whole): the files are byte for byte those of the whole-tensor path, and a difference in
    the last part of a tensor is still found."""
    from podar.schemas.errors import StageError
    from podar.stages import export, export_io

    cfg = tiny_config.with_export(ExportConfig(format="dense", dtype="float16"))
    whole = Pipeline(cfg, run_dir=tmp_path / "whole", progress=False)
    assert whole.run().ok
    monkeypatch.setattr(export_io, "_COPY_BYTES", 96)
    monkeypatch.setattr(export, "_COMPARE_BYTES", 96)
    parts = Pipeline(cfg, run_dir=tmp_path / "parts", progress=False)
    assert parts.run().ok
    for name in ("model.safetensors", "config.json"):
        whole_bytes = (tmp_path / "whole" / "export" / name).read_bytes()
        assert whole_bytes == (tmp_path / "parts" / "export" / name).read_bytes()

    ctx = parts.context
    reloaded = load_pretrained(tmp_path / "parts" / "export")
    table = reloaded.get_input_embeddings().weight
    changed = table.data.clone()
    changed[-1, -1] += 1.0  # in the last part of the embedding
    table.data = changed
    expected = export._expected(cfg.export, torch.float16, {})
    with pytest.raises(StageError, match="'model.embed_tokens.weight' differs after reload"):
        export._compare_tensors(ctx, reloaded, expected, by_rows=True)
