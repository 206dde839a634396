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

    python -m engram_bench.tailmode [--seconds S] [--out FILE]

Prints a table, and writes the raw figures as JSON (default: bench/results/tailmode.json).
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

from engram_bench.report import percentile
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


async def bench(seconds: float) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="tailmode-", dir=bench_dir()))
    out = [await _one(root, Run("10K-per-s", 10_000.0, 100), int(10_000 * seconds))]
    out.append(await _one(root, Run("max", None, 1000), 200_000))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engram_bench.tailmode")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the 10K/s run")
    p.add_argument("--out", type=Path, default=Path("bench/results/tailmode.json"))
    a = p.parse_args(argv)
    res = asyncio.run(bench(a.seconds))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print("| run | entries | Engram writer | shipped to both replicas | P50 | P99 | max |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        print(
            f"| {r['name']} | {r['entries']:,} | {r['writer_entries_per_s'] or 0:,.0f}/s | "
            f"{r['shipped_entries_per_s'] or 0:,.0f}/s | {r['latency_p50_ms'] or 0:.2f} ms | "
            f"{r['latency_p99_ms'] or 0:.2f} ms | {r['latency_max_ms'] or 0:.2f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
