"""Sub-layer sequential calibration ("true sequential", as GPTQ's reference code calls it) for Llama-style
decoder blocks: one forward of each block instead of two.

Block-sequential calibration (``sequential.py``) runs every block twice: once with dense weights to collect the
statistics of all its Linears, once with pruned weights to produce the next block's inputs. Here a block is
walked site by site, a *site* being the input that a set of Linears reads:

    site 0  attention input    input_layernorm(x)                     -> q_proj, k_proj, v_proj
    site 1  attention output   attention core (before o_proj)         -> o_proj
    site 2  MLP input          post_attention_layernorm(x + o(...))   -> gate_proj, up_proj
    site 3  MLP activation     act(gate(h)) * up(h)                   -> down_proj

Gemma-2/3 blocks norm differently (``block_norms``): the attention output is normed before it joins the residual
stream, the MLP reads ``pre_feedforward_layernorm`` and its output is normed too; the sites are the same.

The statistics of a site are collected on its inputs for all samples, its Linears are pruned, and only then is
the walk advanced past the site with the pruned weights. Each site's statistics therefore come from the already
pruned sites before it (the inputs the layer will see at inference), and each product is computed once.

The walk uses the block's own modules (``self_attn`` with ``o_proj`` passed through, ``mlp`` with ``down_proj``
passed through) and a block is accepted only if walking it reproduces its forward exactly (``check_block``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .blocks import BlockInputs, replaced_forward

__all__ = ["N_SITES", "SITE_NAMES", "block_norms", "block_sites", "check_block", "group_targets_by_site",
           "SublayerCursor"]

N_SITES = 4
SITE_NAMES = ("attention_input", "attention_output", "mlp_input", "mlp_activation")


def block_sites(block: nn.Module) -> list[list[nn.Linear]] | None:
    """The block's Linears grouped by the site they read (see the module docstring), or None when the block is
    not Llama-style (missing parts, or a Linear outside the four sites)."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    o_proj, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
    if not (isinstance(o_proj, nn.Linear) and isinstance(down, nn.Linear) and all(
            isinstance(n, nn.Module) for n in norms)):
        return None
    sites = [[m for m in attn.modules() if isinstance(m, nn.Linear) and m is not o_proj], [o_proj],
             [m for m in mlp.modules() if isinstance(m, nn.Linear) and m is not down], [down]]
    n_linear = sum(isinstance(m, nn.Linear) for m in block.modules())
    if not sites[0] or not sites[2] or sum(len(s) for s in sites) != n_linear:
        return None
    return sites


def block_norms(block: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Module | None]:
    """(attention input norm, attention output norm or None, MLP input norm, MLP output norm or None), found by
    name. Llama style: ``input_layernorm`` before attention, ``post_attention_layernorm`` before the MLP, no
    output norms. Gemma-2/3 style (``pre_feedforward_layernorm`` and ``post_feedforward_layernorm`` present):
    ``post_attention_layernorm`` norms the attention output before it joins the residual stream,
    ``pre_feedforward_layernorm`` the MLP input, ``post_feedforward_layernorm`` the MLP output."""
    pre_ff, post_ff = getattr(block, "pre_feedforward_layernorm", None), getattr(block, "post_feedforward_layernorm",
                                                                                 None)
    if isinstance(pre_ff, nn.Module) and isinstance(post_ff, nn.Module):
        return block.input_layernorm, block.post_attention_layernorm, pre_ff, post_ff
    return block.input_layernorm, None, block.post_attention_layernorm, None


def _passthrough(module: nn.Module):
    """While open, ``module(x)`` returns ``x`` (so a parent's forward hands back the Linear's input)."""
    return replaced_forward(module, lambda x: x)


