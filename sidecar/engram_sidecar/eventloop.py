"""Which asyncio event loop the sidecar runs on (`event_loop`, docs/configuration.md).

uvloop (libuv) runs the same asyncio code with cheaper sockets, timers and callbacks; the
sidecar's hot path (HTTP parsing, replication frames, acks) is mostly that. It is an optional
dependency (`pip install 'engram-replication[fast]'`); asyncio's own loop is the fallback and
behaves the same, only slower.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def choose(setting: str) -> tuple[str, LoopFactory | None]:
    """(the loop's name, a factory for it; None: asyncio's default) for `setting`: `auto`
    (uvloop if installed), `uvloop` (config validation made sure it is) or `asyncio`."""
    if setting == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if setting == "uvloop":
            raise
        return "asyncio", None
    factory: LoopFactory = uvloop.new_event_loop
    return "uvloop", factory


def run(main: Coroutine[Any, Any, T], setting: str) -> T:
    """`asyncio.run(main)` on the loop `setting` chooses."""
    _, factory = choose(setting)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
