"""Everything a run needs, loaded and checked before any work: model, tokenizer, targets, texts, the calibration
walk, the weights' fingerprint and the dense reference."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from podar._cost import estimate_cost
from podar.engine.context import DenseReference, RunContext, RunState
from podar.engine.data import (
    calibration_windows,
    check_tokenizer_fits,
    load_text,
    resolve_data_dir,
    text_sha256,
    tokenize_text,
)
from podar.engine.distributed import Dist
from podar.engine.logs import brief
from podar.engine.models import dtype_name, load_model, model_task, weights_fingerprint
from podar.engine.runtime import Runtime
from podar.engine.store import RunStore
from podar.engine.versions import library_versions
from podar.schemas.config import PruningConfig
from podar.schemas.errors import CheckpointError, ConfigError, DataError
from podar.schemas.records import ArtifactRecord
from podar.stages import structure
from podar.stages.blocks import find_blocks
from podar.stages.common import PackedMasks
from podar.stages.finetune import training_texts
from podar.stages.methods import PruningMethod, get_method
from podar.stages.permutation import PermutationSpace, permutable_layers
from podar.stages.refine import Refined
from podar.stages.targets import linearize_conv1d, resolve_targets, snapshot_weights
from podar.stages.tasks import resolve_tasks
from podar.stages.walks import plan_mask_groups

__all__ = ["load_inputs", "fingerprint", "model_file_reference", "write_dense_parts", "library_versions",
           "dense_reference_records"]


def _check_lengths(cfg: PruningConfig, model: Any) -> None:
    """Every window fits in the model's positions (a longer one would run, silently wrong, or fail late)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for name, used, value in (("calibration.sequence_length", cfg.needs_samples, cfg.calibration.sequence_length),
                              ("evaluation.sequence_length", cfg.evaluation.enabled, cfg.evaluation.sequence_length),
                              ("finetune.sequence_length", cfg.finetune.enabled, cfg.finetune.sequence_length)):
        if used and value > limit:
            raise ConfigError(f"{name}={value} is longer than the model's {limit} positions "
                              f"(config.max_position_embeddings); use at most {limit}")


def _check_export(cfg: PruningConfig, model: Any, tokenizer: Any, targets: Mapping[str, Any]) -> None:
    """Every pruned layer can be written as configured, before any work: GGUF's architecture, tokenizer and
    blocks, and W4A16 groups that divide every pruned layer's width."""
    from podar.stages.export_gguf import check_gguf_export
    from podar.stages.quantize import WeightQuant

    if cfg.export.format == "gguf":
        check_gguf_export(model, tokenizer, targets, cfg.export.gguf_type)
    quant = WeightQuant.named(cfg.export.quantization, cfg.export.group_size)
    if quant is None or quant.group_size is None:
        return
    widths = {name: model.get_submodule(name).weight.shape[1] for name in targets}
    for name, cols in widths.items():
        if cols % quant.group_size:
            common = math.gcd(*widths.values())
            fits = [g for g in (128, 64, 32) if common % g == 0]
            hint = f"export.group_size: {fits[0]} divides them all" if fits else "no group size vLLM runs fits"
            raise ConfigError(f"export.group_size={quant.group_size} does not divide layer '{name}' ({cols} input "
                              f"columns): every W4A16 group needs its own scale; {hint}")


def _load(cfg: PruningConfig, model: Any, tokenizer: Any, progress: bool) -> tuple[Any, Any]:
    if model is None:
        model, tokenizer = load_model(cfg.model, progress=progress)
    _check_lengths(cfg, model)
    task = model_task(model)
    if cfg.finetune.enabled and task != "causal-lm":
        raise ConfigError(f"finetune.enabled: masked fine-tuning trains on next-token loss, which a {task} model "
                          f"({type(model).__name__}) does not have; set finetune.enabled: false")
    if cfg.evaluation.enabled and cfg.evaluation.tasks.names and task != "causal-lm":
        raise ConfigError(f"evaluation.tasks: task evaluation (lm-evaluation-harness) scores a causal LM's next-token "
                          f"predictions, which a {task} model ({type(model).__name__}) does not make; remove "
                          "evaluation.tasks")
    needs_text = cfg.needs_samples or cfg.evaluation.enabled or cfg.finetune.enabled
    if tokenizer is None and needs_text:
        raise ConfigError("a model was passed without a tokenizer; calibration, evaluation and fine-tuning need one: "
                          "Pipeline(config, model=model, tokenizer=tokenizer)")
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model)
    return model, tokenizer


