"""Channel permutation for N:M masks (Pool & Yu 2021, "Channel Permutations for N:M Sparsity"; RIA, Zhang et al.
2024, §3.3): an N:M mask keeps the n best of every m consecutive input weights of a row, so when important input
channels sit side by side, some of them must go. Reordering a layer's input channels so each group of m holds a
balanced share keeps more of the score; the order is folded into the layer(s) that make those inputs, so the model
computes the same function and its weights are N:M in their own layout — no runtime permutation anywhere.

Only the inputs other layers' rows make can be reordered that way: the MLP's down projection (its inputs are the
intermediate channels, the gate/up rows) and the attention output (its inputs are the value rows, read by every
query head of their KV group, so one order per KV group, shared by its query heads, within each head's
``head_dim`` columns). The inputs of q/k/v and gate/up are the residual stream, shared by every block.

The search (pure, float64): channels dealt into the n/m groups by their total score (largest first, in a snake so
every group gets one of each tier), kept only if it retains more than the given order; then, for each of the m
slots of a group in turn, the slot's channels reassigned among the groups by an optimal assignment (the gain of
channel c in group b: Σ over rows of max(0, s_c − the n-th largest of b's other m − 1 scores)), sweeps repeated
until one retains no more. Every step keeps the retained score from falling.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

if TYPE_CHECKING:
    from .blocks import BlockStack
    from .structure import Family

__all__ = ["PermutationSpace", "PERMUTATION_KIND", "unpermute_columns", "nm_retained", "slot_gains",
           "nm_permutation", "layer_permutation", "permutable_layers", "fold_permutations"]

PERMUTATION_KIND = "permutation"  # the artifact: each permuted layer's input order (restored on resume)
_GAIN_CHUNK = 1 << 24  # (rows × groups × groups) elements of the gain matrix computed at once: 64 MiB in fp32


@dataclass(frozen=True)
class PermutationSpace:
    """Which input orders of one layer fold into the layers that make its inputs: any (``head_dim`` None), or one
    order of ``head_dim`` columns per KV group, shared by the group's ``n_q // n_kv`` query heads."""

    head_dim: int | None = None
    n_q: int | None = None
    n_kv: int | None = None


def unpermute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """y: (rows, in) with y[:, perm] = x: columns computed in the order ``perm`` (in,) put back in the given one."""
    return torch.empty_like(x).index_copy_(1, perm.to(x.device), x)


