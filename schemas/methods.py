"""The ``method:`` section of a config: which pruning method, and its own parameters.

A method's parameters are a frozen pydantic model named by ``name``. The class also says, as class variables,
what the rest of the run needs to know of the method without importing its math: whether it needs calibration
statistics, its reference comparison group and calibration walk, and the patterns and scopes it supports.
The math lives in ``stages/methods/<name>.py``; a plugin registers its parameters here through
``podar.register_method``. A config may name a method by its name alone (``method: wanda``).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MethodParams",
    "MagnitudeParams",
    "WandaParams",
    "RIAParams",
    "SparseGPTParams",
    "PruneMethod",
    "register_method_params",
    "method_params_type",
    "known_methods",
    "parse_method",
]

PATTERN_KINDS = ("unstructured", "nm", "block", "row", "column")
SCOPES = ("auto", "per_row", "per_layer", "global")


class MethodParams(BaseModel):
    """Base of every method's parameters. Subclasses fix ``name`` with a Literal and set the class variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the method's registered name")

    needs_calibration: ClassVar[bool] = True  # activation statistics are collected before scoring
    default_scope: ClassVar[str] = "per_row"  # the comparison group that scope 'auto' means
    default_walk: ClassVar[str] = "block"  # the calibration walk that walk 'auto' means (block or site)
    # runtime.compute_dtype 'auto' runs the calibration forwards in bf16 (where native): the statistics were measured
    # to keep the method's quality in bf16 (docs/calibration.md); False: the model's dtype
    bf16_statistics: ClassVar[bool] = False
    patterns: ClassVar[tuple[str, ...]] = PATTERN_KINDS
    scopes: ClassVar[tuple[str, ...]] = SCOPES

    def check(self, pattern_kind: str, pattern_label: str, scope: str) -> None:
        """Raise ValueError when the method cannot prune with this pattern or scope."""
        if pattern_kind not in self.patterns:
            raise ValueError(f"method {self.name} supports patterns {', '.join(self.patterns)}, not '{pattern_label}'")
        if scope not in self.scopes:
            raise ValueError(f"method {self.name} supports scope {', '.join(self.scopes)}, not '{scope}'")


class MagnitudeParams(MethodParams):
    """Magnitude pruning: score |W|; no calibration."""

    name: Literal["magnitude"] = "magnitude"
    needs_calibration: ClassVar[bool] = False
    default_scope: ClassVar[str] = "per_layer"


class WandaParams(MethodParams):
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ from calibration inputs."""

    name: Literal["wanda"] = "wanda"
    default_scope: ClassVar[str] = "per_row"
    default_walk: ClassVar[str] = "block"
    bf16_statistics: ClassVar[bool] = True


class RIAParams(MethodParams):
    """RIA (Zhang et al. 2024): relative importance (|W| over its row's and its column's Σ|W|) × ‖X_j‖₂^a."""

    name: Literal["ria"] = "ria"
    a: float = Field(default=0.5, ge=0.0, le=2.0, description="exponent of the activation norm, in [0, 2]")
    default_scope: ClassVar[str] = "per_layer"
    default_walk: ClassVar[str] = "block"
    bf16_statistics: ClassVar[bool] = True  # Wanda's statistics (Σ x_j²)


class SparseGPTParams(MethodParams):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with the inverse Hessian of calibration inputs."""

    name: Literal["sparsegpt"] = "sparsegpt"
    dampening_frac: float = Field(default=0.01, gt=0.0, lt=1.0, description="dampening, fraction of mean diag(H)")
    block_size: int = Field(default=128, ge=1, description="columns per OBS block, >= 1")
    joint_quantization: bool = Field(
        default=False, description="quantize kept weights inside the OBS update, to export.quantization's grid")
    default_scope: ClassVar[str] = "per_obs_block"
    default_walk: ClassVar[str] = "site"
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    scopes: ClassVar[tuple[str, ...]] = ("auto",)

    def check(self, pattern_kind: str, pattern_label: str, scope: str) -> None:
        if scope != "auto":
            raise ValueError("method sparsegpt chooses its mask per OBS column block; leave scope 'auto'")
        super().check(pattern_kind, pattern_label, scope)


# the one registry of method parameters, by name (built-ins here; plugins through register_method_params)
_PARAMS: dict[str, type[MethodParams]] = {
    "magnitude": MagnitudeParams,
    "wanda": WandaParams,
    "ria": RIAParams,
    "sparsegpt": SparseGPTParams,
}


class PruneMethod(str, Enum):
    """The built-in methods by name (``method: wanda`` in a config)."""

    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    RIA = "ria"
    SPARSEGPT = "sparsegpt"

    def requires_calibration(self) -> bool:
        """True when the method needs activation statistics."""
        return _PARAMS[self.value].needs_calibration


def register_method_params(params_type: type[MethodParams]) -> None:
    """Make ``method: {name: <its name>, ...}`` validate against ``params_type``."""
    name = params_type.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise ValueError(f"{params_type.__name__}.name needs a default: the method's name")
    existing = _PARAMS.get(name)
    if existing is not None and existing is not params_type:
        raise ValueError(f"a method named '{name}' is already registered ({existing.__name__})")
    _PARAMS[name] = params_type


def method_params_type(name: str) -> type[MethodParams]:
    try:
        return _PARAMS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; known: {', '.join(known_methods())}") from None


def known_methods() -> list[str]:
    return sorted(_PARAMS)


def parse_method(value: Any) -> MethodParams:
    """A method's parameters from a name, an enum member, a mapping with ``name``, or parameters themselves."""
    if isinstance(value, MethodParams):
        return value
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        known = ", ".join(known_methods())
        raise ValueError(f"method must be a name ({known}) or a mapping with 'name'; got {value!r}")
    return method_params_type(str(value["name"])).model_validate(value)