_HIDDEN_COPIES = 2  # a walk holds the block inputs of every sample and their outputs as it moves them forward


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_calibration_memory(cfg: PruningConfig, model: Any) -> None:
    """ConfigError naming calibration.num_samples before any work when the calibration samples and the block inputs
    a walk caches for them (float32, inputs and outputs) exceed this machine's available memory."""
    cal = cfg.calibration
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or
                 model.get_input_embeddings().weight.shape[-1])
    tokens = cal.num_samples * cal.sequence_length
    need = tokens * (8 + _HIDDEN_COPIES * hidden * 4)  # int64 token ids + float32 hidden states
    available = available_memory_bytes()
    if available is not None and need > available:
        fits = max(1, available // (cal.sequence_length * (8 + _HIDDEN_COPIES * hidden * 4)))
        raise ConfigError(f"calibration.num_samples={cal.num_samples} × sequence_length={cal.sequence_length} "
                          f"tokens needs about {need / 2**30:.1f} GiB for the samples and the cached block inputs "
                          f"(hidden size {hidden}); this machine has {available / 2**30:.1f} GiB available: use at "
                          f"most {fits} samples (the papers use 128)")


def _texts(ctx: RunContext) -> None:
    """Calibration samples tokenized; the other texts present, not obviously too short, and hashed."""
    cfg, st = ctx.config, ctx.state
    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.needs_samples:
        cal = cfg.calibration
        check_calibration_memory(cfg, ctx.model)
        text = load_text(cal.dataset, data_dir, field="calibration.dataset")
        ids = tokenize_text(ctx.tokenizer, text, field="calibration.dataset")
        st.calibration_samples = calibration_windows(ids, cal.num_samples, cal.sequence_length, cal.seed,
                                                     name=cal.dataset)
        st.data_sha256["calibration"] = text_sha256(text)
    if cfg.evaluation.enabled:  # tokenized when Evaluating runs
        for i, dataset in enumerate(cfg.evaluation.datasets()):
            text = load_text(dataset, data_dir, field="evaluation.dataset")
            if len(text) < cfg.evaluation.sequence_length:
                raise DataError(f"evaluation text '{dataset}' has {len(text)} characters, fewer than one window of "
                                f"evaluation.sequence_length={cfg.evaluation.sequence_length} tokens")
            st.data_sha256["evaluation" if i == 0 else f"evaluation:{dataset}"] = text_sha256(text)
        st.task_specs = resolve_tasks(cfg.evaluation.tasks, data_dir)
        for spec in st.task_specs:
            st.data_sha256[f"task:{spec.name}"] = spec.sha256
    if cfg.finetune.enabled:
        ft = cfg.finetune
        evaluated = {sha: name for name, sha in st.data_sha256.items() if name.startswith("evaluation")}
        texts = [(field, name, "finetune" if i == 0 else f"finetune:extra:{name}")
                 for i, (field, name, _) in enumerate(ft.sources())]
        if ft.validation_dataset is not None and ft.eval_every:
            texts.append(("finetune.validation_dataset", ft.validation_dataset, "finetune:validation"))
        for field, name, key in texts:
            sha = text_sha256(load_text(name, data_dir, field=field))
            if sha in evaluated:
                raise DataError(f"{field} '{name}' is the {evaluated[sha]} text (the same bytes): fine-tuning "
                                "or validating on the text the gates are measured on would hide what pruning cost; "
                                "give another text")
            st.data_sha256[key] = sha
        training_texts(ctx, 1)  # the validation windows fit (DataError naming the field before any work)


def _permutation_spaces(ctx: RunContext) -> dict[str, PermutationSpace]:
    """The pruned layers whose input order folds into other layers (``stages.permutation``); ConfigError naming
    what is missing when there are none, or the method chooses N:M masks its own way."""
    cfg, model = ctx.config, ctx.model
    model_type = getattr(model.config, "model_type", "?")
    family = structure.WIDTH_FAMILIES.get(model_type)
    stack = find_blocks(model, cfg.calibration.blocks)
    if family is None or stack is None:
        raise ConfigError(f"permutation.enabled folds input orders into the layers that make them, known for "
                          f"{', '.join(sorted(structure.WIDTH_FAMILIES))}; model type '{model_type}' is not one (or "
                          "has no block stack): set permutation.enabled false")
    if not ctx.method.permutes_nm:
        raise ConfigError(f"permutation.enabled: method {ctx.method.name} chooses its N:M masks its own way, not "
                          "in a permuted order: set permutation.enabled false")
    spaces = permutable_layers(stack, family, model.config, cfg.pattern.m or 1)
    spaces = {n: s for n, s in spaces.items() if n in ctx.state.targets}
    if not spaces:
        raise ConfigError(f"permutation.enabled: none of the layers whose inputs other layers make (e.g. "
                          f"'{stack.path}.0.{family.down}') is pruned (targets / ignore): set permutation.enabled "
                          "false")
    ctx.log.info("permutation_layers", layers=len(spaces))
    return spaces


def _plan(ctx: RunContext) -> None:
    """The layer groups: the calibration walk's, or one group of every target without calibration."""
    cfg, st, log = ctx.config, ctx.state, ctx.log
    if cfg.allocation.kind == "owl" and find_blocks(ctx.model, cfg.calibration.blocks) is None:
        raise ConfigError(f"allocation.kind 'owl' shares the sparsity among blocks, and {type(ctx.model).__name__} "
                          "has no stack of repeated blocks: name it in calibration.blocks, or set allocation.kind "
                          "'uniform'")
    if cfg.structure.enabled:  # one pass over the whole model; what it comes to is checked before any work
        resolved = structure.resolve(cfg, ctx.model)
        if cfg.target_sparsity > 0:  # masks follow, planned again on what remains (restructure): checked here
            plan_mask_groups(ctx)
        st.walk, st.layer_groups = None, [list(st.targets)]
        log.info("structure_plan", blocks=resolved.n_blocks, blocks_removed=resolved.blocks,
                 mlp_channels_kept=resolved.channels_kept, query_heads_kept=resolved.q_kept,
                 kv_heads_kept=resolved.kv_kept)
        return
    if cfg.permutation.enabled:
        st.permutation_spaces = _permutation_spaces(ctx)
    if not cfg.needs_calibration:
        st.layer_groups = [list(st.targets)]
        return
    dtype = ctx.runtime.compute_dtype(ctx.model)
    if dtype is not None:
        fields = {"dtype": dtype_name(dtype), "requested": cfg.runtime.compute_dtype,
                  "model_dtype": dtype_name(ctx.runtime.model_dtype(ctx.model))}
        note = ctx.method.half_precision_note
        (log.warning if note else log.info)("calibration_compute_dtype", **fields, **({"note": note} if note else {}))
    plan_mask_groups(ctx)


def dense_reference_records(recorded: Mapping[str, ArtifactRecord]) -> list[ArtifactRecord]:
    """The dense reference's parts among a manifest's artifacts, in order."""
    return sorted((r for r in recorded.values() if r.stage == "idle" and r.kind == "weights"), key=lambda r: r.path)


def fingerprint(ctx: RunContext) -> None:
    """sha256 of every weight (resume compares it); pages mapped from the model's file are let go after each."""
    ranges = ctx.runtime.file_ranges()
    ctx.state.model_fingerprint = weights_fingerprint(ctx.model, after_each=lambda t: ctx.runtime.page_out([t],
                                                                                                          ranges))


def _file_index(model: Any) -> dict[str, Path]:
    """Tensor key → file, of the safetensors files in the folder the model was loaded from ({} for none)."""
    folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    index: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(path), framework="pt") as f:
            index.update({k: path for k in f.keys()})
    return index


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_stored(path: Path, key: str) -> torch.Tensor:
    """Tensor ``key`` of a safetensors file, read into memory of its own (a mapping would leave the file's pages
    resident in this process: +400 MB on SmolLM2-135M, bench/memory_trace.py)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))[key]
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:  # a dtype the comparison does not need (integers): no match, copy it instead
            return torch.empty(0)
        f.seek(8 + header_len + begin)
        data = bytearray(f.read(end - begin))
    return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"]) if data else torch.empty(entry["shape"],
                                                                                                 dtype=dtype)


def model_file_reference(ctx: RunContext) -> DenseReference:
    """The targets whose weights are, bit for bit, tensors of the model's own safetensors files: the dense
    reference reads them there (no copy). A target changed since it was loaded, or loaded in another dtype, is not
    found (and is copied instead)."""
    index = _file_index(ctx.model)
    prefix = getattr(ctx.model, "base_model_prefix", "")
    entries = {}
    ranges = ctx.runtime.file_ranges()
    for name, module in ctx.state.targets.items():
        keys = [f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight"]
        key = next((k for k in keys if k in index), None)
        if key is None:
            continue
        transposed = name in ctx.state.converted
        stored = _read_stored(index[key], key)  # read, not mapped: no page of the file stays resident
        mine = module.weight.detach()
        theirs = stored.t() if transposed else stored
        if theirs.dtype == mine.dtype and theirs.shape == mine.shape and torch.equal(theirs, mine):
            entries[name] = (index[key], key, transposed)
        del stored, theirs
        ctx.runtime.page_out([mine], ranges)
    return DenseReference(entries)


def write_dense_parts(ctx: RunContext, names: list[str]) -> list[Path]:
    """The weights of ``names`` before pruning, written into the run folder (parts of at most 16 MiB)."""
    ranges = ctx.runtime.file_ranges()
    try:
        return snapshot_weights({n: ctx.state.targets[n] for n in names}, ctx.store.dense_reference_dir,
                                after_part=lambda ws: ctx.runtime.page_out(ws, ranges))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"could not write the dense reference to '{ctx.store.dense_reference_dir}': {e} "
                              "(is the disk full?); free space or choose another --run-dir") from e


def _place(cfg: PruningConfig, model: Any, device: torch.device, log: Any) -> Runtime:
    """The run's runtime, with the model put on ``device`` (whole, or its blocks offloaded)."""
    runtime = Runtime(cfg.runtime, compute_dtype=cfg.compute_dtype_request())
    stack = find_blocks(model, cfg.calibration.blocks) if cfg.runtime.offload != "off" else None
    if runtime.place(model, device, stack.layers if stack else None):
        assert stack is not None
        if cfg.finetune.enabled:
            raise ConfigError("finetune.enabled: masked fine-tuning trains the model on the device, and this model's "
                              f"blocks are offloaded (runtime.offload={cfg.runtime.offload!r}, {device}); set "
                              "finetune.enabled: false, or runtime.offload: off on a device it fits")
        if cfg.evaluation.enabled and cfg.evaluation.tasks.names:
            raise ConfigError("evaluation.tasks: lm-evaluation-harness runs the whole model on the device, and this "
                              f"model's blocks are offloaded (runtime.offload={cfg.runtime.offload!r}, {device}); "
                              "remove evaluation.tasks, or set runtime.offload: off on a device it fits")
        if cfg.structure.enabled:
            raise ConfigError("structure: structured pruning keeps the model whole on the device, and this model's "
                              f"blocks are offloaded (runtime.offload={cfg.runtime.offload!r}, {device}); set "
                              "runtime.offload: off on a device it fits (offloaded structured pruning is not built)")
        log.info("offloaded", device=str(device), blocks=len(stack.layers), path=stack.path)
    return runtime


