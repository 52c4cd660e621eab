"""Weight-only integer quantization of pruned Linears (W8A16, W4A16). Pure: tensors in, tensors out.

Symmetric, one scale per output channel (W8A16) or per group of ``group_size`` input columns (W4A16), in
compressed-tensors' convention, so that its compressors re-derive exactly these integers from these scales:

    scale = max|w| / ((2^bits - 1) / 2)            (a group whose weights are all zero gets scale 1)
    q     = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1)
    w'    = q · scale, computed in the scale's dtype (the export's)

Zeros stay exactly zero, so a pruned weight stays pruned after quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WeightQuant", "weight_scale", "quantize", "dequantize", "fake_quantize"]


@dataclass(frozen=True)
class WeightQuant:
    """How the weights of a Linear are quantized: ``bits`` (4 or 8), ``group_size`` input columns per scale
    (None: one scale per output channel)."""

    bits: int
    group_size: int | None = None

    @classmethod
    def named(cls, name: str, group_size: int = 128) -> WeightQuant | None:
        """The scheme of ``export.quantization``: none → None, w8a16 → 8 bits per channel, w4a16 → 4 bits in
        groups of ``group_size``."""
        if name == "none":
            return None
        if name == "w8a16":
            return cls(bits=8)
        if name == "w4a16":
            return cls(bits=4, group_size=group_size)
        raise ValueError(f"unknown quantization {name!r}; one of none, w8a16, w4a16")

    @property
    def label(self) -> str:
        return f"w{self.bits}a16"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group(self, cols: int) -> int:
        """Columns per scale for a weight of ``cols`` input columns; ValueError when they do not divide."""
        if self.group_size is None:
            return cols
        if cols % self.group_size:
            raise ValueError(f"{cols} input columns are not divisible by the group size {self.group_size}")
        return self.group_size


def _grouped(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """w: (R, C) → (R, C / g, g)."""
    rows, cols = w.shape
    g = spec.group(cols)
    return w.reshape(rows, cols // g, g)


def weight_scale(weight: torch.Tensor, spec: WeightQuant, dtype: torch.dtype) -> torch.Tensor:
    """scale: (R, C / g) in ``dtype`` for weight: (R, C); max |w| of each group over half the integer range."""
    amax = _grouped(weight.detach().float(), spec).abs().amax(dim=-1)  # (R, G)
    half_range = (2**spec.bits - 1) / 2
    return torch.where(amax > 0, amax / half_range, torch.ones_like(amax)).to(dtype)


def quantize(weight: torch.Tensor, scale: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """q: (R, C) int8 of weight: (R, C) with scale: (R, C / g); computed in float32 from the scale as stored."""
    x = _grouped(weight.detach().float(), spec) / scale.float()[..., None]
    return torch.round(x).clamp_(spec.qmin, spec.qmax).to(torch.int8).reshape(weight.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """w': (R, C) in scale's dtype = q · scale, for q: (R, C) integers and scale: (R, C / g)."""
    return (_grouped(q.to(scale.dtype), spec) * scale[..., None]).reshape(q.shape)


def fake_quantize(weight: torch.Tensor, spec: WeightQuant, dtype: torch.dtype,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """What a quantized weight reads back as: (R, C) in ``dtype``; on ``scale`` (R, C / g) when given (a grid
    chosen before, e.g. by joint quantization), else on the scales its values give."""
    scale = weight_scale(weight, spec, dtype) if scale is None else scale.to(dtype)
    return dequantize(quantize(weight, scale, spec), scale, spec)
