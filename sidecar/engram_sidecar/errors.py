"""The sidecar's exception tree.

One root (`EngramError`). Each class says, through `retriable`, whether the same call may succeed
later (a full disk may drain, a peer may come back); retry loops test the attribute, not the type.
"""

from __future__ import annotations

import errno as errno_codes
import os
from typing import ClassVar, Literal


class EngramError(Exception):
    """Root of every error the sidecar raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(EngramError):
    """A setting is unknown or invalid. Raised at start-up; the process exits with the message."""


class InvalidSpaceId(EngramError, ValueError):
    """A memory-space id is not 3–64 characters of [a-z0-9_-]."""


class WalError(EngramError):
    """A WAL operation failed."""


class WalCorruption(WalError):
    """Stored bytes fail a check. Names the file and byte offset, so an operator can look."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


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


class WireError(EngramError):
    """A frame cannot be decoded. The connection that carried it must be recycled."""


class FrameTooLarge(WireError):
    """A frame declares a body longer than the configured maximum; nothing was allocated."""


class ChecksumMismatch(WireError):
    """A frame's CRC32C does not match its header and body."""
