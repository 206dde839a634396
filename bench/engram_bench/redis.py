"""Us against Redis 7 at equal durability, the same workload, in one run.

Both systems run side by side on 127.0.0.1 for the whole scenario, and every measurement is
taken on one and then at once on the other:

- ours: sidecars (primary + 1 replica), fsync always, ackPolicy async, written to in the binary
  format (`engram_contract.writes`) and, in rows of their own, as NDJSON; and a primary with
  2 replicas under ackPolicy quorum (the binary format);
- Redis: Debian's redis-server, a primary and one replica (``replicaof``), AOF with
  ``appendfsync always`` on both, no RDB, no AOF rewrite (`redispeer.SETTINGS`).

The same workload: 100-byte payloads (the same bytes: for us one record per entry of one binary
HTTP request, or one line per entry of an NDJSON one, for Redis one ``XADD <stream> * p <line>``
per entry in one pipeline written at once), a space per stream, the same request sizes,
concurrency and schedule, driven by the same code (`load.open_loop` / `load.closed_loop`)
through clients equally lean (`leanhttp.LeanHttp`, `resp.RespPool`).

Measured: the most entries/s (8 concurrent requests of 1,000 entries, closed loop) accepted by
the primary and applied by the replica; write latency at open-loop loads of 1K..100K entries/s
(1,000 requests/s) from the intended send time; and replica lag over time while an open-loop
writer offers 80% of *our* measured maximum to each (the same absolute load). Baselines, same
run: a no-op round trip on each (GET /healthz, PING) at 1,000/s, and the disk's raw write+fsync.
When redis-server is not installed the sections say so and the scenario is skipped.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from engram_bench.load import (
    LoadResult,
    Sampler,
    closed_loop,
    median_run,
    open_loop,
    raw_fsync,
)
from engram_bench.redispeer import (
    SETTINGS,
    OursSide,
    RedisPair,
    RedisSide,
    offset_lag,
    redis_binary,
    redis_version,
)
from engram_bench.redisreport import render
from engram_bench.report import Section, percentile
from engram_bench.sidecars import BenchCluster, bench_dir
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE

PAYLOAD: Final = 100
REQUEST: Final = 1_000
CONCURRENCY: Final = 8
LAT_REQUESTS_PER_S: Final = 1_000
LOADS: Final = (1_000, 10_000, 50_000, 100_000)
QUORUM_LOADS: Final = (1_000, 10_000)  # quorum with 2 replicas: the light loads
LAG_SHARE: Final = 0.8
SAMPLE_S: Final = 0.05


@dataclass(frozen=True)
class Budget:
    tput_s: float
    load_s: float
    noop_s: float
    fsync_s: float
    lag_s: float
    loads: tuple[int, ...]
    # Each latency load is run this many times, interleaved with the peer's, and the median run
    # is reported (`load.median_run`): one run's P99 is mostly the machine's noise.
    repeats: int = 1


FULL: Final = Budget(5.0, 5.0, 3.0, 2.0, 10.0, LOADS, repeats=3)
QUICK: Final = Budget(0.4, 0.3, 0.2, 0.2, 0.5, LOADS[:2])

Side = OursSide | RedisSide


async def throughput(side: Side, key: str, b: Budget) -> dict[str, Any]:
    start_entries = await side.entries(key)
    t0 = time.perf_counter()
    res = await closed_loop(side.send(key, REQUEST), concurrency=CONCURRENCY, duration=b.tput_s)
    t_rep = await side.replicated_at(key)
    n = await side.entries(key) - start_entries
    return {
        "entries": n,
        "accepted_per_s": res.ok_requests * REQUEST / res.elapsed_s,
        "applied_per_s": n / (t_rep - t0),
        "drain_s": max(0.0, t_rep - t0 - res.elapsed_s),
        "request_p99_s": percentile(res.latencies, 99),
        "errors": dict(res.errors),
    }


async def latency(side: Side, key: str, b: Budget) -> list[LoadResult]:
    out = []
    for load in b.loads:
        per = max(1, load // LAT_REQUESTS_PER_S)
        out.append(
            await open_loop(
                side.send(key, per),
                entries_per_request=per,
                request_rate=load / per,
                duration=b.load_s,
            )
        )
        await side.replicated_at(key)  # drain before the next load
        await asyncio.sleep(0.2)
    return out


async def noop(side: Side, b: Budget) -> LoadResult:
    return await open_loop(
        side.noop(), entries_per_request=1, request_rate=LAT_REQUESTS_PER_S, duration=b.noop_s
    )


def _writer(side: Side, key: str, offered: float, b: Budget) -> asyncio.Task[LoadResult]:
    return asyncio.create_task(
        open_loop(
            side.send(key, REQUEST),
            entries_per_request=REQUEST,
            request_rate=offered / REQUEST,
            duration=b.lag_s,
        )
    )


def _lag_summary(points: list[tuple[float, float, float]], load: LoadResult) -> dict[str, Any]:
    secs = [p[1] for p in points]
    return {
        "series": [list(p) for p in points],
        "samples": len(points),
        "p50_s": percentile(secs, 50),
        "p99_s": percentile(secs, 99),
        "max_s": max(secs, default=float("nan")),
        "max_entries": max((p[2] for p in points), default=0.0),
        "load": load.summary(),
    }


async def lag_ours(side: OursSide, key: str, offered: float, b: Budget) -> dict[str, Any]:
    origin = time.perf_counter()
    sampler = Sampler(lambda: side.lag_probe(key), SAMPLE_S, origin).start()
    load = await _writer(side, key, offered, b)
    points = await sampler.stop()
    await side.replicated_at(key)
    out = _lag_summary([(t, s, e) for t, (s, e) in points], load)
    out["sample_failures"] = sampler.failures
    return out


async def lag_redis(side: RedisSide, key: str, offered: float, b: Budget) -> dict[str, Any]:
    pair = side.pair
    n0, (m0, _) = await pair.xlen(key), await pair.offsets()
    origin = time.perf_counter()
    sampler = Sampler(pair.offsets, SAMPLE_S, origin).start()
    load = await _writer(side, key, offered, b)
    raw = await sampler.stop()
    await side.replicated_at(key)
    n1, (m1, _) = await pair.xlen(key), await pair.offsets()
    per_entry = (m1 - m0) / max(1, n1 - n0)
    converted = offset_lag([(t, m, r) for t, (m, r) in raw])
    out = _lag_summary([(t, s, lb / per_entry) for t, s, lb in converted], load)
    out["stream_bytes_per_entry"] = per_entry
    out["sample_failures"] = sampler.failures
    return out


async def _main(quick: bool, binary: str) -> dict[str, Any]:
    b = QUICK if quick else FULL
    data: dict[str, Any] = {"quick": quick, "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix=".engram-bench-redis-", dir=bench_dir()) as tmp:
        root = Path(tmp)
        data["fsync"] = await asyncio.to_thread(
            raw_fsync, root / "fsync.bin", b.fsync_s, ENTRY_HEADER_SIZE + PAYLOAD
        )
        async with BenchCluster(root / "nodes") as c, RedisPair(binary, root / "redis") as pair:
            for node in ("p", "r", "r2"):
                c.add_node(node)
            await c.start()
            for space in ("cmp-tput", "cmp-tput-nd", "cmp-lat", "cmp-lat-nd", "cmp-lag"):
                await c.assign(space, "p", ["r"])
                await c.wait_streaming(space, "p")
            await c.assign("cmp-quorum", "p", ["r", "r2"], ack_policy="quorum")
            await c.wait_streaming("cmp-quorum", "p")
            ours, red = OursSide(c, "p", "r", PAYLOAD), RedisSide(pair, PAYLOAD)
            nd = OursSide(c, "p", "r", PAYLOAD, binary=False)
            quorum = OursSide(c, "p", ["r", "r2"], PAYLOAD)
            try:
                sides: tuple[Side, Side] = (ours, red)
                # Warm-up: connections open, code paths hot, on every side.
                warm: list[tuple[Side, str]] = [
                    (ours, "cmp-lat"),
                    (nd, "cmp-lat-nd"),
                    (red, "cmp-lat"),
                ]
                for s, key in warm:
                    await open_loop(
                        s.send(key, 1), entries_per_request=1, request_rate=200, duration=0.2
                    )
                data["noop"] = [(await noop(s, b)).summary() for s in sides]
                data["tput"] = [await throughput(s, "cmp-tput", b) for s in sides]
                data["tput_ndjson"] = await throughput(nd, "cmp-tput-nd", b)
                order = [warm[0], warm[2], warm[1]]  # ours (binary), Redis, ours (NDJSON)
                lat: dict[tuple[int, int], list[LoadResult]] = {}
                # Interleaved, load by load and side by side, so drift on the machine hits all.
                for _ in range(b.repeats):
                    for load in b.loads:
                        one = replace(b, loads=(load,))
                        for i, (s, key) in enumerate(order):
                            lat.setdefault((i, load), []).extend(await latency(s, key, one))
                medians = [[median_run(lat[i, load]) for load in b.loads] for i in range(3)]
                data["latency"] = medians[:2]
                data["latency_ndjson"] = medians[2]
                data["latency_repeats"] = b.repeats
                quorum_runs: dict[int, list[LoadResult]] = {}
                for _ in range(b.repeats):
                    for load in QUORUM_LOADS:
                        one = replace(b, loads=(load,))
                        quorum_runs.setdefault(load, []).extend(
                            await latency(quorum, "cmp-quorum", one)
                        )
                data["quorum"] = {
                    "tput": await throughput(quorum, "cmp-quorum", b),
                    "latency": [median_run(quorum_runs[load]) for load in QUORUM_LOADS],
                }
                offered = max(float(REQUEST), LAG_SHARE * data["tput"][0]["applied_per_s"])
                data["lag_offered_per_s"] = offered
                data["lag"] = [
                    await lag_ours(ours, "cmp-lag", offered, b),
                    await lag_redis(red, "cmp-lag", offered, b),
                ]
                data["rss"] = [s.rss() for s in sides]
            finally:
                await red.close()
    f = data.pop("fsync")
    data["fsync"] = {"samples": len(f), **{f"p{q}_s": percentile(f, q) for q in (50, 99)}}
    return data


def run(*, quick: bool) -> list[Section]:
    binary = redis_binary()
    if binary is None:
        return render(None, quick=quick, version=None, settings=SETTINGS, budget=None)
    version = redis_version(binary)
    data = asyncio.run(_main(quick, binary))
    budget = asdict(QUICK if quick else FULL)
    return render(data, quick=quick, version=version, settings=SETTINGS, budget=budget)
