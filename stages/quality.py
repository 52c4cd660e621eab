"""Quality of a pruned model against its dense reference, on the same token windows.

- Perplexity: the papers' protocol (windows of T tokens, NLL of tokens 1..T-1, exp of the token mean).
- KL(dense ‖ pruned) of the next-token distributions, averaged over every predicted position, and the top-1
  agreement (the pruned model's argmax equals the dense model's). Both need no labels.

The dense side is kept compactly (so it can be cached and reused): per window the NLL sum, and per position the
dense model's top-k token ids with their log-probabilities. KL is computed over those k tokens plus one bucket
holding the remaining probability mass: exact when k covers the vocabulary (``kl_top_k=None``), otherwise the KL
of the two distributions coarse-grained the same way — a lower bound of the full KL that tightens as k grows.
All accumulation is fp32 per position and fp64 across positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from podar.engine.compute import while_running
from podar.schemas.errors import StageError

__all__ = ["TextMetrics", "Fidelity", "dense_reference", "compare_to_reference", "kl_and_agreement", "evaluate",
           "kl_top_k", "head_splits", "next_token_stats", "NextTokenStats", "nll_of",
           "final_hidden", "hidden_states", "fidelity"]


@dataclass(frozen=True)
class TextMetrics:
    """Metrics of one model on one text. ``kl_mean``/``top1_agreement`` are None without a reference."""

    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    seq_len: int
    kl_mean: float | None = None
    top1_agreement: float | None = None
    kl_sum: float | None = None  # Σ KL over every predicted position, nats
    agree_count: int | None = None  # positions whose argmax agrees

    def summed(self, dist: Any) -> TextMetrics:
        """These metrics of one process's windows added up with every other process's (``engine.distributed``):
        sums and counts, then the means and the perplexity. One process: itself."""
        if dist.world == 1:
            return self
        ref = self.kl_sum is not None
        nll, tokens, windows, kl, agree = dist.sum_floats([self.nll_sum, self.n_tokens, self.n_windows,
                                                          self.kl_sum or 0.0, self.agree_count or 0])
        return TextMetrics(ppl=math.exp(nll / tokens), nll_sum=nll, n_tokens=int(tokens), n_windows=int(windows),
                           seq_len=self.seq_len, kl_mean=kl / tokens if ref else None,
                           top1_agreement=agree / tokens if ref else None, kl_sum=kl if ref else None,
                           agree_count=int(agree) if ref else None)


_CHUNK_BYTES = 32 << 20  # float32 logits of at most this many bytes at a time (a block of positions × vocabulary rows)
_ALL = 1 << 62  # top_k of "every token"
_PROBE_ROWS = 1024  # head_splits compares the model's logits and the split head's on this many tokens
_MIN_VOCAB_CHUNK = 2048  # vocabulary rows per head product at least (fewer read the head's weight too often)
Release = Callable[[torch.Tensor], None]  # told that a part of a weight was read (and may leave memory)


def nll_of(stats: NextTokenStats) -> torch.Tensor:
    """nll: (B,) fp64 — summed NLL of the tokens that follow each predicting position (what cross-entropy computes),
    from the logits' ``NextTokenStats``."""
    return (stats.lse - stats.target.double()).sum(dim=1)


def _softcap(config: Any) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _head_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(the model without its LM head, the head as a function of its last hidden states), when the model has the
    usual layout (a base model under ``base_model_prefix`` and output embeddings); None otherwise."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or not isinstance(head, torch.nn.Linear):
        return None
    cap = _softcap(getattr(model, "config", None))

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        return logits if cap is None else torch.tanh(logits / cap) * cap

    return base, apply


