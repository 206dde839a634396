"""Writes a memory space's WAL files the way Engram does, for the tail-mode tests.

Engram's behaviour, from `engram-core/src/storage/wal.rs` (docs/engram.md): a process start
(`WalWriter::new`) creates `wal-{unix_seconds:016x}.log` (create + append, mode 0600) with its
sequence counter at 0; the writer thread batches up to 1000 entries or 10 ms, writes them through
a 64 KiB buffer and fsyncs the batch. At start-up, after recovery, `compact_from_memory` writes
the episodes in memory to `wal-{secs:016x}.log.tmp` (sequences from 0, fresh timestamps), fsyncs
it, renames it to `.log` and deletes every other `.log` file.

Also a command line, to write at a given rate from another process:

    python tests/engram_writer.py WAL_DIR COUNT RATE [PAYLOAD_BYTES]

writes COUNT EpisodeStore entries at RATE entries/s (batches every 10 ms or 1000 entries) and
prints `done <count> <seconds>`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engram_contract.formats import engram_wal

EPISODE, UPDATE, DELETE, CHECKPOINT = 1, 2, 3, 5
BATCH_ENTRIES = 1000
BATCH_DELAY = 0.010
BUFFER = 64 * 1024


@dataclass(frozen=True)
class Written:
    entry_type: int
    timestamp_ns: int
    payload: bytes


class EngramWriter:
    """One Engram space's WAL directory. `start` is a process start; `write` a batch."""

    def __init__(self, wal_dir: Path) -> None:
        self.dir = wal_dir
        self.fd = -1
        self.path: Path | None = None
        self.sequence = 0
        self.written: list[Written] = []  # every complete, valid entry, in write order
        self.episodes: list[bytes] = []  # what a compaction would rewrite

    def start(self, seconds: int | None = None) -> Path:
        """`WalWriter::new`: a new file named for now (or `seconds`), sequences from 0."""
        self.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        secs = int(time.time()) if seconds is None else seconds
        self.path = self.dir / engram_wal.file_name(secs)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.sequence = 0
        return self.path

    def _encode(self, entry_type: int, payload: bytes) -> bytes:
        ts = time.time_ns()
        data = engram_wal.encode(
            sequence=self.sequence, timestamp_ns=ts, entry_type=entry_type, payload=payload
        )
        self.sequence += 1
        self.written.append(Written(entry_type, ts, payload))
        if entry_type == EPISODE:
            self.episodes.append(payload)
        return data

    def _out(self, data: bytes, *, fsync: bool = True) -> None:
        # BufWriter with a 64 KiB buffer: large batches reach the file in 64 KiB writes.
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view[:BUFFER])
            view = view[n:]
        if fsync:
            os.fsync(self.fd)

    def write(self, records: list[tuple[int, bytes]], *, fsync: bool = True) -> None:
        """One batch: every entry, then one fsync (`FsyncMode::PerBatch`)."""
        self._out(b"".join(self._encode(t, p) for t, p in records), fsync=fsync)

    def write_torn(self, entry_type: int, payload: bytes, keep: int) -> bytes:
        """The first `keep` bytes of an entry (a write cut short); returns the rest. The entry
        is not in `written` until `finish_torn` writes the rest."""
        ts = time.time_ns()
        data = engram_wal.encode(
            sequence=self.sequence, timestamp_ns=ts, entry_type=entry_type, payload=payload
        )
        self._out(data[:keep])
        self._torn = (Written(entry_type, ts, payload), data[keep:])
        return data[keep:]

    def finish_torn(self) -> None:
        w, rest = self._torn
        self._out(rest)
        self.sequence += 1
        self.written.append(w)
        if w.entry_type == EPISODE:
            self.episodes.append(w.payload)

    def write_corrupt(self, payload: bytes) -> None:
        """An entry whose payload no longer matches its CRC (a bit flipped on disk)."""
        data = bytearray(
            engram_wal.encode(
                sequence=self.sequence,
                timestamp_ns=time.time_ns(),
                entry_type=EPISODE,
                payload=payload,
            )
        )
        data[-1] ^= 0x01
        self.sequence += 1
        self._out(bytes(data))

    def compact(self, seconds: int | None = None) -> Path:
        """`compact_from_memory`: every episode in memory to a new file, then delete the rest."""
        secs = int(time.time()) if seconds is None else seconds
        tmp = self.dir / (engram_wal.file_name(secs) + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            parts = [
                engram_wal.encode(
                    sequence=i, timestamp_ns=time.time_ns(), entry_type=EPISODE, payload=p
                )
                for i, p in enumerate(self.episodes)
            ]
            data = memoryview(b"".join(parts))
            while data:
                data = data[os.write(fd, data[:BUFFER]) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.dir / engram_wal.file_name(secs)
        os.replace(tmp, final)
        for p in self.dir.iterdir():
            if p != final and p.suffix == ".log":
                p.unlink()
        return final

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def payload_for(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (f"ep-{i}:".encode() + seed * (size // 32 + 1))[:size]


def run_at_rate(wal_dir: Path, count: int, rate: float, size: int) -> float:
    """Write `count` episodes at `rate` entries/s in Engram's batches. Returns seconds taken."""
    w = EngramWriter(wal_dir)
    w.start()
    t0 = time.monotonic()
    i = 0
    while i < count:
        due = min(count, int((time.monotonic() - t0) * rate) + 1)
        n = min(BATCH_ENTRIES, max(1, due - i))
        w.write([(EPISODE, payload_for(j, size)) for j in range(i, i + n)])
        i += n
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(min(ahead, BATCH_DELAY))
    w.close()
    return time.monotonic() - t0


if __name__ == "__main__":
    wal, n, r = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    took = run_at_rate(wal, n, r, size)
    print(f"done {n} {took:.3f}", flush=True)
