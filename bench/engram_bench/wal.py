"""WAL append throughput and latency with fsync `always`, next to a raw write+fsync baseline.

Rows:
- raw baseline: one writer, `os.write` + `os.fsync` of one encoded 164-byte entry per append, on
  the same filesystem: what a single durable append costs this disk with no WAL code at all.
- group commit at 1, 8 and 64 concurrent writers: asyncio tasks each doing sequential
  single-entry appends of 100-byte payloads through `GroupCommit(policy="always")`, latency per
  append timed with `time.perf_counter`.
- batched: appends of 100 entries each (how the replica path and a batching client write).

Each scenario runs until it reaches its append count or its time budget, whichever comes first,
so a slow disk shortens the run instead of stretching it. Data goes to a temporary directory on
the current directory's filesystem (never /dev/shm: fsync on tmpfs costs nothing and would flatter
every figure), or under $ENGRAM_BENCH_DIR when set.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engram_bench.report import Section, fmt_ms, fmt_rate, percentile, ratio
from engram_contract.formats.entry import HEADER_SIZE, EntryType, encode_entry
from engram_contract.ids import SpaceId
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import SpaceLog

PAYLOAD_BYTES = 100
BATCH = 100
P99_GOAL_S = 0.010
BATCHED_GOAL_PER_S = 100_000.0


@dataclass(frozen=True)
class Budget:
    seconds: float  # per scenario
    appends: int  # per scenario, across all writers


@dataclass
class Result:
    name: str
    writers: int
    entries_per_append: int
    appends: int
    entries: int
    elapsed_s: float
    p50_s: float
    p99_s: float
    fsyncs: int

    @property
    def entries_per_s(self) -> float:
        return self.entries / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _payload(i: int) -> bytes:
    head = f"episode {i:012d} ".encode()
    return head + b"m" * (PAYLOAD_BYTES - len(head))


def raw_baseline(path: Path, budget: Budget) -> Result:
    """One writer: write one encoded entry, fsync, repeat. No WAL code involved."""
    entry = encode_entry(
        sequence=1, timestamp_ns=time.time_ns(), entry_type=1, epoch=1, payload=_payload(0)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lat: list[float] = []
    try:
        os.write(fd, entry)  # warm-up: allocate the file's first block
        os.fsync(fd)
        t0 = time.perf_counter()
        stop = t0 + budget.seconds
        while len(lat) < budget.appends:
            a = time.perf_counter()
            os.write(fd, entry)
            os.fsync(fd)
            b = time.perf_counter()
            lat.append(b - a)
            if b >= stop:
                break
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    n = len(lat)
    return Result(
        "raw write+fsync", 1, 1, n, n, elapsed, percentile(lat, 50), percentile(lat, 99), n
    )


async def _group_commit(
    space_dir: Path, name: str, writers: int, per_append: int, budget: Budget
) -> Result:
    space = SpaceId(space_dir.name)
    lg = SpaceLog(space_dir, space=space)
    gc = GroupCommit(lg, policy="always")
    lat: list[float] = []
    try:
        await gc.append([(EntryType.EPISODE_STORE, _payload(0))], epoch=1)  # warm-up
        fsyncs0 = gc.fsyncs
        per_writer = max(1, budget.appends // writers)
        t0 = time.perf_counter()
        stop = t0 + budget.seconds

        async def writer(w: int) -> None:
            recs = [
                (EntryType.EPISODE_STORE, _payload(w * 1_000_000 + j)) for j in range(per_append)
            ]
            for _ in range(per_writer):
                a = time.perf_counter()
                await gc.append(recs, epoch=1)
                b = time.perf_counter()
                lat.append(b - a)
                if b >= stop:
                    return

        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - t0
        fsyncs = gc.fsyncs - fsyncs0
    finally:
        await gc.stop()
        lg.close()
    n = len(lat)
    return Result(
        name,
        writers,
        per_append,
        n,
        n * per_append,
        elapsed,
        percentile(lat, 50),
        percentile(lat, 99),
        fsyncs,
    )


def _filesystem(path: Path) -> str:
    """The filesystem type holding `path`, from /proc/mounts (Linux), else "unknown"."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    best, kind = "", "unknown"
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1]
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return f"{kind} at {best}" if best else kind