def head_splits(model: torch.nn.Module, probe: torch.Tensor, release: Release | None = None) -> bool:
    """Whether the head applied to the base model's last hidden states gives the model's own logits on ``probe``
    (1, t): a model that scales or post-processes its logits otherwise is computed whole. Compared on the head's
    first ``_PROBE_ROWS`` tokens (the head computes with those rows only, in both passes), so the check reads
    little of a large head; ``release(rows)`` is told that those rows were read (see ``_logit_blocks``)."""
    parts = _head_parts(model)
    if parts is None:
        return False
    base, apply = parts
    head = model.get_output_embeddings()
    rows = min(head.weight.shape[0], _PROBE_ROWS)

    def first_rows(_name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        own = {"weight": module.weight[:rows]}
        return own if module.bias is None else {**own, "bias": module.bias[:rows]}

    with while_running({"head": head}, first_rows):
        whole = model(input_ids=probe, use_cache=False).logits.float()
        split = apply(base(input_ids=probe, use_cache=False).last_hidden_state)
    if release is not None:
        release(head.weight[:rows])
    return whole.shape == split.shape and torch.allclose(split, whole, rtol=1e-5, atol=1e-5)


@dataclass
class NextTokenStats:
    """What the quality checks need of a model's next-token logits at the predicting positions 0..T-2 of a batch
    (B, T), taken over the vocabulary a chunk at a time: ``lse`` (B, T-1) fp64 logsumexp over the vocabulary (so
    log p(v) = logit(v) − lse); ``vocab`` its size; ``target`` (B, T-1) fp32 the logit of the token that follows;
    ``top_ids`` / ``top_values`` (B, T-1, k) int64 / fp32 the k largest logits, largest first (k = 0 when not asked);
    ``at`` (B, T-1, j) fp32 the logits of the asked ids; ``argmax`` (B, T-1) int64 (the first of equal maxima);
    ``max_abs`` the largest |logit|; ``nonfinite`` how many logits are NaN or inf."""

    lse: torch.Tensor
    vocab: int
    target: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor
    at: torch.Tensor
    argmax: torch.Tensor
    max_abs: float
    nonfinite: int




def _logit_blocks(model: torch.nn.Module, batch: torch.Tensor, split: bool, chunk_bytes: int | None,
                  release: Release | None = None) -> Iterator[tuple[slice, Iterator[tuple[int, torch.Tensor]]]]:
    """(positions, chunks): the predicting positions of ``batch`` (B, T) a block at a time, and for each block its
    logits over the vocabulary a chunk at a time, (first vocabulary id, logits (B, P, Vc) fp32). With ``split`` the
    head's rows are applied to the last hidden states a chunk at a time (each row of the head read once per block
    of positions; a chunk at most ``chunk_bytes``, or ``_MIN_VOCAB_CHUNK`` rows for one position); without, the
    model's whole logits are one block and one chunk. ``release(rows)`` is called with each chunk's rows of the
    head's weight once used (to let their mapped pages go: a 262k-token head is then never resident whole)."""
    b, t = batch.shape
    if not split:
        yield slice(0, t - 1), iter([(0, model(input_ids=batch, use_cache=False).logits[:, :-1].float())])
        return
    base, _apply = _head_parts(model)  # type: ignore[misc]
    head = model.get_output_embeddings()
    cap = _softcap(getattr(model, "config", None))
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, C)
    budget = chunk_bytes or _CHUNK_BYTES
    vocab = head.weight.shape[0]
    positions = max(1, min(t - 1, budget // (b * min(vocab, _MIN_VOCAB_CHUNK) * 4)))

    def chunks(h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        rows = max(1, budget // (b * h.shape[1] * 4))
        for v0 in range(0, vocab, rows):
            bias = None if head.bias is None else head.bias[v0:v0 + rows]
            weight = head.weight[v0:v0 + rows]
            if weight.dtype != h.dtype:  # hidden states computed in another dtype (``computing_in``): the rows too
                weight, bias = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
            logits = F.linear(h, weight, bias).float()  # (B, P, Vc)
            if release is not None:
                release(head.weight[v0:v0 + rows])
            yield v0, logits if cap is None else torch.tanh(logits / cap) * cap

    for start in range(0, t - 1, positions):
        where = slice(start, min(start + positions, t - 1))
        yield where, chunks(hidden[:, where])


@torch.no_grad()
def next_token_stats(model: torch.nn.Module, batch: torch.Tensor, *, split: bool, top_k: int = 0,
                     ids: torch.Tensor | None = None, chunk_bytes: int | None = None,
                     release: Release | None = None) -> NextTokenStats:
    """``NextTokenStats`` of ``model`` on ``batch`` (B, T) (its ``top_k`` largest logits; the logits of ``ids``
    (B, T-1, j) when given), computed over the vocabulary a chunk at a time (``_logit_blocks``): equal to the same
    statistics of the whole logits up to rounding (the logsumexp is combined across chunks in float64), and no
    (B, T, V) tensor is made. ``release``: see ``_logit_blocks``."""
    b, t = batch.shape
    targets = batch[:, 1:].cpu()
    parts: list[tuple[torch.Tensor, ...]] = []
    max_abs, nonfinite, vocab = 0.0, 0, 0
    for where, chunks in _logit_blocks(model, batch, split, chunk_bytes, release):
        n = where.stop - where.start
        lse = torch.full((b, n), -math.inf, dtype=torch.float64)
        target = torch.zeros(b, n, 1)
        best = torch.full((b, n), -math.inf)
        argmax = torch.zeros(b, n, dtype=torch.int64)
        want = None if ids is None else ids[:, where].cpu()
        at = torch.zeros(b, n, 0 if want is None else want.shape[-1])
        top_values, top_ids = torch.empty(b, n, 0), torch.empty(b, n, 0, dtype=torch.int64)
        vocab = 0
        for v0, logits in chunks:  # (B, n, Vc)
            logits = logits.cpu()
            vc = logits.shape[-1]
            vocab += vc
            target = _take(target, logits, targets[:, where, None], v0)
            if want is not None:
                at = _take(at, logits, want, v0)
            value, index = logits.max(dim=-1)
            better = value > best  # strictly: the first of equal maxima stays, as argmax over the whole
            best, argmax = torch.where(better, value, best), torch.where(better, index + v0, argmax)
            if top_k:  # unsorted candidates, merged with the ones so far; sorted once per block below
                top = torch.topk(logits, min(top_k, vc), dim=-1, sorted=False)
                values = torch.cat([top_values, top.values], dim=-1)
                merged = torch.cat([top_ids, top.indices + v0], dim=-1)
                keep = torch.topk(values, min(top_k, values.shape[-1]), dim=-1, sorted=False)
                top_values, top_ids = keep.values, torch.gather(merged, -1, keep.indices)
            low, high = torch.aminmax(logits)  # one pass; NaN propagates into both
            max_abs = max(max_abs, -float(low), float(high))
            if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                nonfinite += int((~torch.isfinite(logits)).sum())
            shift = torch.where(torch.isfinite(value), value, torch.zeros_like(value))  # (B, n) each row's max
            total = logits.sub_(shift[..., None]).exp_().sum(dim=-1)  # in place: the logits are not read again
            lse = torch.logaddexp(lse, shift.double() + total.double().log())
            del logits
        if top_k:
            order = torch.sort(top_values, dim=-1, descending=True, stable=True)
            top_values, top_ids = order.values, torch.gather(top_ids, -1, order.indices)
        parts.append((lse, target.squeeze(-1), top_ids, top_values, at, argmax))
    lse, target, top_ids, top_values, at, argmax = (torch.cat(x, dim=1) for x in zip(*parts, strict=True))
    return NextTokenStats(lse=lse, vocab=vocab, target=target, top_ids=top_ids, top_values=top_values, at=at,
                          argmax=argmax, max_abs=max_abs, nonfinite=nonfinite)


def _take(out: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, v0: int) -> torch.Tensor:
    """``out`` (B, P, j) with the logits of ``ids`` (B, P, j) that fall in this chunk (vocabulary ids v0..v0+Vc-1
    of ``logits`` (B, P, Vc)) filled in."""
    vc = logits.shape[-1]
    inside = (ids >= v0) & (ids < v0 + vc)
    got = torch.gather(logits, -1, (ids - v0).clamp(0, vc - 1))
    return torch.where(inside, got, out)


def _check_finite(values: torch.Tensor, start: int, text: str, what: str) -> None:
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        raise StageError(f"evaluation of '{text}' produced a non-finite {what} in window {start + int(bad[0, 0])}",
                         stage="Evaluating")


@torch.no_grad()
def dense_reference(model: torch.nn.Module, windows: torch.Tensor, *, top_k: int | None, batch_size: int = 1,
                    device: torch.device | str = "cpu", progress: bool = False, text: str = "text",
                    after_batch: Callable[[], None] | None = None, release: Release | None = None
                    ) -> dict[str, torch.Tensor]:
    """The compact dense reference of ``windows`` (n, T):

    ``nll`` (n,) fp64; ``topk_ids`` (n, T-1, k) int64 and ``topk_logp`` (n, T-1, k) fp32 — the reference
    model's k most likely next tokens and their log-probs (k = vocabulary when ``top_k`` is None).
    ``after_batch()`` runs after each batch of windows (to return what its forward freed); ``release``: see
    ``_logit_blocks``.
    """
    n, t = windows.shape
    split = head_splits(model, windows[:1, :8].to(device), release)
    nll = torch.zeros(n, dtype=torch.float64)
    ids_out: torch.Tensor | None = None
    logp_out: torch.Tensor | None = None
    for start in tqdm(range(0, n, batch_size), desc=f"dense {text}"[:40], disable=None if progress else True,
                      leave=False):
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        rows = slice(start, start + batch.shape[0])
        stats = next_token_stats(model, batch, split=split, top_k=_ALL if top_k is None else top_k,
                                 release=release)
        nll[rows] = nll_of(stats)
        if ids_out is None or logp_out is None:  # (n, T-1, k); index 0 is the argmax
            k = stats.top_ids.shape[-1]
            ids_out = torch.empty(n, t - 1, k, dtype=torch.int64)
            logp_out = torch.empty(n, t - 1, k, dtype=torch.float32)
        ids_out[rows] = stats.top_ids
        logp_out[rows] = (stats.top_values.double() - stats.lse[..., None]).float()
        del stats
        _check_finite(nll[rows], start, text, "dense loss")
        if after_batch is not None:
            after_batch()
    assert ids_out is not None and logp_out is not None
    return {"nll": nll, "topk_ids": ids_out, "topk_logp": logp_out}


def kl_top_k(ref_logp: torch.Tensor, logq: torch.Tensor, *, whole: bool) -> torch.Tensor:
    """kl: (B, P) fp32 — KL(ref ‖ model) at P predicting positions from the reference's top-k log-probs
    ``ref_logp`` (B, P, k) and the model's log-probs ``logq`` (B, P, k) of the same tokens, over the k tokens plus
    one 'rest' bucket: Σ p_i (log p_i − log q_i) + p_r (log p_r − log q_r); ``whole``: k is the vocabulary (no
    bucket)."""
    p = ref_logp.exp()
    kl = (p * (ref_logp - logq)).sum(dim=-1)  # (B, P)
    if not whole:
        p_rest = (1.0 - p.sum(dim=-1)).clamp_min(0.0)  # (B, P)
        q_rest = (1.0 - logq.exp().sum(dim=-1)).clamp_min(1e-30)
        rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-30)) - torch.log(q_rest)),
                           torch.zeros_like(p_rest))
        kl = kl + rest
    return kl.clamp_min(0.0)


