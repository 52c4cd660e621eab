"""Bit packing of boolean masks: row-major, 8 columns per byte, the first column in the least significant bit
(numpy's ``packbits(..., bitorder="little")``, the order compressed-tensors' bitmask formats use)."""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "BIT_ORDER"]

BIT_ORDER = "little"
_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """packed: (rows, ceil(cols/8)) uint8 from mask: (rows, cols) bool; the last byte is zero-padded."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad))  # (rows, cols+pad)
    groups = bits.view(rows, (cols + pad) // 8, 8)  # (rows, bytes, 8)
    return (groups * _WEIGHTS.to(mask.device)).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """mask: (rows, cols) bool from packed: (rows, ceil(cols/8)) uint8."""
    rows, n_bytes = packed.shape
    if n_bytes * 8 < cols or n_bytes * 8 - cols >= 8:
        raise ValueError(f"packed width {n_bytes} bytes does not hold {cols} columns")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.to(torch.uint8)[:, :, None] >> shifts) & 1  # (rows, bytes, 8)
    return bits.reshape(rows, n_bytes * 8)[:, :cols].bool()
