"""Compressed weight formats. Pure: tensor in, tensors out.

The tensor naming and layout follow compressed-tensors (0.14) so its decompressors read what podar writes:

- ``sparse-bitmask`` (any sparsity), for a Linear at ``prefix``:
  ``prefix.shape`` (2,) int64, ``prefix.compressed`` (nnz,) the non-zero values in row-major order,
  ``prefix.bitmask`` (R, ceil(C/8)) uint8 — bit j%8 of byte j//8 (least significant bit first) is set when
  column j is non-zero, ``prefix.row_offsets`` (R,) int64 — index in ``compressed`` where each row starts.
- ``sparse-24-bitmask`` (2:4): ``prefix.shape`` (2, 1) int64, ``prefix.compressed`` (R, C/2) the kept half of each
  row (2 of every 4), ``prefix.bitmask`` as above.
- W8A16 weights (``quantize.py``, per output channel): the values above are int8, ``prefix.weight_scale``
  (R, 1) holds the scale; w ≈ q · scale, and zeros stay zeros.
"""

from __future__ import annotations

import torch

from .bitpack import pack_bits, unpack_bits
from .masks import nm_mask

__all__ = [
    "bitmask_compress",
    "bitmask_decompress",
    "sparse24_compress",
    "sparse24_decompress",
]

def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{shape, compressed, bitmask, row_offsets} of weight: (R, C), any dtype; non-zero = ``weight != 0``."""
    rows, cols = weight.shape
    nonzero = weight != 0  # (R, C)
    counts = nonzero.sum(dim=1)  # (R,)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "compressed": weight[nonzero].contiguous(),  # (nnz,)
        "bitmask": pack_bits(nonzero),  # (R, ceil(C/8))
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),  # (R,)
    }


def bitmask_decompress(shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor,
                       row_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """weight: (R, C) in ``compressed``'s dtype, zeros where the bitmask is clear."""
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if bitmask.shape != (rows, (cols + 7) // 8):
        raise ValueError(f"bitmask shape {tuple(bitmask.shape)} does not fit a ({rows}, {cols}) weight")
    mask = unpack_bits(bitmask, cols)  # (R, C)
    n = int(mask.sum())
    if compressed.numel() != n:
        raise ValueError(f"{compressed.numel()} values for {n} set bits")
    if row_offsets is not None:
        counts = mask.sum(dim=1)
        if not torch.equal(row_offsets.to(torch.int64), torch.cumsum(counts, 0) - counts):
            raise ValueError("row_offsets do not match the bitmask")
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[mask] = compressed.flatten()
    return out


def sparse24_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{shape, compressed, bitmask} of a 2:4-sparse weight (R, C): the kept half (R, C/2) and its bitmask.

    In each group of 4 the two largest |w| are kept (ties by position), so a group with fewer than 2 non-zeros
    keeps some zeros; a group with more than 2 non-zeros is not 2:4 and raises ValueError.
    """
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"in_features={cols} is not divisible by 4")
    groups_nnz = (weight != 0).reshape(rows, cols // 4, 4).sum(dim=-1)
    if int(groups_nnz.max()) > 2:
        raise ValueError("weight is not 2:4 sparse: a group of 4 holds more than 2 non-zeros")
    keep = nm_mask(weight.float().abs(), 2, 4)  # (R, C), exactly 2 per group (int8 -128 has no int8 abs)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": weight[keep].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bits(keep),
    }


def sparse24_decompress(shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """weight: (R, C) from the kept half (R, C/2) and the bitmask."""
    return bitmask_decompress(shape, compressed.flatten(), bitmask)
