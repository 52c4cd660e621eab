"""Structured pruning (config ``structure``): whole blocks, MLP intermediate channels and attention heads removed for
real, the same count in every layer, so the pruned model is an ordinary model of its family with a smaller config
(``num_hidden_layers``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``) that transformers,
vLLM and llama.cpp run faster with no special kernel.

Statistics (Calibrating), summed per calibration batch in float64 and added in batch order, so N processes give one
process's sums bit for bit:

- block influence (ShortGPT): Σ over tokens of 1 − cos(h_in, h_out) of each block — a block that barely turns the
  hidden state does little;
- MLP channels (Minitron): Σ over tokens of a² of each input channel of the MLP's output projection;
- attention heads (Minitron): Σ over tokens and the head's dimensions of o² of the attention output before
  ``o_proj``.

Ranking (Computing Importance): the blocks of least influence go (``depth_mode`` iterative: one at a time, the
influence measured again without the blocks already gone); in every layer the channels, and the heads or KV groups,
with the smallest sums go — the same number in every layer, ties to the lower index. Pruning slices the weights
(``apply_plan``) and writes the new config values; the plan (which blocks, channels and heads were kept) is the
run's artifact, re-applied to a freshly loaded dense model on resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from podar.schemas.config import PruningConfig, StructureConfig
from podar.schemas.errors import ConfigError

from .blocks import BlockStack, _swapped, _trunk, block_output, find_blocks, supported_kwargs
from .walks import added_in_batch_order, plan_mask_groups

__all__ = ["structure_group", "restructure", "Family", "WIDTH_FAMILIES", "HIDDEN_FAMILIES", "BiasSwitch",
           "BIAS_SWITCHES", "Resolved", "resolve", "BatchSums", "collect_sums", "channel_totals", "compensation",
           "compensate", "fluctuation", "fluctuation_scores", "StructurePlan", "plan_structure", "kept_blocks",
           "kept_channels", "kept_heads", "apply_plan", "block_influence", "channel_sums", "head_sums"]


@dataclass(frozen=True)
class Family:
    """Where a block of an architecture keeps what width pruning slices (names relative to the block): the layers
    whose output rows are the MLP's intermediate channels (``up``; ``fused_up``: one layer holding gate rows then up
    rows), the layer whose input columns they are (``down``), and the attention's projections (``q``, ``k``, ``v``,
    or ``qkv`` holding query, key then value rows; ``o``). ``o`` None: heads cannot be removed (``no_heads`` says
    why). ``intermediate_key``: the config field of the MLP width."""

    down: str
    attention: str
    mlp: str
    up: tuple[str, ...] = ()
    fused_up: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None
    intermediate_key: str = "intermediate_size"
    no_heads: str = ""
    norms: tuple[str, ...] = ()  # the block's norms over the hidden channels (hidden pruning: Llama family only)


_LLAMA = Family(up=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", q="self_attn.q_proj",
                k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj", attention="self_attn", mlp="mlp",
                norms=("input_layernorm", "post_attention_layernorm"))
_PHI3 = Family(fused_up="mlp.gate_up_proj", down="mlp.down_proj", qkv="self_attn.qkv_proj", o="self_attn.o_proj",
               attention="self_attn", mlp="mlp")
_GPT2 = Family(up=("mlp.c_fc",), down="mlp.c_proj", attention="attn", mlp="mlp", intermediate_key="n_inner",
               no_heads="GPT-2's head width is hidden_size / n_head by its config, so a head cannot go alone")
# model_type → layout (GPT-2's Conv1D layers are run as nn.Linear, so rows are outputs here too)
WIDTH_FAMILIES: dict[str, Family] = {"llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "phi3": _PHI3,
                                     "gpt2": _GPT2}
# model_type → (the embedding, the final norm, the head) relative to the model: hidden channels go from these and
# from every block (its norms, the input columns of q/k/v and the MLP's up layers, the output rows of o and down)
HIDDEN_FAMILIES: dict[str, tuple[str, str, str]] = {t: ("model.embed_tokens", "model.norm", "lm_head")
                                                    for t in ("llama", "qwen2", "mistral")}
# Config lists with one entry per block, sliced with the blocks; another list of that length is refused.
PER_LAYER_LISTS = ("layer_types",)


@dataclass(frozen=True)
class BiasSwitch:
    """How a model type has the bias that ``structure.bias_compensation`` writes into the layer a removed part fed:
    the config field that gives the layers biases (None: the layer has one by its architecture), and the layers
    (relative to the block) that field gives one, each of which must then hold one."""

    key: str | None
    layers: tuple[str, ...] = ()


# model_type → {"mlp" | "heads": its switch}; a type or a part not here cannot take a bias that transformers loads
BIAS_SWITCHES: dict[str, dict[str, BiasSwitch]] = {
    "llama": {"mlp": BiasSwitch("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
              "heads": BiasSwitch("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj"))},
    "gpt2": {"mlp": BiasSwitch(None)},
}


# ---------------------------------------------------------------- what is removed, checked before any work

@dataclass(frozen=True)
class Resolved:
    """The counts a structure config comes to on one model: blocks removed, MLP channels kept, query heads and KV
    heads kept per layer."""

    blocks: int
    n_blocks: int
    channels_kept: int | None  # None: the MLP is not pruned
    intermediate: int | None
    q_kept: int | None  # None: the heads are not pruned
    kv_kept: int | None
    n_q: int | None
    n_kv: int | None
    head_dim: int | None
    family: Family | None
    stack: BlockStack
    compensate: bool = False  # structure.bias_compensation
    fluctuation: bool = False  # structure.channel_score fluctuation
    hidden_kept: int | None = None  # None: the hidden channels are not pruned
    hidden: int | None = None  # the model's hidden size

    @property
    def first_moments(self) -> bool:
        """Calibrating also sums Σx (and the attention output's Σx² per column)."""
        return self.compensate or self.fluctuation


def _count(value: int | float, total: int) -> int:
    return value if isinstance(value, int) else round(value * total)


def _head_counts(s: StructureConfig, n_q: int, n_kv: int) -> tuple[int, int]:
    """(query heads kept, KV heads kept) per layer; ConfigError when the count breaks the KV grouping."""
    group = n_q // n_kv
    if s.heads_unit == "kv_groups":
        if isinstance(s.heads, float):
            removed_groups = round(s.heads * n_kv)
        elif s.heads % group:
            raise ConfigError(f"structure.heads={s.heads}: heads go a whole KV group of {group} query heads at a time "
                              f"(heads_unit kv_groups; {n_q} query heads, {n_kv} KV heads): use a multiple of {group}, "
                              "or heads_unit: query_per_group")
        else:
            removed_groups = s.heads // group
        if removed_groups < 1 or removed_groups >= n_kv:
            raise ConfigError(f"structure.heads={s.heads} removes {removed_groups} of {n_kv} KV groups; at least one "
                              "must go and one must stay")
        return (n_kv - removed_groups) * group, n_kv - removed_groups
    if isinstance(s.heads, float):
        per_group = round(s.heads * group)
    elif s.heads % n_kv:
        raise ConfigError(f"structure.heads={s.heads}: query_per_group removes the same number of query heads from "
                          f"each of the {n_kv} KV groups: use a multiple of {n_kv}")
    else:
        per_group = s.heads // n_kv
    if per_group < 1 or per_group >= group:
        raise ConfigError(f"structure.heads={s.heads} removes {per_group} of the {group} query heads of each KV group "
                          "(heads_unit query_per_group); at least one must go and one must stay in each group")
    return (group - per_group) * n_kv, n_kv


def resolve(cfg: PruningConfig, model: nn.Module) -> Resolved:
    """The counts ``cfg.structure`` comes to on ``model``; ConfigError naming the field and the model's figure for
    anything that cannot be done: more blocks than exist (or all), a head count that breaks the KV grouping, a width
    rounded to zero, an unknown per-layer config list, width or heads on an architecture not built."""
    s = cfg.structure
    config = model.config
    stack = find_blocks(model, cfg.calibration.blocks)
    if stack is None:
        raise ConfigError(f"structure: {type(model).__name__} has no stack of repeated blocks to remove from")
    n_blocks = len(stack.layers)
    blocks = _count(s.depth, n_blocks) if s.depth else 0
    if s.depth and blocks < 1:
        raise ConfigError(f"structure.depth={s.depth} of {n_blocks} blocks rounds to none removed")
    if blocks >= n_blocks:
        raise ConfigError(f"structure.depth={s.depth} removes {blocks} blocks; the model has {n_blocks} "
                          "(at least one must stay)")
    if getattr(config, "num_hidden_layers", None) != n_blocks:
        raise ConfigError(f"structure: the config's num_hidden_layers ({getattr(config, 'num_hidden_layers', None)}) "
                          f"is not the {n_blocks} blocks of '{stack.path}'; podar cannot rewrite this config")
    if blocks:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ConfigError("structure.depth: this model scales attention by its layer index "
                              "(scale_attn_by_inverse_layer_idx), which renumbering the blocks would change")
        for key, value in config.to_dict().items():
            if isinstance(value, list | tuple) and len(value) == n_blocks and key not in PER_LAYER_LISTS:
                raise ConfigError(f"structure.depth: the config's '{key}' is a list of one entry per block that podar "
                                  f"does not know how to cut (it knows {', '.join(PER_LAYER_LISTS)})")
    family = WIDTH_FAMILIES.get(getattr(config, "model_type", ""))
    if (s.mlp or s.heads) and family is None:
        what = "structure.mlp" if s.mlp else "structure.heads"
        raise ConfigError(f"{what}: width and head pruning are built for {', '.join(sorted(WIDTH_FAMILIES))} "
                          f"(model_type '{getattr(config, 'model_type', None)}' is not: its projections are laid "
                          "out differently); depth works for every block-stacked model")
    if s.heads and family is not None and family.o is None:
        raise ConfigError(f"structure.heads: not for model_type '{config.model_type}': {family.no_heads}")
    channels_kept = intermediate = None
    if s.mlp:
        assert family is not None
        intermediate = int(getattr(config, family.intermediate_key, None) or 4 * config.hidden_size)
        channels_kept = _aligned("mlp", s.mlp, intermediate, s.alignment)
    q_kept = kv_kept = n_q = n_kv = head_dim = None
    if s.heads or s.hidden:  # both write an explicit head_dim (no longer hidden_size / heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // int(config.num_attention_heads))
    if s.heads:
        n_q = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_q)
        q_kept, kv_kept = _head_counts(s, n_q, n_kv)
    hidden_kept = hidden = None
    if s.hidden:
        hidden_kept, hidden = _hidden_counts(s, model, q_kept or int(config.num_attention_heads))
    _check_compensation(cfg, getattr(config, "model_type", None))
    return Resolved(blocks=blocks, n_blocks=n_blocks, channels_kept=channels_kept, intermediate=intermediate,
                    q_kept=q_kept, kv_kept=kv_kept, n_q=n_q, n_kv=n_kv, head_dim=head_dim, family=family, stack=stack,
                    compensate=s.bias_compensation, fluctuation=s.channel_score == "fluctuation",
                    hidden_kept=hidden_kept, hidden=hidden)


