"""Resuming a run from its folder: what is checked before any work, and how the checkpoints become the model's
state again. The move to make comes from the manifest's resume point, never from the audit log; the audit
log's records beyond the manifest are accepted only when they are what an interrupted run leaves."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from podar.engine.audit import AuditLog, canonical, checkpoint_digest, read_audit, records_after
from podar.engine.context import DenseReference, RunContext
from podar.engine.machine import VOLATILE
from podar.engine.models import dtype_name
from podar.engine.store import RunStore, sha256_file
from podar.engine.verify import audit_run, consumed_results
from podar.schemas.config import PruningConfig
from podar.schemas.errors import AuditError, CheckpointError
from podar.schemas.records import MANIFEST_SCHEMA_VERSION, ArtifactRecord, HistoryEntry, RunManifest
from podar.schemas.stage import PruningStage
from podar.stages.allocation import ALLOCATION_KIND, Allocation
from podar.stages.bitpack import unpack_bits
from podar.stages.common import adopt_weights, apply_mask
from podar.stages.evaluate import TASK_BASELINE_KIND, restore_task_baseline
from podar.stages.finetune import BEST_KIND, CACHE_KIND, STATE_KIND, Session
from podar.stages.permutation import PERMUTATION_KIND
from podar.stages.structure import STRUCTURE_KIND, StructurePlan, restructure

__all__ = ["ResumeRequest", "saved_config", "changed_fields", "check_config_change", "consumer", "CONSUMED_BY",
           "check_inputs", "check_artifacts", "adopt_audit_tail",
           "restore_checkpoints", "mask_artifact", "run_masks"]


@dataclass(frozen=True)
class ResumeRequest:
    """What ``Pipeline.resume`` was asked to accept."""

    allow_model_change: bool = False
    allow_data_change: bool = False
    allow_world_change: bool = False
    config_changes: tuple[str, ...] = ()  # the fields the resumed config changes (checked before any work)


def saved_config(store: RunStore, manifest: RunManifest) -> PruningConfig:
    """The run's own config, refused when the manifest's copy no longer has its recorded sha256."""
    if manifest.schema_version != MANIFEST_SCHEMA_VERSION:
        raise CheckpointError(f"'{store.manifest_path}' has manifest schema {manifest.schema_version}; this podar "
                              f"reads schema {MANIFEST_SCHEMA_VERSION}: resume it with the podar that wrote it")
    if hashlib.sha256(canonical(manifest.config).encode()).hexdigest() != manifest.config_sha256:
        raise CheckpointError(f"the config in '{store.manifest_path}' does not match its recorded sha256: the "
                              "manifest was edited")
    return PruningConfig.from_dict(manifest.config, source=str(store.manifest_path))


def changed_fields(old: PruningConfig, new: PruningConfig) -> list[str]:
    """The dotted paths of the fields whose values differ (sections compared field by field)."""
    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict) and a.get("name", None) == b.get("name", None):
            return [p for k in sorted(set(a) | set(b)) for p in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")


S = PruningStage
# The stage whose work each config field shapes (the longest dotted prefix that matches wins); None: no stage's
# result depends on it (where the model computes, how memory is kept; the model and texts are guarded by their
# hashes). A field may change on resume only while that stage's work is still ahead.
CONSUMED_BY: dict[str, PruningStage | None] = {
    **dict.fromkeys(("method", "target_sparsity", "pattern", "schedule", "scope", "targets", "ignore", "calibration",
                     "seed", "runtime.compute_dtype", "runtime.chunked_attention"), S.PRUNING),
    "finetune": S.FINE_TUNING, "evaluation": S.EVALUATING, "export": S.EXPORTING,
    **dict.fromkeys(("model", "data_dir", "device", "runtime"), None),
}


def consumer(path: str) -> PruningStage | None:
    """The stage whose work the config field ``path`` shapes (CONSUMED_BY); a field it does not list: Pruning."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in CONSUMED_BY:
            return CONSUMED_BY[prefix]
    return S.PRUNING


def check_config_change(fields: list[str], manifest: RunManifest) -> None:
    """CheckpointError naming the first changed field that can no longer take effect: the stage it shapes has a
    result the resume keeps (a stage redone from its start — the resume point's — counts as ahead)."""
    point = manifest.resume_point
    kept = [r.stage for r in manifest.results if PruningStage(r.stage) not in VOLATILE]
    if point is not None and kept and kept[-1] == point.dest:
        kept.pop()  # redone by the resume
        while point.dest == S.EVALUATING.value and kept and kept[-1] == point.dest:
            kept.pop()  # Evaluating's first part (the dense task results) is computed again when its settings change
    late = [(path, stage) for path in fields if (stage := consumer(path)) is not None and stage.value in kept]
    if late:
        names = ", ".join(f"'{p}'" for p, _ in late)
        stages = ", ".join(dict.fromkeys(s.display_name() for _, s in late))
        raise CheckpointError(
            f"config field {names} shapes {stages}, which this run has done (its result is kept on resume, which "
            f"continues at {PruningStage(point.dest).display_name() if point else 'its end'}): the change cannot "
            "take effect; start a new run with it")


