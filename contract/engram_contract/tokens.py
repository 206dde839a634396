"""The shared-secret file: one or more keys, one per line, re-read when the file changes.

One file serves the nodes' replication handshake and the control plane's bearer token
(docs/operations.md, "Rotate the shared secret"). It may hold several keys, one per line: the
**first** is the one a process sends (its handshake proof, its bearer token), and **every** one
is accepted from others. Rotation is then a sequence of files, each step compatible with the
one before: `old`, then `old` + `new`, then `new` + `old`, then `new`.

`KeyFile` re-reads the file when it changes (a Kubernetes Secret volume swaps a symlink, so its
identity changes), checking at most every `check_every` seconds; a file that is briefly missing
or empty keeps the keys last read, so a rotation can't lock a process out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

MIN_KEY_BYTES: Final = 16


def parse_keys(data: bytes) -> tuple[bytes, ...]:
    """The keys of a secret file's contents: its non-blank lines, stripped, in order."""
    return tuple(line.strip() for line in data.splitlines() if line.strip())


def short_keys(keys: tuple[bytes, ...]) -> list[int]:
    """Line numbers (1-based, among the keys) of the keys shorter than MIN_KEY_BYTES."""
    return [i for i, k in enumerate(keys, 1) if len(k) < MIN_KEY_BYTES]


class KeyFile:
    """A secret file's keys, kept current. `current()` is the key to send, `accepted()` all."""

    def __init__(
        self,
        path: Path,
        *,
        check_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        valid: Callable[[tuple[bytes, ...]], bool] = bool,
    ) -> None:
        self.path = path
        # A reload whose keys this refuses is ignored (the last good keys stay): a weak key
        # written by mistake must not replace a good one. The first read is the caller's to judge.
        self.valid = valid
        self.check_every = check_every
        self.clock = clock
        self._identity: tuple[int, int, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        self._checked = float("-inf")
        self.reloads = 0  # times the keys changed after the first read
        self.refresh(force=True)
        if not self._keys:
            raise ValueError(f"{path}: holds no key")

    def refresh(self, *, force: bool = False) -> bool:
        """Read the file again if it changed; True when the keys changed."""
        now = self.clock()
        if not force and now - self._checked < self.check_every:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
            identity = (st.st_ino, st.st_mtime_ns, st.st_size)
            if identity == self._identity:
                return False
            keys = parse_keys(self.path.read_bytes())
        except OSError:
            if not self._keys:
                raise
            return False  # keep the last keys: a rotation mid-swap must not lock us out
        if not keys or (self._keys and not self.valid(keys)):
            return False
        self._identity = identity
        changed = bool(self._keys) and keys != self._keys
        self._keys = keys
        self.reloads += changed
        return changed

    def accepted(self) -> tuple[bytes, ...]:
        self.refresh()
        return self._keys

    def current(self) -> bytes:
        return self.accepted()[0]

    def current_text(self) -> str:
        return self.current().decode()

    def accepted_text(self) -> tuple[str, ...]:
        return tuple(k.decode() for k in self.accepted())

    def secret(self) -> bytes:
        """Every key, one per line, first one first: the replication handshake's secret
        (engram_contract.formats.handshake), as of now."""
        return b"\n".join(self.accepted())
