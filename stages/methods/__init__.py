"""The pruning methods, one file each, and the one registry that maps a method's name to it.

``get_method(config.method.name)`` is how every stage finds the method; nothing else branches on a method's
name. ``register_method(MyMethod())`` adds one (its parameters become valid in configs as
``method: {name: <name>, ...}``).
"""

from __future__ import annotations

from podar.schemas.methods import register_method_params

from .base import LayerStats, Pruned, PruneSpec, PruningMethod, with_prior
from .magnitude import Magnitude
from .ria import RIA
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["LayerStats", "PruneSpec", "Pruned", "PruningMethod", "with_prior", "get_method", "register_method",
           "registered_methods"]

_METHODS: dict[str, PruningMethod] = {m.name: m for m in (Magnitude(), Wanda(), RIA(), SparseGPT())}


def register_method(method: PruningMethod) -> PruningMethod:
    """Register ``method`` under its name; its parameters type validates ``method:`` sections naming it."""
    if not isinstance(method, PruningMethod):
        raise TypeError(f"register_method needs a PruningMethod instance, got {type(method).__name__}")
    if method.params_type.model_fields["name"].default != method.name:
        raise ValueError(f"method '{method.name}': its params_type {method.params_type.__name__} has name "
                         f"'{method.params_type.model_fields['name'].default}'")
    existing = _METHODS.get(method.name)
    if existing is not None and type(existing) is not type(method):
        raise ValueError(f"a method named '{method.name}' is already registered ({type(existing).__name__})")
    register_method_params(method.params_type)
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> PruningMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"no pruning method named '{name}' is registered; known: {', '.join(sorted(_METHODS))}"
                         ) from None


def registered_methods() -> list[str]:
    return sorted(_METHODS)