def kl_and_agreement(ref_ids: torch.Tensor, ref_logp: torch.Tensor, logq_all: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl (B, P) fp32, agree (B, P) bool) for P predicting positions from the compared model's whole log-softmax
    ``logq_all`` (B, P, V) fp32 and the reference's top-k ``ref_ids`` / ``ref_logp`` (B, P, k) (``kl_top_k``)."""
    logq = torch.gather(logq_all, -1, ref_ids)  # (B, P, k)
    kl = kl_top_k(ref_logp, logq, whole=ref_ids.shape[-1] >= logq_all.shape[-1])
    return kl, logq_all.argmax(dim=-1) == ref_ids[..., 0]


@torch.no_grad()
def compare_to_reference(model: torch.nn.Module, windows: torch.Tensor, reference: dict[str, torch.Tensor] | None,
                         *, batch_size: int = 1, device: torch.device | str = "cpu", progress: bool = False,
                         text: str = "text", check: Callable[[], None] | None = None,
                         after_batch: Callable[[], None] | None = None, release: Release | None = None
                         ) -> TextMetrics:
    """Perplexity of ``model`` on ``windows`` (n, T), and KL/agreement against ``reference`` when given;
    ``check()`` runs before and ``after_batch()`` after each batch of windows; ``release``: see
    ``_logit_blocks``."""
    n, t = windows.shape
    split = head_splits(model, windows[:1, :8].to(device), release)
    nll_sum = 0.0
    kl_sum = 0.0
    agree_sum = 0
    for start in tqdm(range(0, n, batch_size), desc=f"eval {text}"[:40], disable=None if progress else True,
                      leave=False):
        if check is not None:
            check()
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        rows = slice(start, start + batch.shape[0])
        ref_ids = None if reference is None else reference["topk_ids"][rows]  # (B, T-1, k)
        stats = next_token_stats(model, batch, split=split, ids=ref_ids, release=release)
        nll_b = nll_of(stats)
        kl_b = torch.zeros(batch.shape[0], dtype=torch.float64)
        if reference is not None and ref_ids is not None:
            logq = (stats.at.double() - stats.lse[..., None]).float()  # (B, T-1, k)
            kl = kl_top_k(reference["topk_logp"][rows], logq, whole=ref_ids.shape[-1] >= stats.vocab)
            kl_b += kl.double().sum(dim=1)
            agree_sum += int((stats.argmax == ref_ids[..., 0]).sum())
        del stats
        _check_finite(nll_b, start, text, "loss")
        nll_sum += float(nll_b.sum())
        if reference is not None:
            _check_finite(kl_b, start, text, "KL divergence")
            kl_sum += float(kl_b.sum())
        if after_batch is not None:
            after_batch()
    n_tokens = n * (t - 1)
    return TextMetrics(
        ppl=math.exp(nll_sum / n_tokens), nll_sum=nll_sum, n_tokens=n_tokens, n_windows=n, seq_len=t,
        kl_mean=None if reference is None else kl_sum / n_tokens,
        top1_agreement=None if reference is None else agree_sum / n_tokens,
        kl_sum=None if reference is None else kl_sum, agree_count=None if reference is None else agree_sum,
    )