def compute_dtype_name(ctx: RunContext) -> str:
    """The dtype the calibration forwards run in on this machine ('model': the model's own)."""
    return dtype_name(ctx.runtime.compute_dtype(ctx.model), none="model")


def check_inputs(ctx: RunContext, manifest: RunManifest, request: ResumeRequest) -> None:
    """The model's weights and every text hash as the run recorded them, unless the request allows a change; the
    calibration forwards in the dtype the run began with while calibration work is left."""
    now = compute_dtype_name(ctx)
    if manifest.compute_dtype is not None and now != manifest.compute_dtype and resume_stage(manifest)[0] in (
            PruningStage.CALIBRATING, PruningStage.COMPUTING_IMPORTANCE, PruningStage.PRUNING):
        raise CheckpointError(
            f"the run's calibration forwards ran in {manifest.compute_dtype}, and runtime.compute_dtype resolves to "
            f"{now} here (runtime.compute_dtype 'auto' takes bf16 only where the device computes it natively): the "
            f"layers left would be calibrated otherwise; resume on such a device, or set runtime.compute_dtype to "
            f"{'bfloat16' if manifest.compute_dtype == 'bfloat16' else 'model'} (--set runtime.compute_dtype=...)")
    fp = ctx.state.model_fingerprint
    if fp != manifest.model_fingerprint and not request.allow_model_change:
        raise CheckpointError(
            f"the model's weights hash {fp[:16]}… differs from the run's {str(manifest.model_fingerprint)[:16]}…; "
            "load the same model, or pass allow_model_change=True (--allow-model-change)")
    for role, sha in ctx.state.data_sha256.items():
        old = manifest.data_sha256.get(role)
        if old is not None and old != sha and not request.allow_data_change:
            raise CheckpointError(
                f"the {role} text's sha256 {sha[:16]}… differs from the run's {old[:16]}…; use the same data, or "
                "pass allow_data_change=True (--allow-data-change)")


def check_artifacts(store: RunStore, manifest: RunManifest) -> None:
    """Every recorded artifact present, a regular file inside the run folder, and with its recorded sha256."""
    for record in manifest.artifacts.values():
        path = store.artifact_path(record.path)
        if path.is_symlink():
            raise CheckpointError(f"artifact '{record.path}' is a symbolic link; a run folder holds plain files only")
        if not path.is_file():
            raise CheckpointError(f"artifact '{record.path}' recorded in the manifest is missing; the run cannot "
                                  "continue from this folder (start a new run)")
        actual = sha256_file(path)
        if actual != record.sha256:
            raise CheckpointError(f"artifact '{record.path}' has sha256 {actual[:16]}…, the manifest records "
                                  f"{record.sha256[:16]}…: it was changed or corrupted (start a new run)")


def adopt_audit_tail(store: RunStore, manifest: RunManifest, audit: AuditLog) -> tuple[str, str | None]:
    """(the state the run was in when it stopped, the digest of a last result no record confirms yet). The state
    is the manifest's, or past the records the audit log holds beyond it when they are what an interrupted run
    leaves (they are added to the history, marked interrupted). CheckpointError for a run folder that does not
    pass the audit (``engine.verify``), which is also what a forged record appended to it fails."""
    try:
        audit_run(store.run_dir, key=audit.key, check_files=False)
        tail = records_after(store.audit_path, manifest.run_id, manifest.audit_head_sha256)
        records = read_audit(store.audit_path)
    except AuditError as e:
        raise CheckpointError(f"the audit log does not verify, so the run cannot be resumed: {e}") from e
    dangling = None
    if consumed_results(records) < len(manifest.results):
        dangling = checkpoint_digest(manifest.results[-1], manifest.artifacts)
    state = manifest.state
    for record in tail:
        if record.get("event") == "transition":
            manifest.history.append(HistoryEntry(seq=record["seq"], trigger=record["trigger"], source=record["source"],
                                                 dest=record["dest"], at=record["at"], interrupted=True))
        state = record["dest"]
    manifest.audit_head_sha256 = audit.head_sha256
    return state, dangling


