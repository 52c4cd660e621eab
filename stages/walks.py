"""Calibration walks: how the calibration samples reach each layer group, and how their inputs move on.

One interface, ``CalibrationWalk``: ``statistics(i, method)`` collects the statistics of layer group ``i``'s
targets on the inputs they see; ``advance(i, ...)`` carries the inputs past group ``i`` once it is pruned (and
measures each layer's reconstruction error on the way). The walk owns the cached inputs. Implementations:

- ``BlockWalk`` (the Wanda/SparseGPT reference loop): a group is one or more blocks; its statistics come from a
  pass of its blocks with the weights as they are (dense), then, pruned, the blocks run again to make the next
  group's inputs. Every layer's statistics come from inputs that went through the pruned blocks before it.
- ``SiteWalk`` (GPTQ's "true sequential"): a group is one site of a block (``stages.sublayer``): q/k/v, o,
  gate/up, down; a site's statistics come from inputs that already went through the pruned sites before it, and
  each product is computed once.
- ``OnePassWalk``: one group of every target, its statistics from one dense pass of the whole model.

``plan_walk`` chooses one, in one place. After a resume, ``statistics(i)`` rebuilds its inputs from the
embeddings through the pruned groups before ``i``.
"""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from podar.engine.distributed import Dist, together
from podar.engine.runtime import Runtime
from podar.schemas.errors import ConfigError, StageError

from .blocks import (
    BlockInputs,
    BlockStack,
    block_output,
    capture_first_block_inputs,
    execution_order,
    find_blocks,
    run_block,
    skipped_module,
    supported_kwargs,
)
from .methods import LayerStats, PruningMethod
from .sublayer import SITE_NAMES, SublayerCursor, check_block, group_targets_by_site

__all__ = ["LayerGroup", "Advanced", "CalibrationWalk", "BlockWalk", "SiteWalk", "OnePassWalk", "plan_walk",
           "plan_mask_groups",
           "collect_stats", "reconstruction_hooks", "added_in_batch_order", "local_batches", "require_inputs",
           "reduce_in_batch_order"]

Scalar = float | int | str | bool | None
Check = Callable[[], None]


@dataclass(frozen=True)
class LayerGroup:
    """One sequential layer group: its target names, its blocks, and its site (site walk only)."""

    names: list[str]
    blocks: list[int] = field(default_factory=list)
    site: int | None = None

    @property
    def label(self) -> str:
        if self.site is not None:
            return f"block {self.blocks[0]} {SITE_NAMES[self.site]}"
        return f"blocks {self.blocks[0]}–{self.blocks[-1]}" if len(self.blocks) > 1 else (
            f"block {self.blocks[0]}" if self.blocks else "all layers")


@dataclass
class Advanced:
    """What moving past a pruned group did: block forwards made, and (err, ref) sums per measured layer."""

    forwards: int = 0
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def relative_errors(self) -> dict[str, float]:
        """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² per measured layer."""
        return {n: (e / r if r > 0 else 0.0) for n, (e, r) in self.errors.items()}


