"""The error tree both planes see.

One root (`EngramError`). Each class says, through `retriable`, whether the same call may succeed
later (a full disk may drain, a peer may come back); retry loops test the attribute, not the type.
The data plane's storage errors extend it in `engram_sidecar.errors`.
"""

from __future__ import annotations

from typing import ClassVar


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


class WireError(EngramError):
    """A frame cannot be decoded. The connection that carried it must be recycled."""


class FrameTooLarge(WireError):
    """A frame declares a body longer than the configured maximum; nothing was allocated."""


class ChecksumMismatch(WireError):
    """A frame's CRC32C does not match its header and body."""
