"""Tail mode: throughput and latency of shipping the WAL Engram writes (docs/engram.md).

Three sidecars (fsync always, ackPolicy async), each with `engram_data_root`; a writer thread in
this process writes the primary's Engram files as Engram does (batches, one fsync per batch) and
notes the time each batch's fsync returned. The replicas' durable acks are read from the
primary's space view, polled every `POLL` seconds (10 ms); the latency of a batch is from
Engram's fsync to the first poll that shows every replica holding it durably (so it includes up
to one poll interval and one HTTP round trip: an upper bound).

- `10K/s`: the writer at 10,000 entries/s in Engram's 10 ms batches (100 entries);
- `max`: the writer as fast as it can in 1,000-entry batches; throughput from the first fsync to
  the last replica ack.

It is the `tailmode` scenario of `engram-replication bench` (a section of docs/benchmarks.md);
on its own:

    python -m engram_bench.tailmode [--seconds S] [--out FILE]

prints the table and writes the raw figures as JSON (default: bench/results/tailmode.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from engram_bench.report import Section, fmt_rate, percentile
from engram_bench.sidecars import BenchCluster, bench_dir
from engram_contract.formats import engram_wal

SPACE: Final = "tailbench"
PAYLOAD: Final = 100
POLL: Final = 0.010


@dataclass
class Run:
    name: str
    rate: float | None  # entries/s; None: as fast as possible
    batch: int
    fsyncs: list[tuple[int, float]] = field(default_factory=list)  # (entries so far, t)
    acks: list[tuple[int, float]] = field(default_factory=list)  # (all replicas hold, t)


def _batches(run: Run, count: int) -> list[bytes]:
    """The writer's batches, encoded before the clock starts: the writer thread then costs
    little CPU (and no GIL time the observer needs) beyond write and fsync."""
    pad = b"x" * PAYLOAD
    out = []
    for first in range(0, count, run.batch):
        n = min(run.batch, count - first)
        out.append(
            b"".join(
                engram_wal.encode(
                    sequence=first + i, timestamp_ns=time.time_ns(), entry_type=1, payload=pad
                )
                for i in range(n)
            )
        )
    return out


def _write(wal: Path, run: Run, batches: list[bytes], stop: threading.Event) -> None:
    """Engram's writer: one file, a write and an fsync per batch (`FsyncMode::PerBatch`)."""
    wal.mkdir(parents=True, exist_ok=True)
    name = wal / engram_wal.file_name(int(time.time()))
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t0 = time.perf_counter()
    done = 0
    try:
        for data in batches:
            if stop.is_set():
                break
            os.write(fd, data)
            os.fsync(fd)
            done += min(run.batch, len(data) // (engram_wal.HEADER_SIZE + PAYLOAD))
            run.fsyncs.append((done, time.perf_counter()))
            if run.rate is not None:
                ahead = done / run.rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        os.close(fd)


async def _observe(c: BenchCluster, run: Run, count: int, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    last = -1
    while time.perf_counter() < deadline:
        v = await c.space_view("p", SPACE)
        reps = v.get("replicas", {})
        held = min((r["acked_sequence"] for r in reps.values()), default=0)
        if held != last:
            run.acks.append((held, time.perf_counter()))
            last = held
        if held >= count:
            return
        await asyncio.sleep(POLL)
    raise RuntimeError(f"{run.name}: replicas held {last} of {count} after {timeout} s")


def _latencies(run: Run) -> list[float]:
    out = []
    j = 0
    for upto, t in run.fsyncs:
        while j < len(run.acks) and run.acks[j][0] < upto:
            j += 1
        if j < len(run.acks):
            out.append(run.acks[j][1] - t)
    return out


async def _one(root: Path, run: Run, count: int) -> dict[str, Any]:
    async with BenchCluster(root / run.name) as c:
        for n in ("p", "r1", "r2"):
            c.add_node(n, fsync="always", engram_data_root=root / run.name / f"{n}-engram")
        await c.start()
        await c.assign(SPACE, "p", ["r1", "r2"], ack_policy="async")
        await asyncio.sleep(0.5)  # the first lease
        stop = threading.Event()
        wal = root / run.name / "p-engram" / SPACE / "wal"
        batches = _batches(run, count)
        writer = threading.Thread(target=_write, args=(wal, run, batches, stop), daemon=True)
        writer.start()
        try:
            await _observe(c, run, count, timeout=120.0)
        finally:
            stop.set()
            writer.join(timeout=10.0)
    lat = _latencies(run)
    span = run.acks[-1][1] - run.fsyncs[0][1] if run.acks and run.fsyncs else float("nan")
    written = run.fsyncs[-1][1] - run.fsyncs[0][1] if len(run.fsyncs) > 1 else float("nan")
    return {
        "name": run.name,
        "entries": count,
        "writer_entries_per_s": count / written if written > 0 else None,
        "shipped_entries_per_s": count / span if span > 0 else None,
        "latency_p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "latency_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "latency_max_ms": max(lat) * 1e3 if lat else None,
        "batches": len(run.fsyncs),
    }


async def bench(seconds: float, max_entries: int = 200_000) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tailmode-", dir=bench_dir()) as tmp:
        root = Path(tmp)
        out = [await _one(root, Run("10K-per-s", 10_000.0, 100), int(10_000 * seconds))]
        out.append(await _one(root, Run("max", None, 1000), max_entries))
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else fmt_rate(value)


def section(res: list[dict[str, Any]], seconds: float) -> Section:
    """The scenario's table for docs/benchmarks.md (pure: the figures in, a Section out)."""
    s = Section(
        key="tailmode",
        title="Tail mode: Engram's own WAL shipped to 2 replicas (fsync always, ackPolicy async)",
        headers=[
            "run",
            "entries",
            "Engram writer",
            "shipped, durable on both replicas",
            "Engram fsync → both durable: P50",
            "P99",
            "max",
        ],
        data={"runs": res, "seconds": seconds},
    )
    names = {"10K-per-s": "10K entries/s (100-entry batches)", "max": "as fast as possible"}
    for r in res:
        s.rows.append(
            [
                names.get(r["name"], r["name"]),
                f"{r['entries']:,}",
                _rate(r["writer_entries_per_s"]),
                _rate(r["shipped_entries_per_s"]),
                _ms(r["latency_p50_ms"]),
                _ms(r["latency_p99_ms"]),
                _ms(r["latency_max_ms"]),
            ]
        )
    s.notes = [
        "Three sidecars with `engram_data_root` (docs/engram.md); a writer thread in the bench "
        "process writes the primary's Engram WAL files as Engram does (one fsync per batch) and "
        "notes when each fsync returned. Replica durability is read from the primary's space "
        f"view every {POLL * 1e3:.0f} ms, so each latency is an upper bound (up to one poll and "
        "one HTTP round trip).",
        "In the second run the writer outruns the shippers on purpose; its latencies are "
        "queueing, and 'shipped' is the tail's sustained rate (the replicas also write the "
        "Engram-format mirror, every entry a second time).",
        f"The writer, three sidecars and the bench share the machine's {os.cpu_count()} cores.",
    ]
    return s


def run(*, quick: bool) -> Section:
    seconds = 1.0 if quick else 10.0
    res = asyncio.run(bench(seconds, 20_000 if quick else 200_000))
    return section(res, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engram_bench.tailmode")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the 10K/s run")
    p.add_argument("--out", type=Path, default=Path("bench/results/tailmode.json"))
    a = p.parse_args(argv)
    res = asyncio.run(bench(a.seconds))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(section(res, a.seconds).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