class CalibrationWalk(ABC):
    """See the module docstring. ``groups`` is the walk's plan; ``kind`` its name in logs and metrics."""

    kind: str

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], groups: list[LayerGroup],
                 samples: torch.Tensor, batch_size: int, device: torch.device, runtime: Runtime,
                 stack: BlockStack | None = None, progress: bool = True, dist: Dist | None = None) -> None:
        self.model, self.targets, self.groups, self.stack = model, targets, groups, stack
        self.batch_size, self.device, self.runtime, self.progress = batch_size, device, runtime, progress
        self.dist = dist or Dist()
        # the global batches this process runs, in order, and their samples
        self.batch_ids, self.n_batches, self.samples = local_batches(samples, batch_size, self.dist)
        self.batch_sizes = [min(batch_size, samples.shape[0] - b * batch_size) for b in range(self.n_batches)]

    def statistics(self, index: int, method: PruningMethod, check: Check
                   ) -> tuple[dict[str, LayerStats], dict[str, Scalar]]:
        """(statistics by target name, metrics) of group ``index``; layers reading one input share one record. On
        several processes, each runs its own batches and the records are added up: for a method whose parts add
        exactly (``exact_reduction``), batch by batch in the batch order one process would use, so the statistics
        are bit for bit those of one process; otherwise as sums over processes."""
        if self.dist.world == 1:
            return self._statistics(index, method, check, per_batch=False)
        exact = method.exact_reduction
        local, metrics = together(self.dist, lambda: self._statistics(index, method, check, per_batch=exact))
        if exact:
            return reduce_in_batch_order(local, self.batch_ids, self.n_batches, method, self.dist), metrics
        return reduce_sums(local, self.dist), metrics

    @abstractmethod
    def _statistics(self, index: int, method: PruningMethod, check: Check, *, per_batch: bool) -> tuple[Any, dict]:
        """This process's statistics of group ``index``: one record per layer input, or with ``per_batch`` a list
        of such dicts, one per batch it runs (in ``batch_ids`` order)."""

    def advance(self, index: int, dense: Mapping[str, torch.Tensor], n_measured: int, check: Check) -> Advanced:
        """Carry the inputs past group ``index``, pruned now; measure ``dense``'s layers on ``n_measured`` windows."""
        return Advanced()

    def close(self) -> None:
        """Let the cached inputs go (default: none are cached)."""
        return None

    def is_last(self, index: int) -> bool:
        return index + 1 >= len(self.groups)

    def _measured(self, n_measured: int) -> tuple[int, int]:
        """(this process's leading batches among the global batches that hold the first ``n_measured`` samples,
        the samples in them): what the reconstruction error is measured on, here."""
        k = _batches_covering(self.batch_sizes, n_measured)
        mine = [b for b in self.batch_ids if b < k]
        return len(mine), sum(self.batch_sizes[b] for b in mine)

    def _errors(self, acc: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
        """(err, ref) sums per measured layer, added up over processes."""
        names = sorted(acc)
        if self.dist.world > 1:
            flat = self.dist.sum_floats([v for n in names for v in acc[n]])
            acc = {n: flat[3 * i:3 * i + 3] for i, n in enumerate(names)}
        return {n: (acc[n][0], acc[n][1]) for n in names if acc[n][2]}

    def _capture(self) -> BlockInputs:
        assert self.stack is not None
        return capture_first_block_inputs(self.model, self.stack, self.samples, self.batch_size, self.device,
                                          self.runtime)


class OnePassWalk(CalibrationWalk):
    kind = "one_pass"

    @torch.no_grad()
    def _statistics(self, index: int, method: PruningMethod, check: Check, *, per_batch: bool) -> tuple[Any, dict]:
        starts = list(range(0, self.samples.shape[0], self.batch_size))
        runs = [[s] for s in starts] if per_batch else [starts]
        out = []
        with self.runtime.model_forwards(self.model):
            for run in runs:
                with collect_stats(self.targets, method, share=out[0] if out else None) as stats:
                    for start in tqdm(run, desc="calibrating", leave=False, disable=None if self.progress else True):
                        check()
                        batch = self.samples[start:start + self.batch_size].to(self.device)  # (B, T)
                        self.model(input_ids=batch, **supported_kwargs(self.model, use_cache=False))
                out.append(stats)
        return (out if per_batch else out[0]), {"block_forwards": len(starts)}


class BlockWalk(CalibrationWalk):
    kind = "block"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: BlockInputs | None = None  # the inputs of the next group's first block

    def _inputs_at(self, index: int) -> tuple[BlockInputs, int]:
        """The inputs of group ``index``: cached, or rebuilt (embeddings, then the pruned groups before it)."""
        if index > 0 and self.inputs is not None:
            return self.inputs, 0
        assert self.stack is not None
        inputs, forwards = self._capture(), 0
        with self.runtime.block_forwards(self.model, self.stack.layers) as view:
            for earlier in self.groups[:index]:
                for b in earlier.blocks:
                    inputs = run_block(view[b], inputs, in_place=True)
                    forwards += len(inputs.hidden)
        self.inputs = inputs
        return inputs, forwards

    @torch.no_grad()
    def _statistics(self, index: int, method: PruningMethod, check: Check, *, per_batch: bool) -> tuple[Any, dict]:
        assert self.stack is not None
        inputs, forwards = self._inputs_at(index)
        group = self.groups[index]
        targets = {n: self.targets[n] for n in group.names}
        last_block = self.stack.layers[group.blocks[-1]]
        in_last = {n: m for n, m in targets.items() if any(m is x for x in last_block.modules())}
        runs = [[i] for i in range(len(inputs.calls))] if per_batch else [list(range(len(inputs.calls)))]
        out = []
        with self.runtime.block_forwards(self.model, self.stack.layers) as view:
            order = (execution_order(view[group.blocks[-1]], in_last, inputs.hidden[0], inputs.calls[0])
                     if in_last else [])
            # the last Linear of the last block feeds no other target: its product is skipped in this pass
            skip = skipped_module(in_last[order[-1]]) if order else nullcontext()
            with skip:
                for run in runs:
                    with collect_stats(targets, method, share=out[0] if out else None) as stats:
                        forwards += self._run_group(view, group, inputs, run, check)
                    out.append(stats)
        return (out if per_batch else out[0]), {"block_forwards": forwards}

    @staticmethod
    def _run_group(view: Any, group: LayerGroup, inputs: BlockInputs, batches: list[int], check: Check) -> int:
        """The group's blocks on ``batches`` with the weights as they are; the forwards made."""
        chain = {i: inputs.hidden[i] for i in batches}  # later blocks of a group see the unpruned earlier ones
        forwards = 0
        for b in group.blocks:
            check()
            for i in batches:
                call = inputs.calls[i]
                out = view[b](chain[i], *call.args, **call.kwargs)
                forwards += 1
                if b != group.blocks[-1]:
                    chain[i] = block_output(out)
        return forwards

    @torch.no_grad()
    def advance(self, index: int, dense: Mapping[str, torch.Tensor], n_measured: int, check: Check) -> Advanced:
        assert self.stack is not None and self.inputs is not None
        self.runtime.trim()  # what scoring and mask selection freed, before the activations grow
        inputs = self.inputs
        last = self.is_last(index)
        n_local, n_samples = self._measured(n_measured)
        if last:  # nothing downstream needs the outputs: only the windows the measurement reads are run
            inputs = inputs.head(n_local)
        done = Advanced()
        hooks = reconstruction_hooks({n: self.targets[n] for n in dense}, dense, n_samples) if dense else \
            nullcontext({})
        with hooks as acc, self.runtime.block_forwards(self.model, self.stack.layers) as view:
            for b in self.groups[index].blocks:
                check()
                inputs = run_block(view[b], inputs, in_place=True)
                done.forwards += len(inputs.hidden)
        self.inputs = None if last else inputs
        done.errors = self._errors(acc)
        return done

    def close(self) -> None:
        self.inputs = None


class SiteWalk(CalibrationWalk):
    kind = "site"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor: SublayerCursor | None = None

    @torch.no_grad()
    def _statistics(self, index: int, method: PruningMethod, check: Check, *, per_batch: bool) -> tuple[Any, dict]:
        assert self.stack is not None
        group = self.groups[index]
        block, site = group.blocks[0], group.site
        assert site is not None
        if index == 0 or self.cursor is None:  # the walk is rebuilt: embeddings, then the pruned sites before
            self.cursor = SublayerCursor.start(self._capture())
        cursor = self.cursor
        before = cursor.site_passes
        entries: list[LayerStats] = []
        with self.runtime.block_forwards(self.model, self.stack.layers) as view:
            cursor.advance_to(view, block, site, before_step=check)
            for x in cursor.site_inputs(view):
                check()
                if not entries or per_batch:
                    entries.append(method.new_stats(x.shape[-1], x.device))
                    if len(entries) > 1:
                        entries[-1].share_summed(entries[0])
                method.accumulate(entries[-1], x)
        assert entries
        for entry in entries:
            method.finish(entry)
        metrics: dict[str, Scalar] = {"block": block, "site": SITE_NAMES[site],
                                      "replayed_site_passes": cursor.site_passes - before, "block_forwards": 0}
        by_batch = [{n: entry for n in group.names} for entry in entries]
        return (by_batch if per_batch else by_batch[0]), metrics

    @torch.no_grad()
    def advance(self, index: int, dense: Mapping[str, torch.Tensor], n_measured: int, check: Check) -> Advanced:
        assert self.stack is not None and self.cursor is not None
        cursor, group = self.cursor, self.groups[index]
        if cursor.position != (group.blocks[0], group.site):
            raise RuntimeError(f"the site walk stands at {cursor.position}, not at the pruned group's "
                               f"{(group.blocks[0], group.site)}")
        if cursor.site in (0, 2):  # passes that allocate activations
            self.runtime.trim()
        last = self.is_last(index)
        n_local, n_samples = self._measured(n_measured)
        n_batches = n_local if last else None
        done = Advanced()
        hooks = reconstruction_hooks({n: self.targets[n] for n in dense}, dense, n_samples) if dense else \
            nullcontext({})
        with hooks as acc, self.runtime.block_forwards(self.model, self.stack.layers) as view:
            if n_batches != 0:
                cursor.step(view, max_batches=n_batches)
                done.forwards += 1
        if cursor.site in (1, 3):  # the pass just made freed its per-batch temporaries
            self.runtime.trim()
        if last:
            self.cursor = None
        done.errors = self._errors(acc)
        return done

    def close(self) -> None:
        self.cursor = None


def local_batches(samples: torch.Tensor, batch_size: int, dist: Dist) -> tuple[list[int], int, torch.Tensor]:
    """(the global batches this process runs, in order; how many there are; their samples (n, T), in that order)
    of ``samples`` (N, T) in batches of ``batch_size``. ConfigError when a process would get none."""
    n_batches = -(-samples.shape[0] // batch_size)
    batch_ids = dist.shares(n_batches)
    if not batch_ids:
        raise ConfigError(f"calibration: {samples.shape[0]} samples in batches of {batch_size} make {n_batches} "
                          f"batch(es), fewer than the {dist.world} processes: each needs one; raise "
                          "calibration.num_samples or lower calibration.batch_size")
    mine = samples if dist.world == 1 else torch.cat([samples[b * batch_size:(b + 1) * batch_size]
                                                      for b in batch_ids])
    return batch_ids, n_batches, mine


def require_inputs(stats: Mapping[str, LayerStats], names: list[str], where: str, stage: str) -> None:
    """StageError naming the first of ``names`` whose statistics saw no input ``where`` (e.g. 'during
    calibration')."""
    for name in names:
        entry = stats.get(name)
        if entry is None or entry.n_samples == 0:
            raise StageError(f"layer '{name}' received no input {where} (is it used in forward?)", stage=stage,
                             layer=name)


def reduce_sums(stats: dict[str, LayerStats], dist: Dist) -> dict[str, LayerStats]:
    """Every record's parts summed over processes (in place; records shared by layers summed once)."""
    for record in {id(r): r for r in stats.values()}.values():
        for name, value in record.parts().items():
            if isinstance(value, torch.Tensor):
                record.set_part(name, dist.sum(value))
            else:
                record.set_part(name, int(dist.sum(torch.tensor([value], dtype=torch.int64)).item()))
    return stats


def added_in_batch_order(rows: torch.Tensor, batch_ids: list[int], n_batches: int, dist: Dist) -> torch.Tensor:
    """Σ over every process's batches of ``rows`` (len(batch_ids), ...) — this process's, one per batch it ran —
    added from zero in global batch order: the very additions one process makes (bit for bit its sum)."""
    total = torch.zeros(rows.shape[1:], dtype=rows.dtype, device=rows.device)
    for row in dist.gather_rows(rows, batch_ids, n_batches):  # (n_batches, ...) in batch order
        total += row
    return total


def reduce_in_batch_order(by_batch: list[dict[str, LayerStats]], batch_ids: list[int], n_batches: int,
                          method: PruningMethod, dist: Dist) -> dict[str, LayerStats]:
    """The records of every process's batches added up in global batch order, from zero — the very additions one
    process makes, batch after batch (so the statistics are bit for bit one process's)."""
    first = by_batch[0]
    shared: dict[int, list[str]] = {}
    for name, record in first.items():
        shared.setdefault(id(record), []).append(name)
    out: dict[str, LayerStats] = {}
    for names in shared.values():
        parts = [batch[names[0]].parts() for batch in by_batch]
        record = copy.copy(first[names[0]])
        for field_name, value in parts[0].items():
            if field_name in record.summed_parts:  # one tensor shared by this process's batches: its sum
                total = dist.sum(value)
            elif isinstance(value, torch.Tensor):
                total = added_in_batch_order(torch.stack([p[field_name] for p in parts]), batch_ids, n_batches, dist)
            else:
                counts = dist.gather_rows(torch.tensor([p[field_name] for p in parts], dtype=torch.int64), batch_ids,
                                          n_batches)
                total = int(counts.sum())
            record.set_part(field_name, total)
        out.update({n: record for n in names})
    return out


def _batches_covering(sizes: list[int], n_samples: int) -> int:
    """How many of the leading batches (``sizes``: samples per batch, in order) hold the first ``n_samples``."""
    if n_samples <= 0:
        return 0
    for i, end in enumerate(itertools.accumulate(sizes)):
        if end >= n_samples:
            return i + 1
    return len(sizes)


# ---------------------------------------------------------------- planning


@dataclass
class WalkPlan:
    """The chosen walk and why (logged as ``calibration_plan`` / ``sublayer_fallback``)."""

    walk: CalibrationWalk
    reason: str | None = None  # why the asked-for walk could not be used
    blocks_path: str | None = None


def _block_groups(stack: BlockStack, targets: dict[str, nn.Module], blocks_per_group: int) -> list[LayerGroup]:
    owner, outside = stack.owner_of(targets)
    if outside:
        raise ConfigError(f"sequential calibration covers the blocks of '{stack.path}' only, but targets include "
                          f"{outside[:4]}; add them to 'ignore' or set calibration.walk: one_pass")
    groups = []
    for start in range(0, len(stack.layers), blocks_per_group):
        blocks = list(range(start, min(start + blocks_per_group, len(stack.layers))))
        names = [n for n in targets if owner[n] in blocks]
        if names:
            groups.append(LayerGroup(names=names, blocks=blocks))
    return groups


def _site_plan(model: nn.Module, stack: BlockStack, targets: dict[str, nn.Module], samples: torch.Tensor,
               device: torch.device, runtime: Runtime) -> list[LayerGroup] | str:
    """The site walk's groups, or why the blocks cannot be walked site by site."""
    plan = group_targets_by_site(stack.layers, targets)
    if plan is None:
        return ("a block is not Llama-style (input_layernorm, self_attn with o_proj, post_attention_layernorm, "
                "mlp with down_proj)")
    probe = capture_first_block_inputs(model, stack, samples[:1], 1, device, runtime)
    if probe.calls[0].args:
        return "the blocks take positional arguments besides the hidden states"
    with torch.no_grad(), runtime.block_forwards(model, stack.layers) as view:  # in the dtype the walk computes in
        scale = float(probe.hidden[0].abs().max()) + 1.0
        diff = check_block(view[0], probe.hidden[0], probe.calls[0].kwargs)
    if not diff <= 1e-5 * scale:
        return (f"walking block 0 site by site differs from its own forward: the output hidden states differ by up to "
                f"{diff:.3g} (absolute, in the units of the hidden state, whose largest |value| is {scale - 1.0:.3g}; "
                f"allowed {1e-5 * scale:.3g}): the block computes something the site walk does not")
    return [LayerGroup(names=names, blocks=[b], site=s) for (b, s), names in zip(*plan, strict=True)]


def plan_walk(model: nn.Module, targets: dict[str, nn.Module], walk: str, *, blocks_path: str | None,
              blocks_per_group: int, samples: torch.Tensor, batch_size: int, device: torch.device,
              runtime: Runtime, progress: bool = True, dist: Dist | None = None) -> WalkPlan:
    """The calibration walk for ``walk`` ('block', 'site' or 'one_pass'): the site walk falls back to blocks when a
    block is not Llama-style, and both to one pass when the model has no block stack."""
    args = (model, targets)
    rest = dict(samples=samples, batch_size=batch_size, device=device, runtime=runtime, progress=progress, dist=dist)
    stack = None if walk == "one_pass" else find_blocks(model, blocks_path)
    if stack is None:
        reason = None if walk == "one_pass" else f"{type(model).__name__} has no stack of repeated blocks"
        return WalkPlan(OnePassWalk(*args, [LayerGroup(names=list(targets))], **rest), reason)
    block_groups = _block_groups(stack, targets, blocks_per_group)  # rejects targets outside the blocks
    reason = None
    if walk == "site":
        sites = _site_plan(model, stack, targets, samples, device, runtime)
        if not isinstance(sites, str):
            return WalkPlan(SiteWalk(*args, sites, stack=stack, **rest), None, stack.path)
        reason = sites
    return WalkPlan(BlockWalk(*args, block_groups, stack=stack, **rest), reason, stack.path)


def plan_mask_groups(ctx: Any, before: list[list[str]] | None = None) -> None:
    """The layer groups the masks are chosen in (``state.layer_groups``, ``state.walk``): the calibration walk's, or
    one group of every target when the masks need no statistics. ``before``: groups that come first (structure's,
    in a run that removes blocks, channels or heads and then masks what remains); the walk's group i is then the
    run's group ``len(before) + i`` (``state.walk_offset``)."""
    cfg, st = ctx.config, ctx.state
    first = list(before or [])
    st.walk, st.walk_offset = None, len(first)
    if not cfg.masks_need_calibration:
        st.layer_groups = [*first, list(st.targets)]
        return
    walk = cfg.resolved_walk()
    assert st.calibration_samples is not None
    plan = plan_walk(ctx.model, st.targets, walk, blocks_path=cfg.calibration.blocks,
                     blocks_per_group=cfg.calibration.blocks_per_group, samples=st.calibration_samples,
                     batch_size=cfg.calibration.batch_size, device=ctx.device, runtime=ctx.runtime,
                     progress=ctx.progress, dist=ctx.dist)
    if plan.reason is not None:
        ctx.log.warning("calibration_walk_fallback", asked=walk, walk=plan.walk.kind, reason=plan.reason)
    st.walk = plan.walk
    st.layer_groups = [*first, *(g.names for g in plan.walk.groups)]
    ctx.log.info("calibration_plan", walk=plan.walk.kind, groups=len(plan.walk.groups), blocks=plan.blocks_path,
                 first_group=len(first))


# ---------------------------------------------------------------- hooks

@contextmanager
def _forward_hooks(modules: dict[str, nn.Module], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """While open, ``make_hook(name)`` is a forward hook on each module; all are removed on exit."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def collect_stats(modules: dict[str, nn.Module], method: PruningMethod,
                  share: Mapping[str, LayerStats] | None = None) -> Iterator[dict[str, LayerStats]]:
    """Forward hooks that add each module's inputs to its statistics (``method.accumulate``) while the context is
    open; ``method.finish`` makes them whole on exit. ``share``: an earlier batch's records of this process, whose
    ``summed_parts`` the new records accumulate into. Modules that receive the very same input tensor one after
    the other (q/k/v after one norm, gate/up after another) share one record, so each statistic is computed once
    per input."""
    stats: dict[str, LayerStats] = {}
    last: dict[str, Any] = {"x": None, "name": None}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0]
            if x is last["x"] and last["name"] in stats:
                leader = stats[last["name"]]
                if stats.get(name) is not leader:  # first time: alias the leader's record
                    stats[name] = leader
                return
            last["x"], last["name"] = x, name
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = method.new_stats(x.shape[-1], module.weight.device)
                if share is not None and name in share:
                    entry.share_summed(share[name])
            method.accumulate(entry, x)

        return hook

    try:
        with _forward_hooks(modules, make_hook):
            yield stats
    finally:
        last.clear()
    for entry in {id(e): e for e in stats.values()}.values():
        method.finish(entry)


_RECON_CHUNK = 512  # tokens per product in reconstruction_hooks


@contextmanager
def reconstruction_hooks(modules: dict[str, nn.Module], dense: Mapping[str, torch.Tensor], max_samples: int
                         ) -> Iterator[dict[str, list[float]]]:
    """While open, accumulate per module ‖X·(W − Ŵ)ᵀ‖² and ‖X·Wᵀ‖² on the first ``max_samples`` sequences.

    Yields {name: [err_sq_sum, ref_sq_sum, n_samples]}; the relative error is err/ref. ``dense``: (out, in).
    """
    acc: dict[str, list[float]] = {n: [0.0, 0.0, 0] for n in modules}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            entry = acc[name]
            if entry[2] >= max_samples:
                return
            x = args[0].detach()
            n_seq = x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            out = output.detach().reshape(-1, output.shape[-1])  # XŴᵀ (+ bias)
            # W − Ŵ in the dtype the forward computes in (the model's, or runtime.compute_dtype): a mask's
            # difference is exact there (the removed weights, zeros elsewhere), so the product runs at that
            # dtype's speed and the error is not polluted by rounding the kept weights
            w = module.weight.detach()
            delta = dense[name].to(w.device, w.dtype) - w  # (out, in)
            bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
            for t0 in range(0, x.shape[0], _RECON_CHUNK):  # in token chunks: small temporaries
                err = (x[t0:t0 + _RECON_CHUNK].to(w.dtype) @ delta.t()).float()  # (chunk, out) = XWᵀ − XŴᵀ
                pruned_out = out[t0:t0 + _RECON_CHUNK].float()
                if bias is not None:
                    pruned_out = pruned_out - bias
                entry[0] += float(err.pow(2).sum())
                entry[1] += float((pruned_out + err).pow(2).sum())  # ‖XWᵀ‖² without a second product
            entry[2] += n_seq

        return hook

    with _forward_hooks(modules, make_hook):
        yield acc