def _method(cfg: PruningConfig) -> PruningMethod:
    """The configured method, wrapped by DSnoT's mask swaps and the least-squares refit of the kept weights when
    they are on. ConfigError: DSnoT after a method that updates its kept weights, without the refit (the update
    belongs to the method's own mask)."""
    method = get_method(cfg.method.name)
    if not (cfg.dsnot.enabled or cfg.reconstruction.enabled):
        return method
    if cfg.dsnot.enabled and method.changes_kept_weights and not cfg.reconstruction.enabled:
        raise ConfigError(f"dsnot.enabled: method {method.name} updates the weights it keeps for its own mask, "
                          "which DSnoT changes; set reconstruction.enabled true (the kept weights are then solved "
                          "for the refined mask)")
    return Refined(method, dsnot=cfg.dsnot if cfg.dsnot.enabled else None,
                   refit_frac=cfg.reconstruction.dampening_frac if cfg.reconstruction.enabled else None)


def load_inputs(cfg: PruningConfig, store: RunStore, model: Any, tokenizer: Any, *, accelerator: Any, log: Any,
                run_id: str, progress: bool) -> RunContext:
    """The run context with every input loaded and checked (model, tokenizer, targets, texts, the calibration
    walk); the fingerprint and the dense reference come next (``fingerprint``, ``model_file_reference``)."""
    world = Dist(accelerator).world
    if cfg.finetune.enabled and cfg.finetune.batch_size % world:
        raise ConfigError(f"finetune.batch_size={cfg.finetune.batch_size} does not split over {world} processes: "
                          f"each takes an equal share of every step's windows; use a multiple of {world}")
    model, tokenizer = _load(cfg, model, tokenizer, progress)
    if cfg.finetune.enabled and cfg.finetune.hidden_weight > 0.0 and find_blocks(model, cfg.calibration.blocks) is None:
        raise ConfigError(f"finetune.hidden_weight={cfg.finetune.hidden_weight:g} compares every block's output with "
                          f"the dense model's, and {type(model).__name__} has no stack of repeated blocks: name it in "
                          "calibration.blocks, or set finetune.hidden_weight: 0")
    converted = linearize_conv1d(model)  # GPT-2's Conv1D as nn.Linear: every target an (out, in) weight
    targets, notes = resolve_targets(model, cfg)
    _check_export(cfg, model, tokenizer, targets)
    runtime = _place(cfg, model, accelerator.device, log)
    model.eval()
    ctx = RunContext(config=cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, store=store, log=log,
                     run_id=run_id, method=_method(cfg), runtime=runtime,
                     dist=Dist(accelerator),
                     state=RunState(targets=targets, masks=PackedMasks(), task=model_task(model),
                                    converted=converted), progress=progress)
    if converted:
        log.info("conv1d_as_linear", layers=len(converted), note="restored to Conv1D for the export")
    _texts(ctx)
    ctx.runtime.trim()  # the tokenizer's working memory for whole texts
    _plan(ctx)
    ctx.state.cost = estimate_cost(ctx)
    log.info("cost_estimate", **ctx.state.cost)
    log.info("targets_resolved", n_pruned=len(targets), pruned=brief(list(targets)), skipped=brief(notes),
             groups=len(ctx.state.layer_groups))
    return ctx
