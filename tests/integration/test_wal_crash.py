"""Crash safety of the WAL: SIGKILL a writer at random moments, over and over, on one data dir.

After every kill the log must reopen to a gap-free prefix 1..last holding every entry the writer
acknowledged (same payload), and take its next append at last + 1. The kill points are random but
seeded, so a failure can be replayed.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engram_contract.formats.entry import EntryType
from engram_contract.ids import SpaceId
from engram_sidecar.log.wal import SpaceLog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WRITER = Path(__file__).with_name("wal_writer.py")
SPACE = SpaceId("crash-space")
SEED = 20240605
KILLS = 24
SEGMENT_BYTES = 16 * 1024  # small, so that kills also land around rotations
WAIT = 20.0  # seconds: the bound on any single wait for the writer


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


class Pipe:
    """Line reader over a subprocess's stdout with a deadline on every wait."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[str] = []
        self.stderr = stderr
        self.eof = False

    def _read_once(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"writer too slow; stderr: {self.stderr.read_text()[-2000:]}")
        ready, _, _ = select.select([self.fd], [], [], left)
        if not ready:
            return
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        *complete, self.buf = self.buf.split(b"\n")
        self.lines += [c.decode() for c in complete]

    def wait_lines(self, n: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.lines) < n:
            self._read_once(deadline)
            if self.eof:
                raise AssertionError(
                    f"writer exited early ({self.proc.poll()}); stderr: "
                    f"{self.stderr.read_text()[-2000:]}"
                )

    def drain(self) -> None:
        """Read what the dead writer left in the pipe; a partial last line is not an ack."""
        deadline = time.monotonic() + WAIT
        while not self.eof:
            self._read_once(deadline)


def check_log(data: Path, acked: dict[int, str], epoch: int) -> int:
    """Reopen the log, check it against every acknowledged entry, append one more; return last."""
    lg = SpaceLog(data / SPACE, space=SPACE, segment_bytes=SEGMENT_BYTES)
    try:
        last = lg.last_sequence
        entries = lg.read_entries(1, limit=last + 1)
        assert [e.sequence for e in entries] == list(range(1, last + 1)), "gap in the log"
        lost = sorted(s for s in acked if s > last)
        assert not lost, f"acknowledged entries lost: {lost[:10]} (log ends at {last})"
        wrong = [s for s, h in acked.items() if digest(entries[s - 1].payload) != h]
        assert not wrong, f"acknowledged entries changed: {wrong[:10]}"
        epochs = [e.epoch for e in entries]
        assert epochs == sorted(epochs)
        assert [e for e, _ in lg.history] == sorted({e for e, _ in lg.history})
        assert lg.last_epoch <= epoch
        probe = f"probe after {last}".encode()
        assert lg.append([(EntryType.CHECKPOINT, probe)], epoch=epoch) == (last + 1, last + 1)
        assert lg.sync() == last + 1
        acked[last + 1] = digest(probe)
        return last + 1
    finally:
        lg.close()


def test_wal_crash_sigkill_never_loses_an_acknowledged_entry(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    data = tmp_path / "data"
    acked: dict[int, str] = {}
    last = 0
    kills_with_acks = 0
    for i in range(KILLS):
        epoch = 1 + i // 6  # a new epoch now and then, as after a promotion
        # K acknowledged lines before the kill: sometimes none (kill during the first append).
        k = 0 if rng.random() < 0.15 else rng.randint(1, 250)
        err = tmp_path / f"writer-{i}.err"
        with err.open("wb") as err_f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WRITER),
                    str(data),
                    SPACE,
                    str(epoch),
                    str(SEED + i),
                    str(SEGMENT_BYTES),
                    str(rng.choice((2, 4, 8))),
                ],
                stdout=subprocess.PIPE,
                stderr=err_f,
            )
        pipe = Pipe(proc, err)
        try:
            pipe.wait_lines(1 + k)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=WAIT)
        pipe.drain()
        assert proc.stdout is not None
        proc.stdout.close()
        head, *acks = pipe.lines
        assert head.split()[:2] == ["open", str(last)], head  # the writer recovered what we saw
        for line in acks:
            seq, h = line.split()
            assert int(seq) not in acked, f"sequence {seq} acknowledged twice"
            acked[int(seq)] = h
        kills_with_acks += bool(acks)
        last = check_log(data, acked, epoch)
    assert kills_with_acks >= KILLS // 2
    assert last > KILLS

    res = subprocess.run(
        [sys.executable, "-m", "engram_operator.cli", "wal", "verify", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{SPACE}: ok: {last} entries" in res.stdout
    assert len(list((data / SPACE / "wal").iterdir())) > 2  # kills landed across rotations
