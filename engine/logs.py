"""podar's logger, and how long values are written into it.

podar never configures logging. Its logger is structlog's when the application (or podar's CLI) has configured
structlog; otherwise a structlog logger on the standard library's ``logging.getLogger("podar")``, which holds a
``NullHandler``: a library user sees nothing until the application configures logging (``logging.basicConfig``,
or handlers of its own on the ``podar`` logger), and then sees podar's records there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import structlog

__all__ = ["library_logger", "brief"]

_SHOWN = 5  # a long list in a log record: its count and this many of its items


def library_logger(name: str = "podar") -> Any:
    """The logger podar writes to (see the module docstring); bind run fields to it."""
    if structlog.is_configured():
        return structlog.get_logger(name)
    std = logging.getLogger(name)
    if not any(isinstance(h, logging.NullHandler) for h in std.handlers):  # no "no handler" warning, no output
        std.addHandler(logging.NullHandler())
    return structlog.wrap_logger(std, wrapper_class=structlog.stdlib.BoundLogger, processors=[
        structlog.stdlib.filter_by_level, structlog.processors.KeyValueRenderer(key_order=["event"])])


def brief(items: Sequence[Any], shown: int = _SHOWN) -> str:
    """'N: a, b, c, … (M more)': a list for a log line, its length and its first ``shown`` items."""
    head = ", ".join(str(x) for x in items[:shown])
    more = f", … ({len(items) - shown} more)" if len(items) > shown else ""
    return f"{len(items)}: {head}{more}"
