"""Installed package versions, as a run records them (one home: the manifest's, the export card's, lm-eval's)."""

from __future__ import annotations

import importlib.metadata

__all__ = ["VERSIONED", "package_version", "library_versions"]

VERSIONED = ("podar", "torch", "transformers", "accelerate", "safetensors", "transitions", "pydantic", "structlog")


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    """The versions of the libraries a run's results depend on (recorded in its manifest)."""
    return {name: package_version(name) for name in VERSIONED}