def _hidden_counts(s: StructureConfig, model: nn.Module, heads: int) -> tuple[int, int]:
    """(hidden channels kept, the hidden size): a multiple of the alignment and of the query ``heads`` kept (the
    configs of transformers 5 require ``hidden_size`` divisible by ``num_attention_heads``); ConfigError for an
    architecture not built or a width that rounds to zero or to nothing removed."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in HIDDEN_FAMILIES:
        raise ConfigError(f"structure.hidden: hidden (embedding) channels are removed for "
                          f"{', '.join(sorted(HIDDEN_FAMILIES))} (model_type '{model_type}' is not: its norms, "
                          "embeddings or fused projections are laid out differently)")
    embed, norm, _head = HIDDEN_FAMILIES[model_type]
    for path in (embed, norm):
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"structure.hidden: {type(model).__name__} has no '{path}'") from None
    hidden = int(config.hidden_size)
    step = math.lcm(s.alignment, heads)
    why = "" if step == s.alignment else f" (the multiple of structure.alignment={s.alignment} and of the {heads} " \
        "query heads, as transformers requires hidden_size divisible by num_attention_heads)"
    return _aligned("hidden", s.hidden, hidden, step, why), hidden


def _aligned(field: str, fraction: float, width: int, alignment: int, why: str = "") -> int:
    """The channels kept of ``width`` when ``fraction`` go, rounded to a multiple of ``alignment``; ConfigError
    naming ``structure.<field>`` when that is zero or all of them (``why``: how the multiple came about)."""
    kept = round(width * (1.0 - fraction) / alignment) * alignment
    if kept < 1:
        raise ConfigError(f"structure.{field}={fraction} keeps {width * (1 - fraction):.0f} of {width} channels, "
                          f"which rounds to zero at a multiple of {alignment}{why}")
    if kept >= width:
        raise ConfigError(f"structure.{field}={fraction} rounds to no channel removed of {width} at a multiple of "
                          f"{alignment}{why}: raise {field} or lower structure.alignment")
    return kept


def _check_compensation(cfg: PruningConfig, model_type: str | None) -> None:
    """With ``bias_compensation``: ConfigError unless every part removed has a bias the compensation can write, in a
    config transformers loads, and an export format that keeps it."""
    s = cfg.structure
    if not s.bias_compensation:
        return
    if cfg.export.format == "gguf":
        raise ConfigError("structure.bias_compensation with export.format gguf: the biases it adds to the projections "
                          "are not read back by transformers' GGUF loader (the export's check), so the GGUF could not "
                          "be verified; export dense (or pack-quantized), or set bias_compensation false")
    if not (s.mlp or s.heads):
        raise ConfigError("structure.bias_compensation folds the mean output of removed MLP channels and heads into "
                          "a bias; structure removes neither (structure.mlp, structure.heads): set it false")
    switches = BIAS_SWITCHES.get(model_type or "", {})
    for part, field_name, layer in (("mlp", "structure.mlp", "MLP output projection"),
                                    ("heads", "structure.heads", "attention output projection")):
        if getattr(s, part) and part not in switches:
            built = sorted(t for t, parts in BIAS_SWITCHES.items() if part in parts)
            raise ConfigError(f"structure.bias_compensation with {field_name}: model_type '{model_type}' has no bias "
                              f"on its {layer} and no config field that gives one (transformers builds it without), "
                              f"so an export with the compensation would not load; built for {', '.join(built)}: "
                              "set bias_compensation false")


# ---------------------------------------------------------------- statistics

def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Scalar fp64: Σ over tokens of 1 − cos(h_in, h_out); h_in, h_out (B, T, C)."""
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1, eps=1e-12)  # (B, T)
    return (1.0 - cos).sum()


