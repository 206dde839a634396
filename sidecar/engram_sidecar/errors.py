"""The data plane's storage errors, on the shared tree of `engram_contract.errors`.

The shared classes are re-exported so the sidecar names every error it raises from one place.
"""

from __future__ import annotations

import errno as errno_codes
import os
from typing import Literal

from engram_contract.errors import (
    ChecksumMismatch,
    ConfigError,
    EngramError,
    FrameTooLarge,
    InvalidSpaceId,
    WalCorruption,
    WalError,
    WireError,
)

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "EngramError",
    "FrameTooLarge",
    "InvalidSpaceId",
    "SequenceError",
    "StorageError",
    "WalClosed",
    "WalCorruption",
    "WalError",
    "WalIOError",
    "WalTruncated",
    "WireError",
]


class WalIOError(WalError):
    """The disk refused a write or fsync (full disk, I/O error). No partial entry is visible."""

    retriable = True


StorageKind = Literal["DiskFull", "StorageError"]
# Errnos that mean "no room": they may clear by themselves (retention, an operator deleting
# files), unlike EIO or EROFS, which need someone to look at the disk.
_NO_SPACE: frozenset[int] = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT})


class StorageError(WalIOError):
    """An OS call on the node's disk failed. Names the operation, the path and the errno.

    Raised instead of the bare OSError so that it can't be mistaken for a network error (the
    replication code treats OSError as "the peer went away") and so that callers can surface it
    as a state and a metric rather than a dropped connection or a 500.
    """

    def __init__(
        self, op: str, path: str | os.PathLike[str], err: OSError, *, space: str = ""
    ) -> None:
        self.op = op
        self.path = os.fspath(path)
        self.errno = err.errno
        self.strerror = err.strerror or str(err)
        self.space = space
        name = errno_codes.errorcode.get(err.errno or 0, "")
        where = f"space {space}: " if space else ""
        code = f" [{name}]" if name else ""
        super().__init__(f"{where}{op} {self.path} failed: {self.strerror}{code}")

    @property
    def kind(self) -> StorageKind:
        return storage_kind(self.errno)


def storage_kind(err_no: int | None) -> StorageKind:
    return "DiskFull" if err_no in _NO_SPACE else "StorageError"


class WalTruncated(WalError):
    """Entries a writer waited on were cut by a truncation before an fsync covered them.

    They were never durable here and must not be acknowledged; the sequence may since hold
    another entry (the new primary's), so reporting it durable would ack someone else's write.
    """


class WalClosed(WalError):
    """The log was closed, or poisoned by an fsync failure and must be reopened."""


class SequenceError(WalError):
    """An append or read names a sequence that does not fit the log (gap, overlap, out of range)."""