def reference_metrics(reference: dict[str, torch.Tensor], seq_len: int) -> TextMetrics:
    """The reference model's own metrics (perplexity) from its cached reference."""
    n = reference["nll"].shape[0]
    n_tokens = n * (seq_len - 1)
    total = float(reference["nll"].sum())
    return TextMetrics(ppl=math.exp(total / n_tokens), nll_sum=total, n_tokens=n_tokens, n_windows=n,
                       seq_len=seq_len, kl_mean=0.0, top1_agreement=1.0, kl_sum=0.0, agree_count=n_tokens)


def evaluate(model: torch.nn.Module, tokenizer: Any, texts: dict[str, str], *, reference: torch.nn.Module | None = None,
             seq_len: int = 512, max_windows: int | None = None, batch_size: int = 1, kl_top_k: int | None = 256,
             device: torch.device | str | None = None, progress: bool = False) -> dict[str, dict[str, TextMetrics]]:
    """Evaluate ``model`` on each text (name → text), outside any run.

    Returns {name: {"model": TextMetrics, "reference": TextMetrics}} ("reference" only when a reference model
    is given; the model's KL and top-1 agreement are then measured against it on the same windows).
    """
    from podar.engine.data import eval_windows, tokenize_text

    device = device or next(model.parameters()).device
    out: dict[str, dict[str, TextMetrics]] = {}
    for name, text in texts.items():
        windows = eval_windows(tokenize_text(tokenizer, text), seq_len, max_windows, name=name)
        ref = None
        entry: dict[str, TextMetrics] = {}
        if reference is not None:
            ref = dense_reference(reference, windows, top_k=kl_top_k, batch_size=batch_size, device=device,
                                  progress=progress, text=name)
            entry["reference"] = reference_metrics(ref, seq_len)
        entry["model"] = compare_to_reference(model, windows, ref, batch_size=batch_size, device=device,
                                              progress=progress, text=name)
        out[name] = entry
    return out