_ROWS = 1024  # tokens squared at a time (float64 copies of at most this many rows)


def channel_sums(x: torch.Tensor) -> torch.Tensor:
    """(C,) fp64: Σ over tokens of x² per channel; x (..., C)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], _ROWS):
        out += flat[start:start + _ROWS].double().square().sum(dim=0)
    return out


def channel_totals(x: torch.Tensor) -> torch.Tensor:
    """(C,) fp64: Σ over tokens of x per channel (the first moment bias compensation needs); x (..., C)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], _ROWS):
        out += flat[start:start + _ROWS].double().sum(dim=0)
    return out


def head_sums(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H,) fp64: Σ over tokens and the head's dimensions of x² per head; x (..., H·d), heads contiguous."""
    return per_head(channel_sums(x), n_heads)


def per_head(columns: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H,): per-column sums (H·d,), heads contiguous, added up per head."""
    return columns.view(n_heads, -1).sum(dim=1)


@dataclass
class BatchSums:
    """One calibration batch's sums: influence (L,) fp64 (NaN for a block not run), channels (L, I) and heads (L, H)
    fp64 or None, tokens; with bias compensation the first moments Σx of the MLP output projection's inputs (L, I)
    and of the attention output projection's (L, H·d), and the latter's Σx² per column (L, H·d), else None."""

    influence: torch.Tensor
    channels: torch.Tensor | None
    heads: torch.Tensor | None
    tokens: int
    channel_first: torch.Tensor | None = None
    head_first: torch.Tensor | None = None
    head_columns: torch.Tensor | None = None  # Σx² per column of the attention output projection's input (L, H·d)
    hidden: torch.Tensor | None = None  # Σ over tokens of each block's norms' outputs² per hidden channel (L, C)


@contextmanager
def _hooks(blocks: list[tuple[int, nn.Module]], family: Family | None, width: tuple[bool, bool, bool],
           n_heads: int | None,
           sink: dict[str, dict[int, torch.Tensor]], first: bool) -> Iterator[None]:
    handles = []

    def on_block(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            sink["influence"][i] = block_influence(h_in, block_output(out))
        return hook

    def on_input(kind: str, i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            squares = channel_sums(x)  # once: a head's sum (head_sums) is its columns'
            sink[kind][i] = squares if kind == "channels" else per_head(squares, n_heads or 1)
            if first:
                sink[f"{kind}_first"][i] = channel_totals(x)
                if kind == "heads":
                    sink["head_columns"][i] = squares
        return hook

    def on_norm(i: int) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            squares = channel_sums(out.detach())
            sink["hidden"][i] = squares if i not in sink["hidden"] else sink["hidden"][i] + squares
        return hook

    try:
        for i, block in blocks:
            handles.append(block.register_forward_hook(on_block(i), with_kwargs=True))
            if family is not None and width[0]:
                handles.append(block.get_submodule(family.down).register_forward_pre_hook(on_input("channels", i)))
            if family is not None and width[1] and family.o is not None:
                handles.append(block.get_submodule(family.o).register_forward_pre_hook(on_input("heads", i)))
            if family is not None and width[2]:  # the block's norms, in the order they run
                for name in family.norms:
                    handles.append(block.get_submodule(name).register_forward_hook(on_norm(i)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_sums(model: nn.Module, stack: BlockStack, samples: torch.Tensor, batches: list[int], batch_size: int,
                 device: torch.device | str, *, kept: list[int], family: Family | None,
                 width: tuple[bool, bool, bool],
                 n_heads: int | None, first: bool = False, check: Callable[[], None] = lambda: None
                 ) -> list[BatchSums]:
    """The sums of calibration ``batches`` (indices into ``samples`` (N, T) cut in batches of ``batch_size``), the
    model run with only the blocks ``kept`` (dense indices); ``width``: (MLP channels, heads, hidden) also summed;
    ``first``: their first moments too."""
    n_blocks = len(stack.layers)
    running = [(i, stack.layers[i]) for i in kept]
    trunk = _trunk(model, stack)
    out = []
    replacement = nn.ModuleList([b for _, b in running])
    with _swapped(model, stack.path, replacement) if len(kept) < n_blocks else nullcontext():
        for b in batches:
            check()
            batch = samples[b * batch_size:(b + 1) * batch_size].to(device)  # (B, T)
            sink: dict[str, dict[int, torch.Tensor]] = {"influence": {}, "channels": {}, "heads": {},
                                                        "channels_first": {}, "heads_first": {}, "head_columns": {},
                                                        "hidden": {}}
            with _hooks(running, family, width, n_heads, sink, first):
                trunk(input_ids=batch, **supported_kwargs(trunk, use_cache=False))
            influence = torch.full((n_blocks,), float("nan"), dtype=torch.float64)
            for i, v in sink["influence"].items():
                influence[i] = v.cpu()
            out.append(BatchSums(influence=influence, tokens=int(batch.numel()),
                                 channels=_stacked(sink["channels"], kept) if width[0] else None,
                                 heads=_stacked(sink["heads"], kept) if width[1] else None,
                                 channel_first=_stacked(sink["channels_first"], kept) if first and width[0] else None,
                                 head_first=_stacked(sink["heads_first"], kept) if first and width[1] else None,
                                 head_columns=_stacked(sink["head_columns"], kept) if first and width[1] else None,
                                 hidden=_stacked(sink["hidden"], kept) if width[2] else None))
    return out


def _stacked(by_block: dict[int, torch.Tensor], kept: list[int]) -> torch.Tensor:
    return torch.stack([by_block[i].cpu() for i in kept])


# ---------------------------------------------------------------- ranking

def _lowest_first(scores: torch.Tensor) -> list[int]:
    """Indices by ascending score, ties to the lower index first."""
    return torch.sort(scores, stable=True).indices.tolist()


def kept_blocks(influence: torch.Tensor, n_remove: int) -> list[int]:
    """The blocks kept (ascending dense indices) when the ``n_remove`` of least influence (L,) go."""
    gone = set(_lowest_first(influence)[:n_remove])
    return [i for i in range(influence.shape[0]) if i not in gone]


def kept_channels(sums: torch.Tensor, n_keep: int) -> list[int]:
    """The ``n_keep`` channels of largest sum (C,), ascending; ties to the lower index."""
    order = torch.sort(-sums, stable=True).indices[:n_keep]
    return sorted(order.tolist())


def kept_heads(sums: torch.Tensor, n_kv: int, q_keep: int, kv_keep: int) -> tuple[list[int], list[int]]:
    """(query heads kept, KV heads kept), ascending, from the per-head sums (H,) of one layer: whole KV groups by
    the sum of their query heads' sums (``kv_keep`` < n_kv), or within every group its largest query heads."""
    n_q = sums.shape[0]
    group = n_q // n_kv
    if kv_keep < n_kv:
        kv = kept_channels(sums.view(n_kv, group).sum(dim=1), kv_keep)
        return [g * group + j for g in kv for j in range(group)], kv
    per_group = q_keep // n_kv
    q = [g * group + j for g in range(n_kv) for j in kept_channels(sums[g * group:(g + 1) * group], per_group)]
    return q, list(range(n_kv))