def nm_retained(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """retained: () float64 = Σ over rows and groups of m consecutive columns of the n largest scores.

    ``score``: (out, in) with in divisible by m.
    """
    s = score.double().reshape(score.shape[0], -1, m)  # (out, in/m, m)
    return s.topk(n, dim=-1).values.sum()


def slot_gains(score: torch.Tensor, groups: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """gain: (G, G) in score's dtype, gain[b, c] = Σ_rows max(0, s[:, groups[c, slot]] − t[:, b]), t[:, b] the n-th
    largest of group b's scores without its ``slot``: what group b retains beyond its other m − 1 channels' top n
    when ``slot`` holds channel groups[c, slot].

    ``score``: (out, in) (no −inf); ``groups``: (G, m) int64 channel ids, G·m = in; n < m.
    """
    out, _ = score.shape
    g, m = groups.shape
    others = groups[:, [j for j in range(m) if j != slot]]  # (G, m-1)
    t = score[:, others].topk(n, dim=-1).values[..., -1]  # (out, G): n-th largest of the others
    x = score[:, groups[:, slot]]  # (out, G): each group's slot channel, the candidates
    gain = torch.empty(g, g, dtype=score.dtype, device=score.device)
    step = max(1, _GAIN_CHUNK // max(out * g, 1))
    for b0 in range(0, g, step):
        b1 = min(g, b0 + step)
        gain[b0:b1] = (x[:, None, :] - t[:, b0:b1, None]).clamp_min(0.0).sum(dim=0)  # (b, c)
    return gain


def _snake(score: torch.Tensor, m: int) -> torch.Tensor:
    """groups: (in/m, m) int64, channels by total score, largest first, dealt to the groups in a snake."""
    n_groups = score.shape[1] // m
    order = torch.sort(score.sum(dim=0), descending=True, stable=True).indices  # (in,)
    groups = torch.empty(n_groups, m, dtype=torch.int64)
    for tier in range(m):
        chunk = order[tier * n_groups:(tier + 1) * n_groups]
        groups[:, tier] = chunk if tier % 2 == 0 else chunk.flip(0)
    return groups


def nm_permutation(score: torch.Tensor, n: int, m: int, max_rounds: int = 2
                   ) -> tuple[torch.Tensor, float, float]:
    """(perm, retained_before, retained_after): perm (in,) int64, an order of the input columns whose N:M mask
    retains at least as much score as the given order's (score[:, perm] is what the mask is chosen on); the
    retained scores (``nm_retained``) of the given order and of perm.

    ``score``: (out, in) ≥ 0 (−inf, a weight an earlier round pruned, counts as −(max + 1): kept last);
    ``max_rounds``: sweeps over the m slots at most.
    """
    s = score.detach().double().cpu()
    finite = torch.isfinite(s)
    if not bool(finite.all()):
        s = torch.where(finite, s, -(s[finite].abs().max() + 1.0) if bool(finite.any()) else -1.0)
    n_in = s.shape[1]
    if n_in % m:
        raise ValueError(f"nm_permutation: {n_in} input columns do not split into groups of {m}")
    identity = torch.arange(n_in, dtype=torch.int64)
    before = float(nm_retained(s, n, m))
    groups, best = identity.reshape(-1, m), before
    snake = _snake(s, m)
    snake_retained = float(nm_retained(s[:, snake.reshape(-1)], n, m))
    if snake_retained > best:
        groups, best = snake, snake_retained
    proposer = s.float()  # the assignment's gains in float32 (twice as fast); each step is kept on float64
    g = groups.shape[0]
    shifts = torch.arange(g)[:, None]  # a group's channels rotate by its index each round: new pairs meet
    stale = 0
    for _ in range(max_rounds if g > 1 else 0):
        start = best
        groups = groups.gather(1, (torch.arange(m)[None, :] + shifts) % m)
        for slot in range(m):
            gain = slot_gains(proposer, groups, slot, n)
            rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
            cols_t = torch.from_numpy(cols).to(torch.int64)
            if float(gain[torch.from_numpy(rows), cols_t].double().sum()) > float(gain.diagonal().double().sum()):
                candidate = groups.clone()
                candidate[:, slot] = groups[cols_t, slot]
                retained = float(nm_retained(s[:, candidate.reshape(-1)], n, m))
                if retained > best:
                    groups, best = candidate, retained
        stale = 0 if best > start else stale + 1
        if stale >= m:  # m rotations in a row found nothing
            break
    return groups.reshape(-1), before, best


def layer_permutation(score: torch.Tensor, n: int, m: int, space: PermutationSpace, max_rounds: int = 2
                      ) -> tuple[torch.Tensor, float, float]:
    """(perm, retained_before, retained_after) of one layer's input columns within ``space``: free, or (attention
    output) one order of each KV group's head_dim columns, chosen on the scores of all its query heads stacked."""
    if space.head_dim is None:
        return nm_permutation(score, n, m, max_rounds)
    assert space.n_q is not None and space.n_kv is not None
    d, per_kv = space.head_dim, space.n_q // space.n_kv
    perm = torch.arange(score.shape[1], dtype=torch.int64)
    before = after = 0.0
    for group in range(space.n_kv):
        heads = range(group * per_kv, (group + 1) * per_kv)
        stacked = torch.cat([score[:, h * d:(h + 1) * d] for h in heads], dim=0)  # (out · per_kv, d)
        order, b, a = nm_permutation(stacked, n, m, max_rounds)
        before, after = before + b, after + a
        for h in heads:
            perm[h * d:(h + 1) * d] = h * d + order
    return perm, before, after


def permutable_layers(stack: BlockStack, family: Family, config: object, m: int) -> dict[str, PermutationSpace]:
    """The layers whose input order folds into other layers, by name: each block's MLP down projection, and its
    attention output when the family's heads can be reordered and a head's width splits into groups of m."""
    out: dict[str, PermutationSpace] = {}
    n_q = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    for i, _block in enumerate(stack.layers):
        prefix = f"{stack.path}.{i}."
        out[prefix + family.down] = PermutationSpace()
        if family.o is not None and n_q:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q  # type: ignore[attr-defined]
            if head_dim % m == 0 and n_q % n_kv == 0:
                out[prefix + family.o] = PermutationSpace(head_dim=head_dim, n_q=n_q, n_kv=n_kv)
    return out


@torch.no_grad()
def fold_permutations(stack: BlockStack, family: Family, perms: dict[str, torch.Tensor],
                      spaces: dict[str, PermutationSpace], masks: MutableMapping[str, torch.Tensor],
                      replace: Callable[[nn.Parameter, torch.Tensor], object]) -> list[str]:
    """Reorder each permuted layer's input columns by its perm and the rows that make them the same way (gate/up
    or the fused gate_up: both halves; value rows, or the fused qkv's value part, one KV group at a time), their
    biases and masks too: the model computes the same function. ``replace(param, new)`` installs a new tensor.
    Returns the layers reordered."""
    def rows(module: nn.Module, name: str, index: torch.Tensor) -> None:
        replace(module.weight, module.weight.detach().index_select(0, index.to(module.weight.device)))
        if getattr(module, "bias", None) is not None:
            replace(module.bias, module.bias.detach().index_select(0, index.to(module.bias.device)))
        if name in masks:
            masks[name] = masks[name].index_select(0, index.to(masks[name].device))

    def cols(module: nn.Module, name: str, index: torch.Tensor) -> None:
        replace(module.weight, module.weight.detach().index_select(1, index.to(module.weight.device)))
        if name in masks:
            masks[name] = masks[name].index_select(1, index.to(masks[name].device))

    done = []
    for i, block in enumerate(stack.layers):
        prefix = f"{stack.path}.{i}."
        down = prefix + family.down
        if down in perms:
            p = perms[down]
            for name in family.up:
                rows(block.get_submodule(name), prefix + name, p)
            if family.fused_up is not None:  # gate rows, then up rows
                fused = block.get_submodule(family.fused_up)
                rows(fused, prefix + family.fused_up, torch.cat([p, p + fused.out_features // 2]))
            cols(block.get_submodule(family.down), down, p)
            done.append(down)
        o = prefix + family.o if family.o is not None else None
        if o is not None and o in perms:
            space = spaces[o]
            assert space.head_dim is not None and space.n_q is not None and space.n_kv is not None
            p, d, per_kv = perms[o], space.head_dim, space.n_q // space.n_kv
            value_rows = torch.cat([g * d + (p[g * per_kv * d:(g * per_kv + 1) * d] - g * per_kv * d)
                                    for g in range(space.n_kv)])  # each KV group's order, from its first head
            if family.qkv is not None:  # query rows, then key rows, then value rows
                fused = block.get_submodule(family.qkv)
                n_q_rows = space.n_q * d
                n_kv_rows = space.n_kv * d
                ident = torch.arange(n_q_rows + n_kv_rows, dtype=torch.int64)
                rows(fused, prefix + family.qkv, torch.cat([ident, n_q_rows + n_kv_rows + value_rows]))
            else:
                assert family.v is not None
                rows(block.get_submodule(family.v), prefix + family.v, value_rows)
            cols(block.get_submodule(family.o), o, p)
            done.append(o)
    return done