def resumed_reference(ctx: RunContext, manifest: RunManifest, files: DenseReference) -> DenseReference:
    """The dense reference of a resumed run: the parts it recorded, and the model's own files for the rest (the
    fingerprint check has shown they hold what the run started from). CheckpointError naming a layer in neither."""
    from podar._setup import dense_reference_records

    parts = DenseReference.of_parts([ctx.store.artifact_path(r.path) for r in dense_reference_records(
        manifest.artifacts)])
    reference = files.merged(parts)
    missing = [n for n in ctx.state.targets if n not in reference]
    if missing:
        raise CheckpointError(f"the dense reference of layer '{missing[0]}' is neither in the run folder nor, "
                              f"unchanged, in the model's files ({len(missing)} layers): the run cannot continue")
    return reference


def mask_artifact(store: RunStore, record: ArtifactRecord) -> dict[str, torch.Tensor]:
    """The masks (out, in) bool, True = kept, of one mask artifact (its sha256 checked on load)."""
    with safe_open(str(store.artifact_path(record.path)), framework="pt") as f:
        shapes = json.loads((f.metadata() or {})["shapes"])
    return {name: unpack_bits(packed, shapes[name][1]) for name, packed in store.load_tensors(record).items()}


def _with_metadata(store: RunStore, record: ArtifactRecord) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors artifact, its sha256 checked."""
    tensors = store.load_tensors(record)
    with safe_open(str(store.artifact_path(record.path)), framework="pt") as f:
        return tensors, f.metadata() or {}


@torch.no_grad()
def restore_checkpoints(ctx: RunContext, manifest: RunManifest) -> None:
    """Replay the checkpointed results onto the freshly loaded model, in order: the structure plan applied (blocks,
    channels, heads removed), masks applied, or the weights checkpointed beside them (SparseGPT's updated weights,
    fine-tuning's) adopted — mapped from their files."""
    st, store = ctx.state, ctx.store
    modules = dict(ctx.model.named_modules())
    params = dict(ctx.model.named_parameters())
    ranges = ctx.runtime.file_ranges()
    for result in manifest.results:
        records = [manifest.artifacts[a] for a in result.artifacts if a in manifest.artifacts]
        for record in (r for r in records if r.kind == STRUCTURE_KIND):  # first: the names below are the new ones
            restructure(ctx, StructurePlan.from_tensors(*_with_metadata(store, record)))
            modules = dict(ctx.model.named_modules())
            params = dict(ctx.model.named_parameters())
        weights = [r for r in records if r.kind == "weights"]
        for record in (r for r in records if r.kind == "masks"):
            for name, mask in mask_artifact(store, record).items():
                st.masks[name] = mask
                if not weights:
                    apply_mask(modules[name], mask, ctx.runtime, ranges)
        for record in (r for r in records if r.kind == ALLOCATION_KIND):  # the round's per-layer sparsity (OWL)
            st.allocation = Allocation.from_tensors(*_with_metadata(store, record))
        for record in (r for r in records if r.kind == PERMUTATION_KIND):  # N:M masks' input orders (the export's)
            st.permutations.update(store.load_tensors(record))
        for record in (r for r in records if r.kind == "scales"):
            st.quant_scales.update(store.load_tensors(record))
        for record in (r for r in records if r.kind == STATE_KIND):  # where the next fine-tuning interval goes on
            st.finetune_session = Session.from_tensors(*_with_metadata(store, record))
        for record in (r for r in records if r.kind == BEST_KIND):
            st.finetune_best = store.load_tensors(record)
        for record in (r for r in records if r.kind == TASK_BASELINE_KIND):
            restore_task_baseline(ctx, *_with_metadata(store, record))
        for record in (r for r in records if r.kind == CACHE_KIND):
            tensors, metadata = _with_metadata(store, record)
            st.teacher_cache = (int(metadata["round_index"]), tensors)
        for record in weights:
            tensors = store.load_tensors(record)
            adopt_weights(record.path, tensors, {n: modules[n].weight if n in modules else params[n] for n in tensors})


def run_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every layer's mask (out, in) bool, True = kept, as a run folder recorded it (the latest per layer, in the
    order the masks were written). Reads only; each artifact's sha256 is checked against the manifest."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    out: dict[str, torch.Tensor] = {}
    for result in manifest.results:
        for rel in result.artifacts:
            record = manifest.artifacts.get(rel)
            if record is not None and record.kind == "masks":
                out.update(mask_artifact(store, record))
    return out


def resume_stage(manifest: RunManifest) -> tuple[PruningStage, str, Any]:
    """(the stage to redo, its note, its counters) from the manifest's resume point."""
    point = manifest.resume_point
    if point is None:
        raise CheckpointError(f"run '{manifest.run_id}' records no resume point; it cannot be resumed")
    return PruningStage(point.dest), point.note, point.counters
