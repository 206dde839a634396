"""Whether a space's disk works: the state a storage error leaves behind until a write succeeds.

A full or failing disk must show as a state, a metric and a log line, never as a dropped
connection or a silent retry loop (issue 11). `StorageHealth` is the state, one per space: the
code that catches a `StorageError` records it, the code that sees a write or fsync succeed clears
it. Both return whether the state changed, so the caller logs the transition once and not once
per failed write. Nothing here touches the disk, the clock is injected, and it never raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from engram_sidecar.errors import StorageError, WalIOError, storage_kind

StorageState = Literal["ok", "DiskFull", "StorageError"]


def classify(err: BaseException) -> StorageState | None:
    """The storage state `err` puts a space in, or None when it says nothing about the disk."""
    if isinstance(err, StorageError):
        return err.kind
    if isinstance(err, OSError):
        return storage_kind(err.errno)
    if isinstance(err, WalIOError):
        return "StorageError"
    # Not WalClosed: a log poisoned by a failed fsync raised StorageError then (recorded then),
    # and a log closed on purpose says nothing about the disk.
    return None


@dataclass
class StorageHealth:
    clock: Callable[[], float] = field(default=time.time, repr=False)
    state: StorageState = "ok"
    last_error: str = ""  # kept after recovery, for the status view
    since: float | None = None  # wall time the current bad state began
    errors: int = 0  # storage errors recorded since this object was made

    @property
    def healthy(self) -> bool:
        return self.state == "ok"

    def record(self, err: BaseException) -> bool:
        """Note a failure. True when the state changed (log it then); False for errors that
        are not about the disk, or that repeat the current state."""
        state = classify(err)
        if state is None:
            return False
        self.errors += 1
        self.last_error = str(err)
        if state == self.state:
            return False
        self.state = state
        self.since = self.clock()
        return True

    def clear(self) -> bool:
        """A write or fsync succeeded. True when that ended a bad state."""
        if self.state == "ok":
            return False
        self.state, self.since = "ok", None
        return True

    def view(self) -> dict[str, object]:
        return {
            "state": self.state,
            "since": self.since,
            "last_error": self.last_error,
            "errors": self.errors,
        }
