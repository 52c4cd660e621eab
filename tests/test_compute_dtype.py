"""``runtime.compute_dtype``: calibration forwards in bfloat16 on a float32 model, whose own weights stay
float32 (scored, pruned, checkpointed and exported as such)."""

from __future__ import annotations

import pytest
import torch
from helpers import fail_once
from structlog.testing import capture_logs
from torch import nn

from podar import Pipeline, PruningStage, RuntimeConfig, SparsityPatternConfig
from podar.engine.compute import cast_floating, cast_module, compute_blocks, resolve_compute_dtype


def test_cast_module_gives_back_the_very_same_tensors():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in lin.named_parameters()}
    with cast_module(lin, torch.bfloat16):
        for n, p in lin.named_parameters():
            assert p.dtype == torch.bfloat16, n
            assert torch.equal(p.detach(), before[n][1].to(torch.bfloat16)), n
        y = lin(torch.randn(2, 16, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16
    for n, p in lin.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0], n
        assert torch.equal(p.detach(), before[n][1]), n


def test_cast_module_restores_on_error():
    lin = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), cast_module(lin, torch.bfloat16):
        raise RuntimeError("boom")
    assert lin.weight.dtype == torch.float32


def test_block_view_casts_one_block_at_a_time():
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    with compute_blocks(layers, torch.bfloat16) as view:
        assert len(view) == 3
        view[0]
        assert [m.weight.dtype for m in layers] == [torch.bfloat16, torch.float32, torch.float32]
        view[2]
        assert [m.weight.dtype for m in layers] == [torch.float32, torch.float32, torch.bfloat16]
    assert all(m.weight.dtype == torch.float32 for m in layers)
    with compute_blocks(layers, None) as view:  # the model's own dtype: nothing cast
        assert view[1] is layers[1] and layers[1].weight.dtype == torch.float32


def test_cast_floating_reaches_into_containers_and_spares_integers():
    cos, ids = torch.randn(2, 3), torch.arange(3)
    out = cast_floating({"position_embeddings": (cos, cos), "position_ids": ids, "flag": True}, torch.bfloat16)
    assert [t.dtype for t in out["position_embeddings"]] == [torch.bfloat16] * 2
    assert out["position_ids"] is ids and out["flag"] is True
    assert cast_floating(cos, None) is cos


def test_compute_dtype_equal_to_the_model_dtype_casts_nothing():
    lin = nn.Linear(4, 4)
    assert resolve_compute_dtype("model", lin) is None
    assert resolve_compute_dtype("float32", lin) is None
    assert resolve_compute_dtype("bfloat16", lin) is torch.bfloat16