@dataclass
class SublayerCursor:
    """Where the walk through the decoder stack stands: block ``block``, about to read site ``site``.

    ``hidden`` (N, T, C): the residual stream of all N samples, the block's input at sites 0–1 and x + attention
    at sites 2–3, updated in place. ``carry``: the stored input of site 1 (N, T, C_attn) or site 3 (N, T, I),
    None at sites 0 and 2: a view of the head of ``buffer``, one allocation made when the walk first needs it
    and reused by every site after it, so the walk does not fault fresh pages in (and fragment the heap) twice
    per block. At sites 0 and 2 the tail of ``buffer`` holds the normed inputs that ``site_inputs`` made, for
    the ``step`` after it (``held``). ``batches``: sample ranges run together, with the keyword arguments each
    batch's block call gets.
    """

    block: int
    site: int
    hidden: torch.Tensor
    batches: list[tuple[int, int]]
    kwargs: list[dict[str, Any]]
    carry: torch.Tensor | None = None
    site_passes: int = field(default=0)
    buffer: torch.Tensor | None = None  # (N · T · widest of C, C_attn, I,) flat: ``carry`` and held inputs
    truncated: bool = False  # a step ran only some batches: the walk cannot continue
    held: tuple[int, int] | None = None  # the position whose normed site inputs (sites 0, 2) lie in the buffer

    @classmethod
    def start(cls, inputs: BlockInputs) -> SublayerCursor:
        if any(call.args for call in inputs.calls):
            raise ValueError("the site walk calls attention and MLP by keyword: blocks that take positional "
                             "arguments besides the hidden states need the block walk")
        bounds, n = [], 0
        for h in inputs.hidden:
            bounds.append((n, n + h.shape[0]))
            n += h.shape[0]
        hidden = torch.cat(inputs.hidden) if len(inputs.hidden) > 1 else inputs.hidden[0].clone()
        return cls(block=0, site=0, hidden=hidden, batches=bounds, kwargs=[c.kwargs for c in inputs.calls])

    @property
    def position(self) -> tuple[int, int]:
        return self.block, self.site

    @torch.no_grad()
    def site_inputs(self, layers: nn.ModuleList) -> Iterator[torch.Tensor]:
        """The current site's input per batch: (B, T, C) at sites 0–2, (B, T, I) at site 3.

        Sites 0 and 2 are normed from ``hidden``; the normed inputs are kept in the tail of ``buffer`` (see
        ``_held_view``) so that the ``step`` that follows reads them instead of norming again. They count as held
        only once every batch was yielded (a consumer that stops early leaves nothing held)."""
        blk = layers[self.block]
        self.held = None
        if self.site in (1, 3):
            assert self.carry is not None
            for a, b in self.batches:
                yield self.carry[a:b]
            return
        attn_in, _, mlp_in, _ = block_norms(blk)
        norm = attn_in if self.site == 0 else mlp_in
        held = None
        for a, b in self.batches:
            x = norm(self.hidden[a:b])  # (B, T, C)
            if a == 0:
                held = self._held_view(blk, x)
            if held is not None:
                held[a:b] = x
            yield x
        if held is not None:
            self.held = self.position

    @torch.no_grad()
    def step(self, layers: nn.ModuleList, max_batches: int | None = None) -> None:
        """Run the current site's Linears (with the weights they have now) and move to the next site.

        ``max_batches``: run only the first batches (when nothing downstream needs the rest); the walk then
        ends there — a later step raises.

        The same calls, in the same order, as the block's forward: ``x + o_proj(attn)`` and ``x + down(act)``
        are done in place (float addition commutes, so the result is bitwise the same). Stored site outputs go
        into one buffer kept for the whole walk (``carry``).
        """
        if self.truncated:
            raise RuntimeError(f"the site walk was cut short at {self.position} and cannot go on")
        blk = layers[self.block]
        batches = self.batches if max_batches is None else self.batches[:max_batches]
        self.truncated = len(batches) < len(self.batches)
        if self.site in (0, 2):
            # the normed inputs that site_inputs kept (the same values, bitwise), else normed here
            held = self._held_view(blk, self.hidden) if self.held == self.position else None
            attn_in, _, mlp_in, _ = block_norms(blk)
            norm = attn_in if self.site == 0 else mlp_in
            carry = None
            for (a, b), kw in zip(batches, self.kwargs, strict=False):
                x = held[a:b] if held is not None else norm(self.hidden[a:b])  # (B, T, C)
                if self.site == 0:
                    with _passthrough(blk.self_attn.o_proj):
                        out = _first(blk.self_attn(hidden_states=x, **kw))
                else:
                    with _passthrough(blk.mlp.down_proj):
                        out = blk.mlp(x)
                del x
                if carry is None:
                    carry = self._carry_view(blk, out)
                # batch a:b's stored output may overwrite its own held input (already read), never a later
                # batch's: see _held_view
                carry[a:b] = out
                del out
            self.carry = carry
            self.held = None
        else:
            assert self.carry is not None
            proj = blk.self_attn.o_proj if self.site == 1 else blk.mlp.down_proj
            _, attn_out, _, mlp_out = block_norms(blk)
            out_norm = attn_out if self.site == 1 else mlp_out
            for a, b in batches:
                out = proj(self.carry[a:b])
                self.hidden[a:b].add_(out if out_norm is None else out_norm(out))
            self.carry = None
        self.site_passes += 1
        if self.site == N_SITES - 1:
            self.block, self.site = self.block + 1, 0
        else:
            self.site += 1

    def _buffer_for(self, blk: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
        """``buffer``, (re)made only when missing, smaller than N · T · ``width`` or of another dtype/device than
        ``like``. Sized for the widest of the block's two carries, its hidden size and ``width``."""
        n, t = self.hidden.shape[0], self.hidden.shape[1]
        widths = (blk.self_attn.o_proj.in_features, blk.mlp.down_proj.in_features, self.hidden.shape[-1], width)
        buf = self.buffer
        if buf is None or buf.numel() < n * t * width or buf.dtype != like.dtype or buf.device != like.device:
            self.held = None
            self.buffer = buf = None  # the old one goes before the new one is made
            self.buffer = buf = like.new_empty(n * t * max(widths))
        return buf

    def _carry_view(self, blk: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """(N, *out.shape[1:]) view of the head of ``buffer`` for the site's stored output."""
        shape = (self.hidden.shape[0], *out.shape[1:])
        need = math.prod(shape)
        return self._buffer_for(blk, out.shape[-1], out)[:need].view(shape)

    def _held_view(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """(N, T, C) view of the tail of ``buffer`` for the normed inputs of site 0 or 2 (C = x's width), or None
        when x's dtype is not the buffer's.

        Batch [a, b) is held from element size − (N − a)·T·C on (size = the buffer's length), and its stored
        output, of width W, is written to [a·T·W, b·T·W) of the same buffer (or to a new one): since size ≥ N·T·C
        and size ≥ N·T·W, that ends at or before the held inputs of every later batch, which are still to be read
        (b·T·W ≤ size − (N − b)·T·C)."""
        n, t, c = self.hidden.shape[0], self.hidden.shape[1], x.shape[-1]
        buf = self._buffer_for(blk, c, self.hidden)
        if x.dtype != buf.dtype:
            return None
        return buf[buf.numel() - n * t * c:].view(n, t, c)

    def advance_to(self, layers: nn.ModuleList, block: int, site: int,
                   before_step: Callable[[], None] | None = None) -> None:
        """Step until the cursor stands at (block, site); it never moves backwards. ``before_step`` runs before
        every step (a cancellation check)."""
        if (block, site) < self.position:
            raise ValueError(f"cursor at {self.position} cannot move back to {(block, site)}")
        while self.position < (block, site):
            if before_step is not None:
                before_step()
            self.step(layers)


def _first(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def check_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> float:
    """Largest |difference| between the block's own forward and the site-by-site walk, on one batch (B, T, C).

    0.0 for Llama-style blocks (the walk makes the very same calls); anything else means the block computes
    something the walk does not, and sub-layer calibration must not be used on it.
    """
    reference = _first(block(hidden, **kwargs))
    layers = nn.ModuleList([block])
    cursor = SublayerCursor(block=0, site=0, hidden=hidden.clone(), batches=[(0, hidden.shape[0])],
                            kwargs=[kwargs])
    cursor.advance_to(layers, 1, 0)
    return float((cursor.hidden - reference).abs().max())


def group_targets_by_site(layers: nn.ModuleList, targets: dict[str, nn.Module]
                          ) -> tuple[list[tuple[int, int]], list[list[str]]] | None:
    """((block, site) per layer group, target names per group), in walk order; None when some block is not
    Llama-style. Targets outside the decoder blocks are the caller's concern (block grouping rejects them)."""
    where: dict[int, tuple[int, int]] = {}
    for b, block in enumerate(layers):
        sites = block_sites(block)
        if sites is None:
            return None
        for s, mods in enumerate(sites):
            for m in mods:
                where[id(m)] = (b, s)
    groups: dict[tuple[int, int], list[str]] = {}
    for name, module in targets.items():
        pos = where.get(id(module))
        if pos is None:
            return None
        groups.setdefault(pos, []).append(name)
    positions = sorted(groups)
    return positions, [groups[p] for p in positions]
