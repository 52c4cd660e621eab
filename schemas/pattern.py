"""Sparsity patterns: which weights may be zeroed together (unstructured, N:M, blocks, rows, columns)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Frozen
from .errors import ConfigError

__all__ = ["PatternKind", "SparsityPatternConfig"]


PatternKind = Literal["unstructured", "nm", "block", "row", "column"]


class SparsityPatternConfig(Frozen):
    """Which weights may be zeroed together.

    - ``unstructured``: any weight.
    - ``nm``: N:M, at most ``n`` non-zeros in every group of ``m`` consecutive input weights of a row
      (2:4 keeps 2 of 4: 50% sparsity). The sparsity is fixed at ``1 - n/m``.
    - ``block``: whole ``block_height`` × ``block_width`` tiles of the (out, in) weight.
    - ``row``: whole output rows (output channels).
    - ``column``: whole input columns (input channels).
    """

    kind: PatternKind = "unstructured"
    n: int | None = Field(default=None, description="N of N:M: non-zeros kept per group, 0 < n < m")
    m: int | None = Field(default=None, description="M of N:M: group size in input weights, m >= 2")
    block_height: int | None = Field(default=None, description="block rows (output features), >= 1")
    block_width: int | None = Field(default=None, description="block columns (input features), >= 1")

    @model_validator(mode="after")
    def _check(self) -> SparsityPatternConfig:
        if self.kind == "nm":
            if self.n is None or self.m is None:
                raise ValueError("pattern.kind 'nm' needs both pattern.n and pattern.m (e.g. n=2, m=4)")
            if not 0 < self.n < self.m:
                raise ValueError(
                    f"pattern N:M needs 0 < n < m; got n={self.n}, m={self.m} (e.g. 2:4 or 4:8)"
                )
        elif self.n is not None or self.m is not None:
            raise ValueError(f"pattern.n / pattern.m apply only to kind 'nm', not '{self.kind}'")
        if self.kind == "block":
            for name in ("block_height", "block_width"):
                value = getattr(self, name)
                if value is None or value < 1:
                    raise ValueError(f"pattern.{name} must be an integer >= 1 for kind 'block'; got {value}")
        elif self.block_height is not None or self.block_width is not None:
            raise ValueError(f"pattern.block_height / block_width apply only to kind 'block', not '{self.kind}'")
        return self

    @classmethod
    def unstructured(cls) -> SparsityPatternConfig:
        return cls(kind="unstructured")

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPatternConfig:
        return cls(kind="nm", n=n, m=m)

    @classmethod
    def nm_2_4(cls) -> SparsityPatternConfig:
        return cls.nm(2, 4)

    @classmethod
    def nm_4_8(cls) -> SparsityPatternConfig:
        return cls.nm(4, 8)

    @classmethod
    def block(cls, height: int, width: int) -> SparsityPatternConfig:
        return cls(kind="block", block_height=height, block_width=width)

    @classmethod
    def row(cls) -> SparsityPatternConfig:
        return cls(kind="row")

    @classmethod
    def column(cls) -> SparsityPatternConfig:
        return cls(kind="column")

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself imposes (N:M), or None when the target decides."""
        if self.kind == "nm":
            assert self.n is not None and self.m is not None
            return 1.0 - self.n / self.m
        return None

    def label(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block_height}x{self.block_width}"
        return self.kind

    def check_layer(self, layer: str, out_features: int, in_features: int) -> None:
        """Raise ConfigError naming ``layer`` when the pattern does not fit an (out, in) weight."""
        if self.kind == "nm":
            assert self.m is not None
            if in_features % self.m:
                raise ConfigError(
                    f"pattern {self.label()} does not fit layer '{layer}': in_features={in_features} is not "
                    f"divisible by m={self.m}; add the layer to 'ignore' or choose another pattern"
                )
        if self.kind == "block":
            assert self.block_height is not None and self.block_width is not None
            if out_features % self.block_height or in_features % self.block_width:
                raise ConfigError(
                    f"pattern {self.label()} does not fit layer '{layer}' of shape ({out_features}, "
                    f"{in_features}): both must be divisible by the block ({self.block_height}, "
                    f"{self.block_width}); add the layer to 'ignore' or change the block size"
                )
