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

from podar.schemas.errors import StageError

__all__ = ["TextMetrics", "Fidelity", "dense_reference", "compare_to_reference", "kl_and_agreement", "evaluate",
           "head_splits", "next_token_logits", "logits_at", "nll_of",
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


_CHUNK_BYTES = 32 << 20  # float32 logits of at most this many bytes at a time (one chunk of positions, all tokens)


def nll_of(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nll: (B,) fp64 — summed NLL of ``targets`` (B, P) under ``logp`` (B, P, V) fp32, the log-softmax of the logits
    that predict them (what cross-entropy computes; taken once and shared with KL and the top-k)."""
    per_token = -torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)  # (B, P)
    return per_token.double().sum(dim=1)


def _softcap(config: Any) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _head_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """(the model without its LM head, the head as a function of its last hidden states), when the model has the
    usual layout (a base model under ``base_model_prefix`` and output embeddings); None otherwise."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        return None
    cap = _softcap(getattr(model, "config", None))

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        return logits if cap is None else torch.tanh(logits / cap) * cap

    return base, apply


@torch.no_grad()
def logits_at(model: torch.nn.Module, batch: torch.Tensor, ids: torch.Tensor, *, split: bool,
              chunk_bytes: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, logits (B, P, k) fp32 of the tokens ``ids`` (B, T-1, k) names at each predicting position of
    ``batch`` (B, T)): with ``split``, the head's rows of those tokens only, gathered a chunk of positions at a time
    (the head's weight is read as stored, each gathered row in float32), so no full-vocabulary logits are made;
    without, gathered from the whole logits."""
    if not split:
        for where, logits in next_token_logits(model, batch, split=False):
            yield where, torch.gather(logits, -1, ids[:, where].to(logits.device))
        return
    base, _apply = _head_parts(model)  # type: ignore[misc]
    head = model.get_output_embeddings()
    cap = _softcap(getattr(model, "config", None))
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state  # (B, T, C)
    b, t, c = hidden.shape
    k = ids.shape[-1]
    step = max(1, (chunk_bytes or _CHUNK_BYTES) // (b * k * c * 4))
    for start in range(0, t - 1, step):
        where = slice(start, min(start + step, t - 1))
        want = ids[:, where].to(hidden.device)  # (B, P, k)
        rows = head.weight[want].float()  # (B, P, k, C)
        logits = torch.einsum("bpc,bpkc->bpk", hidden[:, where].float(), rows)
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[want].float()
        yield where, logits if cap is None else torch.tanh(logits / cap) * cap


def head_splits(model: torch.nn.Module, probe: torch.Tensor) -> bool:
    """Whether the head applied to the base model's last hidden states gives the model's own logits on ``probe``
    (1, t): a model that scales or post-processes its logits otherwise is computed whole."""
    parts = _head_parts(model)
    if parts is None:
        return False
    base, apply = parts
    whole = model(input_ids=probe, use_cache=False).logits.float()
    split = apply(base(input_ids=probe, use_cache=False).last_hidden_state)
    return whole.shape == split.shape and torch.allclose(split, whole, rtol=1e-5, atol=1e-5)


def next_token_logits(model: torch.nn.Module, batch: torch.Tensor, *, split: bool,
                      chunk_bytes: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, logits (B, P, V) fp32) over the predicting positions 0..T-2 of ``batch`` (B, T), P positions at
    a time so that one chunk of logits holds at most ``chunk_bytes``: with ``split`` (``head_splits``), the head is
    applied to the last hidden states chunk by chunk, so the (B, T, V) logits of a long window over a large
    vocabulary never exist at once; without, the model's whole logits come as one chunk."""
    _b, t = batch.shape
    if not split:
        yield slice(0, t - 1), model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return
    base, apply = _head_parts(model)  # type: ignore[misc]
    hidden = base(input_ids=batch, use_cache=False).last_hidden_state  # (B, T, C)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, (chunk_bytes or _CHUNK_BYTES) // (batch.shape[0] * vocab * 4))
    for start in range(0, t - 1, step):
        where = slice(start, min(start + step, t - 1))
        yield where, apply(hidden[:, where])


def _check_finite(values: torch.Tensor, start: int, text: str, what: str) -> None:
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        raise StageError(f"evaluation of '{text}' produced a non-finite {what} in window {start + int(bad[0, 0])}",
                         stage="Evaluating")


@torch.no_grad()
def dense_reference(model: torch.nn.Module, windows: torch.Tensor, *, top_k: int | None, batch_size: int = 1,
                    device: torch.device | str = "cpu", progress: bool = False, text: str = "text",
                    after_batch: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """The compact dense reference of ``windows`` (n, T):

    ``nll`` (n,) fp64; ``topk_ids`` (n, T-1, k) int64 and ``topk_logp`` (n, T-1, k) fp32 — the reference
    model's k most likely next tokens and their log-probs (k = vocabulary when ``top_k`` is None).
    ``after_batch()`` runs after each batch of windows (to return what its forward freed).
    """
    n, t = windows.shape
    split = head_splits(model, windows[:1, :8].to(device))
    nll = torch.zeros(n, dtype=torch.float64)
    ids_out: torch.Tensor | None = None
    logp_out: torch.Tensor | None = None
    for start in tqdm(range(0, n, batch_size), desc=f"dense {text}"[:40], disable=None if progress else True,
                      leave=False):
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        rows = slice(start, start + batch.shape[0])
        for where, logits in next_token_logits(model, batch, split=split):  # logits (B, P, V)
            logp = torch.log_softmax(logits, dim=-1)  # (B, P, V)
            del logits
            nll[rows] += nll_of(logp, batch[:, where.start + 1: where.stop + 1]).cpu()
            k = logp.shape[-1] if top_k is None else min(top_k, logp.shape[-1])
            top = torch.topk(logp, k, dim=-1)  # sorted: index 0 is the argmax
            if ids_out is None or logp_out is None:  # (n, T-1, k), filled chunk by chunk
                ids_out = torch.empty(n, t - 1, k, dtype=torch.int64)
                logp_out = torch.empty(n, t - 1, k, dtype=torch.float32)
            ids_out[rows, where] = top.indices.cpu()
            logp_out[rows, where] = top.values.cpu()
            del logp, top
        _check_finite(nll[rows], start, text, "dense loss")
        if after_batch is not None:
            after_batch()
    assert ids_out is not None and logp_out is not None
    return {"nll": nll, "topk_ids": ids_out, "topk_logp": logp_out}


def kl_and_agreement(ref_ids: torch.Tensor, ref_logp: torch.Tensor, logq_all: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl (B, P) fp32, agree (B, P) bool) for P predicting positions.

    ref_ids/ref_logp: (B, P, k) the reference's top-k; logq_all: (B, P, V) fp32 the compared model's log-softmax at
    those positions. KL over the k tokens plus one 'rest' bucket: Σ p_i (log p_i − log q_i) + p_r (log p_r − log q_r).
    """
    logq = torch.gather(logq_all, -1, ref_ids)  # (B, T-1, k)
    p = ref_logp.exp()
    kl = (p * (ref_logp - logq)).sum(dim=-1)  # (B, T-1)
    if ref_ids.shape[-1] < logq_all.shape[-1]:
        p_rest = (1.0 - p.sum(dim=-1)).clamp_min(0.0)  # (B, T-1)
        q_rest = (1.0 - logq.exp().sum(dim=-1)).clamp_min(1e-30)
        rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-30)) - torch.log(q_rest)),
                           torch.zeros_like(p_rest))
        kl = kl + rest
    agree = logq_all.argmax(dim=-1) == ref_ids[..., 0]
    return kl.clamp_min(0.0), agree


@torch.no_grad()
def compare_to_reference(model: torch.nn.Module, windows: torch.Tensor, reference: dict[str, torch.Tensor] | None,
                         *, batch_size: int = 1, device: torch.device | str = "cpu", progress: bool = False,
                         text: str = "text", check: Callable[[], None] | None = None,
                         after_batch: Callable[[], None] | None = None) -> TextMetrics:
    """Perplexity of ``model`` on ``windows`` (n, T), and KL/agreement against ``reference`` when given;
    ``check()`` runs before and ``after_batch()`` after each batch of windows."""
    n, t = windows.shape
    split = head_splits(model, windows[:1, :8].to(device))
    nll_sum = 0.0
    kl_sum = 0.0
    agree_sum = 0
    for start in tqdm(range(0, n, batch_size), desc=f"eval {text}"[:40], disable=None if progress else True,
                      leave=False):
        if check is not None:
            check()
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        rows = slice(start, start + batch.shape[0])
        nll_b = torch.zeros(batch.shape[0], dtype=torch.float64)
        kl_b = torch.zeros(batch.shape[0], dtype=torch.float64)
        for where, logits in next_token_logits(model, batch, split=split):  # logits (B, P, V)
            logq = torch.log_softmax(logits, dim=-1)  # (B, P, V)
            del logits
            nll_b += nll_of(logq, batch[:, where.start + 1: where.stop + 1]).cpu()
            if reference is not None:
                kl, agree = kl_and_agreement(reference["topk_ids"][rows, where].to(logq.device),
                                             reference["topk_logp"][rows, where].to(logq.device), logq)
                kl_b += kl.double().sum(dim=1).cpu()
                agree_sum += int(agree.sum())
            del logq
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