def final_hidden(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The last hidden states (B, T, C) of a model without a language-model head (or of a masked LM)."""
    out = model(input_ids=batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states[-1]
    return hidden


@torch.no_grad()
def hidden_states(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
                  device: torch.device | str = "cpu", progress: bool = False, text: str = "text",
                  check: Callable[[], None] | None = None) -> torch.Tensor:
    """hidden: (n, T, C) fp32 on the CPU — the last hidden states of ``windows`` (n, T)."""
    out = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=f"hidden {text}"[:40], leave=False,
                      disable=None if progress else True):
        if check is not None:
            check()
        h = final_hidden(model, windows[start:start + batch_size].to(device)).float().cpu()
        _check_finite(h.flatten(1).sum(dim=1), start, text, "hidden state")
        out.append(h)
    return torch.cat(out)


@dataclass(frozen=True)
class Fidelity:
    """The pruned model's last hidden states against the dense model's, on the same windows."""

    hidden_cosine: float  # mean over tokens of cos(h_pruned, h_dense)
    hidden_rel_mse: float  # Σ ‖h_pruned − h_dense‖² / Σ ‖h_dense‖²
    embedding_cosine: float  # mean over windows of cos(mean_t h_pruned, mean_t h_dense)
    n_windows: int
    seq_len: int


def fidelity(dense: torch.Tensor, pruned: torch.Tensor, dist: Any = None) -> Fidelity:
    """Fidelity of pruned (n, T, C) against dense (n, T, C) hidden states; fp64 sums, added up over processes
    (``dist``) before the means are taken."""
    d, p = dense.double(), pruned.double()
    sums = [float(F.cosine_similarity(p, d, dim=-1).sum()), d.shape[0] * d.shape[1], float((p - d).pow(2).sum()),
            float(d.pow(2).sum()), float(F.cosine_similarity(p.mean(dim=1), d.mean(dim=1), dim=-1).sum()),
            d.shape[0]]
    cos, tokens, err, ref, emb, windows = sums if dist is None else dist.sum_floats(sums)
    return Fidelity(hidden_cosine=cos / tokens, hidden_rel_mse=err / max(ref, 1e-300), embedding_cosine=emb / windows,
                    n_windows=int(windows), seq_len=dense.shape[1])
