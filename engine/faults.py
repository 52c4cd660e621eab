"""Fault injection for tests: ``PODAR_FAULT`` names points where the process fails on purpose.

Syntax: comma-separated ``ACTION@POINT[#N]`` — the N-th time (default 1) this process passes POINT, do ACTION:
``kill`` (SIGKILL, nothing runs after it), ``enospc`` (raise OSError ENOSPC, a full disk), ``interrupt``
(raise KeyboardInterrupt, as Ctrl-C does), ``sleep`` (wait 60 s: a test signals the process meanwhile).
Points: ``after:<stage>`` (a stage's result is checkpointed), ``step:fine_tuning`` (an optimizer step is done),
``write:artifact`` and ``write:manifest`` (the temp file is written and fsynced, not yet renamed).

Read at call time, never at import. The per-process counters are the one piece of global state; ``reset()``.
"""

from __future__ import annotations

import errno
import os
import signal
import time

__all__ = ["hit", "reset", "ENV"]

ENV = "PODAR_FAULT"
_COUNTS: dict[str, int] = {}  # global state: how often each point was passed in this process


def reset() -> None:
    _COUNTS.clear()


def hit(point: str) -> None:
    """Mark that this process passed ``point``; act when PODAR_FAULT asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _COUNTS[point] = _COUNTS.get(point, 0) + 1
    for item in spec.split(","):
        action, _, target = item.strip().partition("@")
        name, _, nth = target.partition("#")
        if name != point or int(nth or 1) != _COUNTS[point]:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (simulated at {target})")
        elif action == "interrupt":
            raise KeyboardInterrupt
        elif action == "sleep":
            time.sleep(60)
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r} (kill, enospc, interrupt, sleep)")
