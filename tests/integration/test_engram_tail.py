"""Tail mode with real sidecar processes: the primary ships the WAL files an Engram-like writer
(tests/engram_writer.py) writes, and the replicas write them again as Engram files.

Checked every time: every replica's log holds exactly the writer's entries (type, timestamp and
payload byte for byte, none lost, none twice, in order), and the Engram files each replica wrote
recover, by an independent reader that follows Engram's recovery rules, to the same entries.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c
from tests.engram_writer import CHECKPOINT, DELETE, EPISODE, UPDATE, EngramWriter, Written
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration

SPACE = "mem"
ROOT = Path(__file__).resolve().parents[2]


# ---- an independent reader: Engram's `WalReader::scan_all`, written from its rules ------------


def engram_recovery(wal_dir: Path) -> list[tuple[int, int, int, bytes]]:
    """(sequence, type, timestamp, payload) as Engram's recovery would replay them: files named
    `wal-*.log` in name order; in each, entries until a bad magic/header CRC or a short header,
    an entry with a bad payload CRC skipped, a short payload an error; then all sorted by
    sequence (a stable sort)."""
    out: list[tuple[int, int, int, bytes]] = []
    names = sorted(n for n in os.listdir(wal_dir) if n.startswith("wal-") and n.endswith(".log"))
    for name in names:
        data = (wal_dir / name).read_bytes()
        pos = 0
        while len(data) - pos >= 64:
            magic, seq, ts, etype, size, pcrc, hcrc = struct.unpack_from("<IQQIIII", data, pos)
            if magic != 0xDEADBEEF or hcrc != crc32c(
                data[pos + 36 : pos + 56], crc32c(data[pos : pos + 32])
            ):
                break
            payload = data[pos + 64 : pos + 64 + size]
            if len(payload) != size:
                raise AssertionError(f"{name}: payload cut short at {pos}: Engram's recovery fails")
            if crc32c(payload) == pcrc:
                out.append((seq, etype, ts, payload))
            pos += 64 + size
    out.sort(key=lambda e: e[0])
    return out


def as_written(entries: list[Any]) -> list[Written]:
    return [Written(e.entry_type, e.timestamp_ns, e.payload) for e in entries]


async def start_tail_cluster(cluster: Cluster, tmp: Path, **flags: object) -> dict[str, Path]:
    roots = {n: tmp / n / "engram" for n in ("a", "b", "c")}
    for n, root in roots.items():
        root.mkdir(parents=True)
        cluster.add_node(n, engram_data_root=root, **flags)
    await cluster.start()
    await cluster.assign(SPACE, "a", ["b", "c"])
    return roots


async def wait_shipped(cluster: Cluster, count: int, *, timeout: float = 30.0) -> None:
    async def there() -> bool:
        v = await cluster.space_view("a", SPACE)
        return bool(v["last_sequence"] >= count)

    await cluster.wait_until(there, timeout=timeout, what=f"{count} entries shipped from Engram")
    await cluster.wait_replicated(SPACE, "a", timeout=timeout)


async def wait_mirrored(cluster: Cluster, roots: dict[str, Path], count: int) -> None:
    for n in ("b", "c"):

        async def mirrored(n: str = n) -> bool:
            v = await cluster.space_view(n, SPACE)
            return bool(v["engram"].get("sequence") == count)

        await cluster.wait_until(mirrored, timeout=20.0, what=f"Engram mirror on {n}")


def check_all(cluster: Cluster, roots: dict[str, Path], want: list[Written]) -> None:
    for n in ("a", "b", "c"):
        got = cluster[n].wal_entries(SPACE)
        assert [e.sequence for e in got] == list(range(1, len(got) + 1)), n
        assert as_written(got) == want, f"node {n}: the log differs from what Engram wrote"
    for n in ("b", "c"):
        rec = engram_recovery(roots[n] / SPACE / "wal")
        assert [r[0] for r in rec] == list(range(1, len(want) + 1))
        assert [Written(t, ts, p) for _, t, ts, p in rec] == want, f"{n}: Engram files differ"


# ---- the whole story, with inotify and with polling -------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("watch", ["inotify", "poll"])
async def test_tail_restarts_torn_tail_compaction(
    cluster: Cluster, tmp_path: Path, watch: str
) -> None:
    roots = await start_tail_cluster(cluster, tmp_path, engram_watch=watch)
    w = EngramWriter(roots["a"] / SPACE / "wal")
    w.start(seconds=1_700_000_000)
    mixed = [
        (EPISODE, b"episode-1"),
        (UPDATE, b"m" * 300),
        (DELETE, b"memory-7"),
        (CHECKPOINT, struct.pack("<Q", 2)),
        (EPISODE, b""),
    ]
    w.write(mixed)
    for i in range(20):
        w.write([(EPISODE, b"e%d-%d" % (i, j) * (j + 1)) for j in range(50)])
    await wait_shipped(cluster, len(w.written))

    # A torn tail waits: nothing of it is shipped until the rest arrives.
    w.write_torn(EPISODE, b"torn-entry" * 50, keep=100)
    await asyncio.sleep(0.3)
    assert (await cluster.space_view("a", SPACE))["last_sequence"] == len(w.written)
    w.finish_torn()
    w.write([(EPISODE, b"after-torn")])
    await wait_shipped(cluster, len(w.written))

    # An Engram restart: a new file, sequences from 0, followed from its start.
    w.start(seconds=1_700_000_100)
    w.write([(EPISODE, b"second-process-%d" % i) for i in range(200)])
    await wait_shipped(cluster, len(w.written))

    # Restart with compaction: Engram's new file, then its compaction output replaces every
    # file. The compaction restates episodes already shipped: nothing new is shipped.
    w.start(seconds=1_700_000_200)
    w.compact(seconds=1_700_000_201)
    await cluster.wait_until(
        lambda: _metric_at_least(cluster, "engram_replication_engram_tail_compactions_total", 1),
        timeout=10.0,
        what="the compaction recognised",
    )
    # Then a later start writes new entries in a new file.
    w.start(seconds=1_700_000_300)
    w.write([(EPISODE, b"third-%d" % i) for i in range(100)])
    await wait_shipped(cluster, len(w.written))
    await wait_mirrored(cluster, roots, len(w.written))
    view = await cluster.space_view("a", SPACE)
    assert view["engram"]["mode"] == "tail" and view["engram"]["watch"] == watch
    assert view["engram"]["state"] == "following"
    assert view["engram"]["compacted_files"] == ["wal-000000006553f1c9.log"]
    check_all(cluster, roots, w.written)
    w.close()


async def _metric_at_least(cluster: Cluster, sample: str, n: float) -> bool:
    return await cluster.metric("a", sample, space=SPACE) >= n


# ---- a corrupt entry mid-file stops the space's tail, visibly ------------------------------------


@pytest.mark.timeout(60)
async def test_corrupt_entry_stops_the_tail(cluster: Cluster, tmp_path: Path) -> None:
    roots = await start_tail_cluster(cluster, tmp_path)
    w = EngramWriter(roots["a"] / SPACE / "wal")
    w.start()
    w.write([(EPISODE, b"good-%d" % i) for i in range(10)])
    good = list(w.written)
    w.write_corrupt(b"flipped")
    w.write([(EPISODE, b"after-%d" % i) for i in range(10)])

    async def stopped() -> dict[str, Any] | None:
        v = await cluster.space_view("a", SPACE)
        return v if v["engram"].get("state") == "stopped" else None

    v = await cluster.wait_until(stopped, timeout=10.0, what="the tail to stop")
    assert "bad entry" in v["engram"]["error"] and "CRC32C" in v["engram"]["error"]
    assert v["last_sequence"] == 10
    assert await cluster.metric("a", "engram_replication_engram_tail_stopped", space=SPACE) == 1
    errors = await cluster.metric(
        "a", "engram_replication_engram_tail_errors_total", space=SPACE, kind="corrupt"
    )
    assert errors == 1
    await cluster.wait_replicated(SPACE, "a")
    for n in ("a", "b", "c"):
        assert as_written(cluster[n].wal_entries(SPACE)) == good
    # Writes over HTTP are refused for a space fed by Engram's WAL.
    r = await cluster.write_json("a", SPACE, [{"payload": "x"}])
    assert r.status == 503 and "Engram" in str(r.body)
    w.close()


# ---- SIGKILL of the sidecar in the middle of a file, at 10K entries/s ---------------------------


def _writer_process(wal_dir: Path, count: int, rate: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "engram_writer.py"),
            str(wal_dir),
            str(count),
            str(rate),
            "100",
        ],
        stdout=subprocess.PIPE,
    )


def _written_by_process(wal_dir: Path) -> list[Written]:
    return [Written(t, ts, p) for _, t, ts, p in engram_recovery(wal_dir)]


@pytest.mark.timeout(120)
async def test_sigkill_mid_file_resumes_without_gap_or_duplicate(
    cluster: Cluster, tmp_path: Path
) -> None:
    roots = await start_tail_cluster(cluster, tmp_path)
    wal = roots["a"] / SPACE / "wal"
    proc = _writer_process(wal, 30_000, 10_000)
    try:

        async def some() -> bool:
            return bool((await cluster.space_view("a", SPACE))["last_sequence"] > 3000)

        await cluster.wait_until(some, timeout=20.0, what="entries shipped before the kill")
        cluster["a"].send(signal.SIGKILL)
        await asyncio.sleep(0.3)
        await cluster.start("a")
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        assert out.startswith(b"done 30000")
    finally:
        if proc.poll() is None:
            proc.kill()
    want = _written_by_process(wal)
    assert len(want) == 30_000
    await wait_shipped(cluster, len(want), timeout=60.0)
    await wait_mirrored(cluster, roots, len(want))
    check_all(cluster, roots, want)


# ---- throughput: 10K entries/s, and 100K entries/s (slow) ---------------------------------------


async def _at_rate(cluster: Cluster, tmp_path: Path, count: int, rate: int) -> None:
    roots = await start_tail_cluster(cluster, tmp_path)
    wal = roots["a"] / SPACE / "wal"
    proc = _writer_process(wal, count, rate)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    assert out.startswith(f"done {count}".encode())
    want = _written_by_process(wal)
    await wait_shipped(cluster, count, timeout=90.0)
    await wait_mirrored(cluster, roots, count)
    check_all(cluster, roots, want)


@pytest.mark.timeout(120)
async def test_10k_entries_per_second(cluster: Cluster, tmp_path: Path) -> None:
    await _at_rate(cluster, tmp_path, 30_000, 10_000)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_100k_entries_per_second(cluster: Cluster, tmp_path: Path) -> None:
    await _at_rate(cluster, tmp_path, 300_000, 100_000)


def test_engram_recovery_reader_rejects_what_engram_rejects(tmp_path: Path) -> None:
    w = EngramWriter(tmp_path)
    w.start(seconds=5)
    w.write([(EPISODE, b"a"), (EPISODE, b"b")])
    w.write_corrupt(b"c")  # skipped by Engram: payload CRC
    w.write([(EPISODE, b"d")])
    w.close()
    got = engram_recovery(tmp_path)
    assert [p for *_, p in got] == [b"a", b"b", b"d"]
    with open(tmp_path / "wal-0000000000000009.log", "wb") as f:
        f.write(b"\xef\xbe\xad\xde" + bytes(60))  # bad header CRC: the file ends there
    assert len(engram_recovery(tmp_path)) == 3


@pytest.mark.timeout(60)
async def test_crash_between_append_and_cursor_rolls_forward(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The cursor is replaced only after the append is durable; a crash between the two leaves
    it behind the log. Put an older cursor back while the node is down: the restart must match
    the log's extra entries against Engram's file and go on with no duplicate and no gap."""
    roots = await start_tail_cluster(cluster, tmp_path)
    w = EngramWriter(roots["a"] / SPACE / "wal")
    w.start()
    w.write([(EPISODE, b"one-%d" % i) for i in range(100)])
    await wait_shipped(cluster, 100)
    cursor = cluster["a"].space_dir(SPACE) / "engram-tail.json"
    old = cursor.read_bytes()
    w.write([(UPDATE, b"two-%d" % i) for i in range(100)])
    await wait_shipped(cluster, 200)
    await cluster["a"].stop()
    cursor.write_bytes(old)
    await cluster.start("a")
    w.write([(EPISODE, b"three-%d" % i) for i in range(100)])
    await wait_shipped(cluster, 300)
    await wait_mirrored(cluster, roots, 300)
    check_all(cluster, roots, w.written)
    assert "rolled forward to 200" in (tmp_path / "a.log").read_text()
    w.close()