def _run_with_compute_dtype(cfg, run_dir, compute_dtype):
    """Run up to Fine-tuning; returns (pipeline, dtypes of every Linear's inputs in calibration and propagation).
    Checks on the way that every calibration statistic is a float32 sum."""
    cfg = cfg.with_runtime(RuntimeConfig(compute_dtype=compute_dtype))
    pipe = Pipeline(cfg, run_dir=run_dir, progress=False)
    seen: set[torch.dtype] = set()
    checked = 0

    def record(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.Linear):
            seen.add(args[0].dtype)

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        while pipe.stage is not PruningStage.FINE_TUNING:
            pipe.step()
            if pipe.stage is PruningStage.COMPUTING_IMPORTANCE:  # right after Calibrating
                for name, entry in pipe.context.state.stats.items():
                    for stat in (v for v in entry.parts().values() if isinstance(v, torch.Tensor)):
                        assert stat.dtype == torch.float32 and bool(torch.isfinite(stat).all()), name
                        checked += 1
    finally:
        handle.remove()
    assert checked > 0
    return pipe, seen


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("walk", ["block", "site"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_half_precision_forwards_keep_the_float32_weights(tiny_config, tmp_path, method, walk, compute_dtype):
    """Every calibration forward reads inputs in the compute dtype; the pruned weights stay float32: Wanda's kept
    weights equal the dense float32 ones bit for bit, SparseGPT's are solved in float32 (not bf16 values); 2:4 is
    exact in every group, statistics are float32 sums, and the run completes with its export verified."""
    cfg = tiny_config.with_method(method).with_pattern(SparsityPatternConfig.nm_2_4()).with_calibration(
        tiny_config.calibration.model_copy(update={"walk": walk}))
    pipe, seen = _run_with_compute_dtype(cfg, tmp_path / "run", compute_dtype)
    assert seen == {getattr(torch, compute_dtype)}
    ctx = pipe.context
    for name, module in ctx.state.targets.items():
        w = module.weight.detach()
        assert w.dtype == torch.float32, name
        kept = (w.reshape(w.shape[0], -1, 4) != 0).sum(dim=-1)
        assert bool((kept <= 2).all()), name
        dense = ctx.state.dense_weights[name]
        if method == "wanda":
            mask = ctx.state.masks[name]
            assert torch.equal(w[mask], dense[mask]), name
        else:
            assert bool((w.to(torch.bfloat16).float() != w).any()), f"{name}: solved weights are bf16 values"
    assert pipe.run().ok


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_statistics_track_float32_ones(tiny_config, tmp_path, method):
    """The bf16 forwards give nearly the float32 masks (same samples): a cast that lost the weights or misaligned
    the inputs would not."""
    cfg = tiny_config.with_method(method)
    runs = {d: _run_with_compute_dtype(cfg, tmp_path / d, d)[0].context for d in ("model", "bfloat16")}
    agree = [float((runs["model"].state.masks[n] == runs["bfloat16"].state.masks[n]).float().mean())
             for n in runs["model"].state.masks]
    assert min(agree) > 0.9, agree


def test_one_pass_calibration_in_bfloat16(tiny_config, tmp_path):
    """The one-pass walk casts the whole model for its pass, then restores it."""
    cfg = tiny_config.with_method("wanda").with_calibration(tiny_config.calibration.model_copy(
        update={"walk": "one_pass"}))
    pipe, seen = _run_with_compute_dtype(cfg, tmp_path / "run", "bfloat16")
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in pipe.context.model.parameters())
    assert pipe.run().ok


@pytest.mark.parametrize(("method", "level"), [("wanda", "info"), ("sparsegpt", "warning")])
def test_compute_dtype_is_logged_and_sparsegpt_warned(tiny_config, tmp_path, method, level):
    cfg = tiny_config.with_method(method)
    with capture_logs() as logs:
        _run_with_compute_dtype(cfg, tmp_path / "run", "bfloat16")
    entries = [e for e in logs if e["event"] == "calibration_compute_dtype"]
    assert len(entries) == 1 and entries[0]["log_level"] == level
    assert entries[0]["dtype"] == "bfloat16" and entries[0]["model_dtype"] == "float32"


@pytest.mark.parametrize(("method", "changes", "expected"), [
    ("wanda", {}, "native_bfloat16"), ("ria", {}, "native_bfloat16"), ("sparsegpt", {}, "model"),
    ("magnitude", {}, "model"), ("wanda", {"reconstruction.enabled": True}, "model"),
    ("wanda", {"dsnot.enabled": True}, "model"), ("wanda", {"runtime.compute_dtype": "model"}, "model"),
    ("sparsegpt", {"runtime.compute_dtype": "bfloat16"}, "bfloat16")])
def test_auto_takes_bf16_only_for_the_methods_measured_to_keep_their_quality(method, changes, expected):
    from podar import PruningConfig

    cfg = PruningConfig(method=method).with_overrides(changes)
    assert PruningConfig().runtime.compute_dtype == "auto"
    assert cfg.compute_dtype_request() == expected


def test_native_bf16_is_bf16_on_a_float32_model_where_the_device_has_it(monkeypatch):
    from podar.engine import compute

    lin = nn.Linear(4, 4)
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    assert resolve_compute_dtype("native_bfloat16", lin) is torch.bfloat16
    assert resolve_compute_dtype("native_bfloat16", lin.to(torch.float16)) is None  # not float32: its own
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)
    assert resolve_compute_dtype("native_bfloat16", nn.Linear(4, 4)) is None
    assert resolve_compute_dtype("auto", nn.Linear(4, 4)) is None  # unresolved: the model's own


def test_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    from podar.engine.compute import _cpu_flags, native_bf16

    real_open = builtins.open
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16 fpu", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, info=info, **k: real_open(
            info if p == "/proc/cpuinfo" else p, *a, **k))
        _cpu_flags.cache_clear()  # read once per process: this file now
        assert native_bf16(torch.device("cpu")) is expected
    _cpu_flags.cache_clear()
    monkeypatch.setattr(builtins, "open", real_open)
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("native", [True, False])
def test_wanda_by_default_calibrates_in_bf16_where_native_and_records_it(tiny_config, tmp_path, monkeypatch, native):
    from podar import RunStore
    from podar.engine import compute

    monkeypatch.setattr(compute, "native_bf16", lambda device: native)
    cfg = tiny_config.with_method("wanda").with_overrides({"runtime.compute_dtype": "auto"})
    seen: set[torch.dtype] = set()
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: seen.add(a[0].dtype) if isinstance(m, nn.Linear) else None)
    try:
        pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
        while pipe.stage is not PruningStage.FINE_TUNING:
            pipe.step()
    finally:
        handle.remove()
    assert (torch.bfloat16 in seen) is native
    assert RunStore(tmp_path / "run").read_manifest().compute_dtype == ("bfloat16" if native else "model")
    assert pipe.run().ok


def test_a_resume_where_auto_resolves_otherwise_is_refused_while_calibration_is_left(tiny_config, tmp_path,
                                                                                      monkeypatch):
    from podar import CheckpointError
    from podar.engine import compute

    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    cfg = tiny_config.with_method("wanda").with_overrides({"runtime.compute_dtype": "auto",
                                                            "calibration.walk": "site"})
    fail_once(monkeypatch, PruningStage.PRUNING, 2)  # the run fails after its first layer group
    assert not Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run().ok
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)  # another machine
    with pytest.raises(CheckpointError, match="ran in bfloat16, and runtime.compute_dtype resolves to model"):
        Pipeline.resume(tmp_path / "run", progress=False).run()
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