# the plan's parts in its artifact: name → dtype of its tensors (one per kept block)
_PLAN_KINDS = {"channels": torch.int64, "q_heads": torch.int64, "kv_heads": torch.int64, "mlp_bias": torch.float64,
               "o_bias": torch.float64}


@dataclass(frozen=True)
class StructurePlan:
    """Which blocks (dense indices, ascending), and in each kept block which MLP channels and query / KV heads,
    stay; which hidden channels stay (in every layer); the config values the pruned model has; with bias
    compensation, the amount (dense hidden size,) added to the bias of each kept block's MLP output projection and
    attention output projection."""

    blocks: list[int]
    channels: dict[int, list[int]] = field(default_factory=dict)
    q_heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    head_dim: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    mlp_bias: dict[int, list[float]] = field(default_factory=dict)
    o_bias: dict[int, list[float]] = field(default_factory=dict)
    hidden: list[int] = field(default_factory=list)  # the hidden channels kept, the same in every layer ([]: all)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata of a safetensors artifact."""
        tensors = {"blocks": torch.tensor(self.blocks, dtype=torch.int64)}
        if self.hidden:
            tensors["hidden"] = torch.tensor(self.hidden, dtype=torch.int64)
        for kind, dtype in _PLAN_KINDS.items():
            for i, kept in getattr(self, kind).items():
                tensors[f"{kind}.{i}"] = torch.tensor(kept, dtype=dtype)
        return tensors, {"config": json.dumps(self.config, sort_keys=True), "head_dim": str(self.head_dim or "")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> StructurePlan:
        parts: dict[str, dict[int, list]] = {kind: {} for kind in _PLAN_KINDS}
        for key, value in tensors.items():
            if key not in ("blocks", "hidden"):
                kind, index = key.rsplit(".", 1)
                parts[kind][int(index)] = value.tolist()
        head_dim = metadata.get("head_dim") or None
        return cls(blocks=tensors["blocks"].tolist(), **parts, head_dim=int(head_dim) if head_dim else None,
                   config=json.loads(metadata["config"]),
                   hidden=tensors["hidden"].tolist() if "hidden" in tensors else [])


def compensation(weight: torch.Tensor, kept: list[int], first: torch.Tensor, tokens: int) -> list[float]:
    """FLAP's bias compensation: the mean output W[:, removed] · E[x][removed] (out,) of the input columns not
    ``kept``, in fp64, which a bias adds back once they are gone; weight (out, in), first (in,) Σx over ``tokens``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[torch.tensor(kept, dtype=torch.int64)] = False
    mean = first.double().cpu() / max(tokens, 1)
    w = weight.detach().double().cpu()
    return (w[:, removed] @ mean[removed]).tolist()


def fluctuation(squares: torch.Tensor, first: torch.Tensor, tokens: int, weight: torch.Tensor) -> torch.Tensor:
    """(C,) fp64: FLAP's fluctuation Var(x_c) · ‖W[:, c]‖² of each input column c of a layer — the squared error
    its removal leaves once its mean is compensated; squares, first (C,) Σx², Σx over ``tokens``; weight (out, C)."""
    n = max(tokens, 1)
    mean = first.double().cpu() / n
    var = (squares.double().cpu() / n - mean.square()).clamp_min(0.0)
    return var * weight.detach().double().cpu().square().sum(dim=0)


def fluctuation_scores(r: Resolved, sums: Sums) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(channels (L, I), heads (L, H)) fp64 fluctuation scores of every dense block, from the sums and the dense
    weights of the layers the parts feed (None where not pruned); a head's is the sum of its columns'."""
    assert r.family is not None
    channels = heads = None
    if sums.channels is not None:
        assert sums.channel_first is not None
        channels = torch.stack([fluctuation(sums.channels[i], sums.channel_first[i], sums.tokens,
                                            r.stack.layers[i].get_submodule(r.family.down).weight)
                                for i in range(r.n_blocks)])
    if sums.heads is not None:
        assert sums.head_columns is not None and sums.head_first is not None and r.family.o is not None
        assert r.n_q is not None
        heads = torch.stack([per_head(fluctuation(sums.head_columns[i], sums.head_first[i], sums.tokens,
                                                  r.stack.layers[i].get_submodule(r.family.o).weight), r.n_q)
                             for i in range(r.n_blocks)])
    return channels, heads


def compensate(plan: StructurePlan, r: Resolved, sums: Sums, model_type: str) -> None:
    """Fill ``plan``'s biases from the dense blocks' weights and the first moments in ``sums``, and switch on the
    config fields that give the layers biases (``BIAS_SWITCHES``)."""
    assert r.family is not None
    switches = BIAS_SWITCHES[model_type]
    for i in plan.blocks:
        block = r.stack.layers[i]
        if i in plan.channels and sums.channel_first is not None:
            plan.mlp_bias[i] = compensation(block.get_submodule(r.family.down).weight, plan.channels[i],
                                            sums.channel_first[i], sums.tokens)
        if i in plan.q_heads and sums.head_first is not None:
            assert r.family.o is not None and plan.head_dim is not None
            plan.o_bias[i] = compensation(block.get_submodule(r.family.o).weight,
                                          _head_rows(plan.q_heads[i], plan.head_dim).tolist(), sums.head_first[i],
                                          sums.tokens)
    for part, values in (("mlp", plan.mlp_bias), ("heads", plan.o_bias)):
        key = switches[part].key if part in switches else None
        if values and key is not None:
            plan.config[key] = True


def plan_structure(r: Resolved, influence: torch.Tensor, removal_order: list[int] | None,
                   channels: torch.Tensor | None, heads: torch.Tensor | None,
                   hidden: torch.Tensor | None = None) -> StructurePlan:
    """The plan from the summed statistics: influence (L,), channels (L, I), heads (L, H) and hidden channels
    (L, C) of every dense block; ``removal_order``: the iterative mode's blocks, in the order they went (their count
    is ``r.blocks``). The hidden channels kept are those of largest sum over the kept blocks (Minitron: the norms'
    outputs, added over layers)."""
    if removal_order is not None:
        blocks = [i for i in range(r.n_blocks) if i not in set(removal_order[:r.blocks])]
    else:
        blocks = kept_blocks(influence, r.blocks)
    config: dict[str, Any] = {"num_hidden_layers": len(blocks)}
    plan = StructurePlan(blocks=blocks, head_dim=r.head_dim, config=config)
    if r.channels_kept is not None:
        assert channels is not None and r.family is not None
        for i in blocks:
            plan.channels[i] = kept_channels(channels[i], r.channels_kept)
        config[r.family.intermediate_key] = r.channels_kept
    if r.q_kept is not None:
        assert heads is not None and r.n_kv is not None and r.kv_kept is not None
        for i in blocks:
            plan.q_heads[i], plan.kv_heads[i] = kept_heads(heads[i], r.n_kv, r.q_kept, r.kv_kept)
        config.update(num_attention_heads=r.q_kept, num_key_value_heads=r.kv_kept, head_dim=r.head_dim)
    if r.hidden_kept is not None:
        assert hidden is not None
        total = hidden[torch.tensor(blocks, dtype=torch.int64)].sum(dim=0)
        plan.hidden.extend(kept_channels(total, r.hidden_kept))
        config.update(hidden_size=r.hidden_kept, head_dim=r.head_dim)  # head_dim no longer hidden / heads
    return plan


# ---------------------------------------------------------------- the surgery

def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """``linear`` with only the output ``rows`` and input ``cols`` kept (new tensors; the old ones are let go)."""
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    linear.weight = nn.Parameter(w.contiguous(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None and rows is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, rows.to(w.device)).contiguous(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = w.shape


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.int64)


def _with_bias(linear: nn.Linear, amount: list[float] | None = None) -> None:
    """``linear`` with a bias (zeros where it had none) plus ``amount``, in its weight's dtype."""
    w = linear.weight
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if linear.bias is None else linear.bias.detach().double().cpu()
    if amount is not None:
        bias = bias + torch.tensor(amount, dtype=torch.float64)
    if linear.bias is None or amount is not None:
        linear.bias = nn.Parameter(bias.to(dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)


def _compensated(block: nn.Module, family: Family | None, switches: dict[str, BiasSwitch], plan: StructurePlan,
                 i: int) -> None:
    """Block ``i``'s compensation biases added (``plan.mlp_bias``, ``plan.o_bias``), and zero biases on the other
    layers the config switch gives one."""
    if family is None:
        return
    for part, values, name in (("mlp", plan.mlp_bias, family.down), ("heads", plan.o_bias, family.o)):
        if i in values:
            assert name is not None
            for other in switches[part].layers if part in switches else ():
                if other != name:  # zero biases; the compensated layer gets its own below
                    _with_bias(block.get_submodule(other))
            _with_bias(block.get_submodule(name), values[i])


def _norm_sliced(norm: nn.Module, keep: torch.Tensor) -> None:
    """A norm over the hidden channels with only ``keep`` (its weight, and bias if any)."""
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if isinstance(p, nn.Parameter):
            setattr(norm, name, nn.Parameter(p.detach().index_select(0, keep.to(p.device)).contiguous(),
                                             requires_grad=p.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (len(keep),)


def _hidden_sliced(model: nn.Module, blocks: list[nn.Module], family: Family, keep: torch.Tensor) -> None:
    """Only the hidden channels ``keep`` in the embedding, every block (norms; q/k/v and the MLP's up layers' input
    columns; o's and down's output rows and biases) and the final norm and head (re-tied to the embedding where it
    was tied)."""
    embed_path, norm_path, head_path = HIDDEN_FAMILIES[model.config.model_type]
    embed = model.get_submodule(embed_path)
    head = model.get_submodule(head_path) if hasattr(model, head_path.split(".")[0]) else None
    tied = head is not None and head.weight is embed.weight
    for block in blocks:
        for name in family.norms:
            _norm_sliced(block.get_submodule(name), keep)
        for name in (family.q, family.k, family.v, *family.up):
            assert name is not None
            _sliced(block.get_submodule(name), cols=keep)
        for name in (family.o, family.down):
            assert name is not None
            _sliced(block.get_submodule(name), rows=keep)
        _set_if_present(block.get_submodule(family.mlp), hidden_size=len(keep))
        _set_if_present(block.get_submodule(family.attention), hidden_size=len(keep))
    w = embed.weight.detach().index_select(1, keep.to(embed.weight.device)).contiguous()
    embed.weight = nn.Parameter(w, requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = len(keep)
    _norm_sliced(model.get_submodule(norm_path), keep)
    if head is not None:
        if tied:
            head.weight = embed.weight
            head.in_features = len(keep)
        else:
            _sliced(head, cols=keep)


def _set_if_present(module: nn.Module, **values: int) -> None:
    for key, value in values.items():
        if hasattr(module, key):
            setattr(module, key, value)


def _block_sliced(block: nn.Module, family: Family | None, plan: StructurePlan, i: int) -> None:
    """Dense block ``i`` with only the plan's MLP channels and heads."""
    if i in plan.channels:
        assert family is not None
        keep = torch.tensor(plan.channels[i], dtype=torch.int64)
        for name in family.up:
            _sliced(block.get_submodule(name), rows=keep)
        if family.fused_up is not None:  # gate rows, then up rows
            fused = block.get_submodule(family.fused_up)
            _sliced(fused, rows=torch.cat([keep, keep + fused.out_features // 2]))
        _sliced(block.get_submodule(family.down), cols=keep)
        _set_if_present(block.get_submodule(family.mlp), intermediate_size=len(keep))
    if i in plan.q_heads:
        assert family is not None and plan.head_dim is not None and family.o is not None
        q_rows = _head_rows(plan.q_heads[i], plan.head_dim)
        kv_rows = _head_rows(plan.kv_heads[i], plan.head_dim)
        if family.qkv is not None:  # query rows, then key rows, then value rows
            fused = block.get_submodule(family.qkv)
            n_q_rows = block.get_submodule(family.o).in_features
            n_kv_rows = (fused.out_features - n_q_rows) // 2
            _sliced(fused, rows=torch.cat([q_rows, n_q_rows + kv_rows, n_q_rows + n_kv_rows + kv_rows]))
        else:
            assert family.q is not None and family.k is not None and family.v is not None
            _sliced(block.get_submodule(family.q), rows=q_rows)
            _sliced(block.get_submodule(family.k), rows=kv_rows)
            _sliced(block.get_submodule(family.v), rows=kv_rows)
        _sliced(block.get_submodule(family.o), cols=q_rows)
        n_q, n_kv = len(plan.q_heads[i]), len(plan.kv_heads[i])
        attention = block.get_submodule(family.attention)
        attention.num_key_value_groups = n_q // n_kv
        _set_if_present(attention, num_heads=n_q, num_attention_heads=n_q, num_key_value_heads=n_kv,
                        head_dim=plan.head_dim)


@torch.no_grad()
def apply_plan(model: nn.Module, stack: BlockStack, family: Family | None, plan: StructurePlan) -> nn.ModuleList:
    """Slice the kept blocks' MLP channels and heads (and the hidden channels everywhere), drop the other blocks,
    renumber what indexes layers (``layer_idx``, for the KV cache) and write the new config values. Returns the new
    block list."""
    config = model.config
    for i in plan.blocks:
        _block_sliced(stack.layers[i], family, plan, i)
        _compensated(stack.layers[i], family, BIAS_SWITCHES.get(getattr(config, "model_type", ""), {}), plan, i)
    if plan.hidden:  # after the compensation: its biases are (dense hidden,) and are sliced with o and down
        assert family is not None
        _hidden_sliced(model, [stack.layers[i] for i in plan.blocks], family, torch.tensor(plan.hidden,
                                                                                         dtype=torch.int64))
    new = nn.ModuleList([stack.layers[i] for i in plan.blocks])
    if len(plan.blocks) < len(stack.layers):
        for j, (i, block) in enumerate(zip(plan.blocks, new, strict=True)):
            for module in block.modules():
                if getattr(module, "layer_idx", None) == i:
                    module.layer_idx = j
        for key in PER_LAYER_LISTS:
            value = getattr(config, key, None)
            if isinstance(value, list | tuple) and len(value) == len(stack.layers):
                setattr(config, key, [value[i] for i in plan.blocks])
        parent_path, _, leaf = stack.path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
    for key, value in plan.config.items():
        setattr(config, key, value)
    trunk = _trunk(model, BlockStack(stack.path, new))
    if hasattr(trunk, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        trunk.has_sliding_layers = "sliding_attention" in config.layer_types
    return new


# ---------------------------------------------------------------- the stages' work (called by their handlers)

STRUCTURE_KIND = "structure"  # the artifact: the plan (kept blocks, channels, heads) and the new config values


@dataclass
class Sums:
    """The statistics of the whole calibration set: influence (L,), channels (L, I) and heads (L, H) fp64 of every
    dense block (None where not pruned), tokens, and the iterative mode's blocks in the order they went."""

    influence: torch.Tensor
    channels: torch.Tensor | None
    heads: torch.Tensor | None
    tokens: int
    removal_order: list[int] | None = None
    passes: int = 1
    channel_first: torch.Tensor | None = None  # bias compensation: Σx per MLP channel (L, I)
    head_first: torch.Tensor | None = None  # and per column of the attention output projection's input (L, H·d)
    head_columns: torch.Tensor | None = None  # Σx² per column of that input (L, H·d)
    hidden: torch.Tensor | None = None  # Σ of the block norms' outputs² per hidden channel (L, C)


def _ordered(ctx: Any, rows: list[torch.Tensor], shape: tuple[int, ...], mine: list[int], n: int) -> torch.Tensor:
    """Every process's per-batch ``rows`` (each ``shape``) added in global batch order."""
    local = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=torch.float64)
    return added_in_batch_order(local, mine, n, ctx.dist)


def indices_text(values: list[int]) -> str:
    """Indices as a metric value: '0,2,3'."""
    return ",".join(str(v) for v in values)


def calibrate(ctx: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Calibrating for structure: the sums of every calibration batch (this process's share), added in batch order
    over processes; ``depth_mode`` iterative: the model run again without each block that went. Sets
    ``state.structure_sums``; returns the stage's metrics and each block's (its mean influence per token)."""
    cfg, st = ctx.config, ctx.state
    r = resolve(cfg, ctx.model)
    samples = st.calibration_samples
    bs = cfg.calibration.batch_size
    n_batches = -(-samples.shape[0] // bs)
    mine = ctx.dist.shares(n_batches)
    width = (r.channels_kept is not None, r.q_kept is not None, r.hidden_kept is not None)
    L = r.n_blocks

    def sums(kept: list[int], width: tuple[bool, bool, bool]) -> Sums:
        first = r.first_moments and any(width[:2])
        parts = collect_sums(ctx.model, r.stack, samples, mine, bs, ctx.device, kept=kept, family=r.family,
                             width=width, n_heads=r.n_q, first=first, check=ctx.check_cancelled)
        out = Sums(influence=_ordered(ctx, [p.influence for p in parts], (L,), mine, n_batches), channels=None,
                   heads=None, tokens=int(ctx.dist.sum(torch.tensor([sum(p.tokens for p in parts)],
                                                                    dtype=torch.int64)).item()))
        if width[0]:
            assert r.intermediate is not None
            out.channels = _ordered(ctx, [p.channels for p in parts], (L, r.intermediate), mine, n_batches)
            if first:
                out.channel_first = _ordered(ctx, [p.channel_first for p in parts], (L, r.intermediate), mine,
                                             n_batches)
        if width[2]:
            assert r.hidden is not None
            out.hidden = _ordered(ctx, [p.hidden for p in parts], (L, r.hidden), mine, n_batches)
        if width[1]:
            assert r.n_q is not None and r.head_dim is not None
            out.heads = _ordered(ctx, [p.heads for p in parts], (L, r.n_q), mine, n_batches)
            if first:
                out.head_first = _ordered(ctx, [p.head_first for p in parts], (L, r.n_q * r.head_dim), mine,
                                          n_batches)
                out.head_columns = _ordered(ctx, [p.head_columns for p in parts], (L, r.n_q * r.head_dim), mine,
                                            n_batches)
        return out

    everything = list(range(L))
    out = sums(everything, width)
    influence, tokens = out.influence, out.tokens
    if cfg.structure.depth_mode == "iterative" and r.blocks:
        order, kept, current = [], everything, influence
        for _ in range(r.blocks):
            gone = min(kept, key=lambda i: (float(current[i]), i))
            order.append(gone)
            kept = [i for i in kept if i != gone]
            if len(order) < r.blocks:
                current = sums(kept, (False, False, False)).influence
                out.passes += 1
        out.removal_order = order
    st.structure_sums = out
    per_block = {f"{r.stack.path}.{i}": {"influence": float(influence[i]) / max(tokens, 1)} for i in range(L)}
    return {"structure_passes": out.passes, "tokens": tokens, "blocks": L,
            **({"removal_order": indices_text(out.removal_order)} if out.removal_order is not None else {})}, per_block


def rank(ctx: Any) -> dict[str, Any]:
    """Computing Importance for structure: the plan from the summed statistics (``state.structure_plan``)."""
    st = ctx.state
    r = resolve(ctx.config, ctx.model)
    s = st.structure_sums
    if s is None:
        raise ConfigError("structure: no calibration statistics (Calibrating did not run)")
    channels, heads = (fluctuation_scores(r, s) if r.fluctuation else (s.channels, s.heads))
    plan = plan_structure(r, s.influence, s.removal_order, channels, heads, s.hidden)
    if r.compensate:
        compensate(plan, r, s, ctx.model.config.model_type)
    st.structure_plan = plan
    return {"blocks_kept": indices_text(plan.blocks),
            "blocks_removed": indices_text([i for i in range(r.n_blocks) if i not in plan.blocks]), **plan.config}


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, each tied tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def renamed(names: list[str], path: str, blocks: list[int]) -> list[str]:
    """Module ``names`` as they are once only ``blocks`` of the stack at ``path`` stay (renumbered from 0); the
    names inside a removed block are gone."""
    new_index = {old: new for new, old in enumerate(blocks)}
    prefix = f"{path}."
    out = []
    for name in names:
        if not name.startswith(prefix):
            out.append(name)
            continue
        index, _, rest = name[len(prefix):].partition(".")
        if int(index) in new_index:
            out.append(f"{prefix}{new_index[int(index)]}" + (f".{rest}" if rest else ""))
    return out


def structure_group(ctx: Any) -> bool:
    """True in the run's structure group: the first of its one round when ``structure`` removes anything (the
    groups after it, in a run with ``target_sparsity`` > 0, are the masks' on what remains)."""
    return bool(ctx.config.structure.enabled) and ctx.state.group_index == 0


def restructure(ctx: Any, plan: StructurePlan) -> None:
    """Apply ``plan`` to the run's (dense) model, keeping a dense copy first as the reference that evaluation and
    distillation compare with (``state.dense_model``), and re-resolve the targets (their names and shapes changed).
    With ``target_sparsity`` > 0 the masks' layer groups are planned on what remains, after the structure group,
    and the remaining targets' weights, before any mask, are the walk's dense reference (a copy in memory)."""
    import copy

    from .targets import resolve_targets

    st = ctx.state
    r = resolve(ctx.config, ctx.model)
    if st.dense_model is None:
        st.dense_model = copy.deepcopy(ctx.model).eval()
        for p in st.dense_model.parameters():
            p.requires_grad_(False)
    st.converted = renamed(st.converted, r.stack.path, plan.blocks)
    apply_plan(ctx.model, r.stack, r.family, plan)
    st.structure_plan = plan
    st.targets, _ = resolve_targets(ctx.model, ctx.config)
    st.layer_groups = [list(st.targets)]
    if ctx.config.target_sparsity > 0:
        st.dense_weights = {n: m.weight.detach().clone() for n, m in st.targets.items()}
        plan_mask_groups(ctx, before=[list(st.targets)])
