"""The base of every config model: frozen, unknown fields rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Frozen"]


class Frozen(BaseModel):
    """A config section: immutable once validated; a field it does not define is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")
