"""Blocking file work, run off the event loop: how it is handed to a thread, and the read
preparation every log reader shares.

The sidecar's one event loop also carries the control plane's heartbeats and the write path; a
scan of a 64 MiB segment or a snapshot install (fsyncs, renames, deleting a whole log) done on
it would hold all of them up. Such work is a plain function handed to an `Offload` (by default
`asyncio.to_thread`), and only its result is applied on the loop, so the log's state keeps
changing in one thread only. Tests inject an `Offload` that records what went through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from engram_sidecar.errors import WalError
from engram_sidecar.log.wal import SpaceLog

log = logging.getLogger(__name__)

T = TypeVar("T")


class Offload(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def to_thread(fn: Callable[[], T]) -> T:
    """The default `Offload`: the default executor's worker threads."""
    return await asyncio.to_thread(fn)


async def prepare_read(wal: SpaceLog, sequence: int, offload: Offload = to_thread) -> bool:
    """Before a read from `sequence`: index and open its sealed segment in a worker thread, if
    the read would otherwise scan the whole segment on the loop (segments found on disk at open
    are indexed on first read). A scan that fails changes nothing: the read then meets the same
    problem and reports it as it always did. False when the scan failed."""
    job = wal.index_job(sequence)
    if job is None:
        return True
    try:
        fd, index = await offload(job.run)
    except (OSError, WalError) as err:
        log.debug("space %s: indexing %s off the loop failed: %s", wal.space, job.path, err)
        return False
    wal.adopt_index(job, fd, index)
    return True