# ---- promotion: the new primary tails its own Engram, the deposed one restarts from a mirror ----


@pytest.mark.timeout(90)
async def test_promotion_new_primary_tails_its_engram_deposed_sets_its_files_aside(
    cluster: Cluster, tmp_path: Path
) -> None:
    roots = await start_tail_cluster(cluster, tmp_path)
    wa = EngramWriter(roots["a"] / SPACE / "wal")
    wa.start(seconds=1_700_000_000)
    wa.write([(EPISODE, b"before-%d" % i) for i in range(300)])
    await wait_shipped(cluster, 300)
    await wait_mirrored(cluster, roots, 300)
    replicated = list(wa.written)

    # a loses its lease, Engram on a writes on (never shipped), then a dies; b is promoted.
    cluster.lease_paused.add("a")
    await asyncio.sleep(2.0)  # past the 1.5 s write lease
    wa.write([(EPISODE, b"unreplicated-%d" % i) for i in range(50)])
    await asyncio.sleep(0.3)
    assert (await cluster.space_view("a", SPACE))["last_sequence"] == 300
    await cluster["a"].stop()
    await cluster.assign(SPACE, "b", ["c", "a"], epoch=2, to=["b", "c"])

    async def tailing_b() -> dict[str, Any] | None:
        v = (await cluster.space_view("b", SPACE))["engram"]
        return v if v.get("mode") == "tail" and v.get("file") else None

    v = await cluster.wait_until(tailing_b, timeout=10.0, what="b to tail its own Engram files")
    assert v["sequence"] == 300  # from the end of what it holds

    # Engram starts on b's volume: it recovers the mirror (300 entries), compacts (not shipped
    # again), and a later start writes new entries, which b ships.
    wal_b = roots["b"] / SPACE / "wal"
    recovered = engram_recovery(wal_b)
    assert [Written(t, ts, p) for _, t, ts, p in recovered] == replicated
    wb = EngramWriter(wal_b)
    wb.episodes = [p for _, t, _, p in recovered if t == EPISODE]
    wb.start(seconds=1_800_000_000)
    wb.compact(seconds=1_800_000_001)
    wb.start(seconds=1_800_000_100)
    wb.write([(EPISODE, b"after-promotion-%d" % i) for i in range(100)])
    want = replicated + wb.written

    # a comes back deposed: its own Engram files (with the unreplicated 50) are set aside, and
    # it mirrors the replicated log for its Engram to restart from.
    await cluster.start("a")
    await cluster.assign(SPACE, "b", ["c", "a"], epoch=2, to=["a"])

    async def done() -> bool:
        views = [await cluster.space_view(n, SPACE) for n in ("a", "b", "c")]
        return all(v["last_sequence"] == len(want) for v in views) and all(
            v["engram"].get("sequence") == len(want) for v in views[::2]
        )

    await cluster.wait_until(done, timeout=30.0, what="every node to hold the new entries")
    for n in ("a", "b", "c"):
        assert as_written(cluster[n].wal_entries(SPACE)) == want, n
    for n in ("a", "c"):
        rec = engram_recovery(roots[n] / SPACE / "wal")
        assert [Written(t, ts, p) for _, t, ts, p in rec] == want, n
    aside = [p for p in (roots["a"] / SPACE).iterdir() if p.name.startswith("wal.deposed-")]
    assert len(aside) == 1
    assert len(engram_recovery(aside[0])) == 350
    wa.close()
    wb.close()