def run(*, quick: bool) -> Section:
    # quick: ~0.35 s per scenario, 6 scenarios; full: up to ~8 s per scenario.
    budget = Budget(0.3, 20_000) if quick else Budget(8.0, 200_000)
    base = Path(os.environ.get("ENGRAM_BENCH_DIR") or Path.cwd())
    base.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix=".engram-bench-wal-", dir=base) as tmp:
        root = Path(tmp)
        fs = _filesystem(root)
        raw = raw_baseline(root / "raw.bin", budget)
        scenarios = [
            ("group commit", 1, 1),
            ("group commit", 8, 1),
            ("group commit", 64, 1),
            ("batched appends", 1, BATCH),
            ("batched appends", 8, BATCH),
        ]
        for i, (name, writers, per_append) in enumerate(scenarios):
            # Batched appends carry 100 entries each: fewer appends keep the WAL's size sane.
            b = budget if per_append == 1 else Budget(budget.seconds, budget.appends // 50)
            results.append(
                asyncio.run(_group_commit(root / f"bench-{i}", name, writers, per_append, b))
            )

    section = Section(
        key="wal",
        title="WAL appends (fsync always)",
        headers=[
            "scenario",
            "writers",
            "entries/append",
            "appends",
            "fsyncs",
            "entries/s",
            "vs raw",
            "append P50",
            "append P99",
            "P99 vs raw",
        ],
    )
    for r in [raw, *results]:
        section.rows.append(
            [
                r.name,
                str(r.writers),
                str(r.entries_per_append),
                f"{r.appends:,}",
                f"{r.fsyncs:,}",
                fmt_rate(r.entries_per_s),
                ratio(r.entries_per_s, raw.entries_per_s),
                fmt_ms(r.p50_s),
                fmt_ms(r.p99_s),
                ratio(r.p99_s, raw.p99_s),
            ]
        )
    gc64 = next(r for r in results if r.writers == 64 and r.entries_per_append == 1)
    best_batched = max(
        (r for r in results if r.entries_per_append == BATCH), key=lambda r: r.entries_per_s
    )
    p99_ok = gc64.p99_s < P99_GOAL_S
    rate_ok = best_batched.entries_per_s >= BATCHED_GOAL_PER_S
    section.notes = [
        f"Payloads of {PAYLOAD_BYTES} bytes ({PAYLOAD_BYTES + HEADER_SIZE} bytes per entry on "
        "disk). "
        f"Data on {fs}. Budget per scenario: {budget.seconds:g} s or {budget.appends:,} appends"
        f"{' (quick run)' if quick else ''}.",
        "Baseline: one writer doing os.write + os.fsync per entry, measured in the same run. "
        "'vs raw' divides by the baseline's entries/s (higher is better) or P99 (lower is better).",
        f"Goal: append P99 < {P99_GOAL_S * 1000:g} ms with 64 writers: "
        f"{'met' if p99_ok else 'NOT met'} ({fmt_ms(gc64.p99_s)}).",
        f"Goal: >= {BATCHED_GOAL_PER_S:,.0f} entries/s with batched appends: "
        f"{'met' if rate_ok else 'NOT met'} ({fmt_rate(best_batched.entries_per_s)}, "
        f"{best_batched.writers} writer(s)).",
        f"Group commit at 64 writers: {gc64.appends:,} appends in {gc64.fsyncs:,} fsyncs "
        f"({gc64.appends / max(gc64.fsyncs, 1):.1f} appends per fsync).",
    ]
    section.data = {
        "quick": quick,
        "filesystem": fs,
        "budget": asdict(budget),
        "results": [{**asdict(r), "entries_per_s": r.entries_per_s} for r in [raw, *results]],
        "goals": {
            "p99_64_writers_s": {"goal": P99_GOAL_S, "value": gc64.p99_s, "met": p99_ok},
            "batched_entries_per_s": {
                "goal": BATCHED_GOAL_PER_S,
                "value": best_batched.entries_per_s,
                "met": rate_ok,
            },
        },
    }
    return section