@pytest.mark.timeout(60)
async def test_sidecar_down_while_engram_restarts_and_compacts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Killed between an append and its cursor, and Engram restarted (and compacted, deleting
    the file) while the sidecar was down: the log's extra entries are taken as that file's, the
    compaction output is recognised without having seen its rename, and what Engram writes
    next is shipped once."""
    roots = await start_tail_cluster(cluster, tmp_path, engram_watch="poll")
    w = EngramWriter(roots["a"] / SPACE / "wal")
    w.start(seconds=1_700_000_000)
    w.write([(EPISODE, b"one-%d" % i) for i in range(50)])
    await wait_shipped(cluster, 50)
    cursor = cluster["a"].space_dir(SPACE) / "engram-tail.json"
    old = cursor.read_bytes()
    w.write([(EPISODE, b"two-%d" % i) for i in range(50)])
    await wait_shipped(cluster, 100)
    cluster["a"].send(signal.SIGKILL)
    await asyncio.sleep(0.2)
    cursor.write_bytes(old)
    w.start(seconds=1_700_000_100)
    w.compact(seconds=1_700_000_101)
    w.start(seconds=1_700_000_200)
    w.write([(UPDATE, b"three-%d" % i) for i in range(50)])
    await cluster.start("a")
    await wait_shipped(cluster, 150)
    await wait_mirrored(cluster, roots, 150)
    check_all(cluster, roots, w.written)
    view = (await cluster.space_view("a", SPACE))["engram"]
    assert view["compacted_files"] == ["wal-000000006553f165.log"]
    w.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watch", ["inotify", "poll"])
async def test_compaction_in_the_same_second_replaces_the_followed_file(
    cluster: Cluster, tmp_path: Path, watch: str
) -> None:
    """Engram's start creates its file, then compacts in the same second: the rename reuses
    the name, replacing the file the tail follows. Recognised by the inode change."""
    roots = await start_tail_cluster(cluster, tmp_path, engram_watch=watch)
    w = EngramWriter(roots["a"] / SPACE / "wal")
    w.start(seconds=1_700_000_000)
    w.write([(EPISODE, b"one-%d" % i) for i in range(80)])
    await wait_shipped(cluster, 80)
    w.start(seconds=1_700_000_050)  # the restart's new file, followed once it has data...

    async def following_new() -> bool:
        v = (await cluster.space_view("a", SPACE))["engram"]
        return bool(v.get("file") == "wal-000000006553f132.log")

    w.write([(UPDATE, b"two-%d" % i) for i in range(20)])
    await cluster.wait_until(following_new, timeout=10.0, what="the tail on the new file")
    await wait_shipped(cluster, 100)
    w.compact(seconds=1_700_000_050)  # ...and replaced under the same name by compaction
    w.start(seconds=1_700_000_060)
    w.write([(EPISODE, b"three-%d" % i) for i in range(30)])
    await wait_shipped(cluster, 130)
    await wait_mirrored(cluster, roots, 130)
    check_all(cluster, roots, w.written)
    view = (await cluster.space_view("a", SPACE))["engram"]
    assert view["compacted_files"] == ["wal-000000006553f132.log"]
    w.close()
