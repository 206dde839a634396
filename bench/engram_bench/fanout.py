"""Fan-out: one primary shipping a stream to 1, 2 and 4 replicas (sidecar processes, fsync
always, ackPolicy async), each row next to a raw pipeline with the same number of sinks.

Per fan-out:
- **max**: a closed-loop writer (8 concurrent requests of 1,000 entries) for a fixed time; the
  figure is entries applied by *every* replica / time from the first write until the last
  replica had the last entry (a backlog left at the end is paid for).
- **at a fixed load**: an open-loop writer offering `FIXED_LOAD` entries/s (100-entry requests)
  while the lag of every replica is sampled every 50 ms: write P99 and the worst replica's lag.

Baseline, same run: writer → relay process → N sink processes over asyncio TCP
(`pipeline.raw_pipeline`): the same bytes per entry and 100-entry frames, acked once every
sink has; no HTTP, JSON, CRC or WAL. Every process shares the machine's cores, so fan-out to 4
replicas is also 6 busy processes on them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engram_bench.load import Sampler, closed_loop, error_text, http_send, open_loop
from engram_bench.pipeline import raw_pipeline
from engram_bench.report import Section, fmt_ms, fmt_rate, percentile, ratio
from engram_bench.sidecars import BenchCluster, bench_dir, ndjson_body

PAYLOAD: Final = 100
REQUEST: Final = 1_000
CONCURRENCY: Final = 8
FANOUTS: Final = (1, 2, 4)
FIXED_LOAD: Final = 10_000.0
FIXED_REQUEST: Final = 100
SAMPLE_S: Final = 0.05


@dataclass(frozen=True)
class Budget:
    tput_s: float
    raw_s: float
    load_s: float


FULL: Final = Budget(5.0, 2.0, 5.0)
QUICK: Final = Budget(0.3, 0.1, 0.2)


async def _max(c: BenchCluster, space: str, replicas: list[str], b: Budget) -> dict[str, Any]:
    client = c.http("p")
    send = http_send(client, "POST", f"/v1/spaces/{space}/entries", ndjson_body(REQUEST, PAYLOAD))
    t0 = time.perf_counter()
    res = await closed_loop(send, concurrency=CONCURRENCY, duration=b.tput_s)
    last = int((await c.space_view("p", space))["last_sequence"])
    t_applied = await c.wait_applied(space, replicas, last, timeout=120.0)
    return {
        "entries": last,
        "accepted_per_s": res.ok_requests * REQUEST / res.elapsed_s,
        "applied_per_s": last / (t_applied - t0),
        "errors": dict(res.errors),
    }


async def _fixed(c: BenchCluster, space: str, replicas: list[str], b: Budget) -> dict[str, Any]:
    async def worst_lag() -> float:
        reps = (await c.space_view("p", space))["replicas"]
        return max(float(reps[r]["lag_seconds"]) for r in replicas)

    sampler = Sampler(worst_lag, SAMPLE_S).start()
    body = ndjson_body(FIXED_REQUEST, PAYLOAD, tag=space)
    load = await open_loop(
        http_send(c.http("p"), "POST", f"/v1/spaces/{space}/entries", body),
        entries_per_request=FIXED_REQUEST,
        request_rate=FIXED_LOAD / FIXED_REQUEST,
        duration=b.load_s,
    )
    points = await sampler.stop()
    last = int((await c.space_view("p", space))["last_sequence"])
    await c.wait_applied(space, replicas, last, timeout=60.0)
    lags = [v for _, v in points]
    return {
        "load": load.summary(),
        "lag_p99_s": percentile(lags, 99),
        "lag_max_s": max(lags, default=float("nan")),
    }


async def _main(quick: bool) -> dict[str, Any]:
    b = QUICK if quick else FULL
    data: dict[str, Any] = {"quick": quick, "load_average_at_start": os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory(prefix=".engram-bench-fanout-", dir=bench_dir()) as tmp:
        async with BenchCluster(Path(tmp) / "nodes") as c:
            for n in ("p", *(f"r{i}" for i in range(1, max(FANOUTS) + 1))):
                c.add_node(n)
            await c.start()
            for k in FANOUTS:
                replicas = [f"r{i}" for i in range(1, k + 1)]
                for phase in ("max", "fixed"):
                    await c.assign(f"fan{k}-{phase}", "p", replicas)
                    await c.wait_streaming(f"fan{k}-{phase}", "p")
                raw = await raw_pipeline(k, b.raw_s)
                top = await _max(c, f"fan{k}-max", replicas, b)
                fixed = await _fixed(c, f"fan{k}-fixed", replicas, b)
                rows.append({"replicas": k, "raw_per_s": raw, **top, "fixed": fixed})
    data["rows"] = rows
    return data


def run(*, quick: bool) -> Section:
    data = asyncio.run(_main(quick))
    b = QUICK if quick else FULL
    s = Section(
        key="fanout",
        title="Fan-out: one stream to 1, 2 and 4 replicas (fsync always, ackPolicy async)",
        headers=[
            "replicas",
            "accepted by primary",
            "applied by every replica",
            "baseline: raw pipeline",
            "vs baseline",
            "vs 1 replica",
            f"write P99 at {FIXED_LOAD:,.0f}/s",
            "worst replica lag P99 / max",
            "errors",
        ],
    )
    one = data["rows"][0]["applied_per_s"]
    for r in data["rows"]:
        f = r["fixed"]
        errs = dict(r["errors"])
        for k, v in f["load"]["errors"].items():
            errs[k] = errs.get(k, 0) + v
        s.rows.append(
            [
                str(r["replicas"]),
                fmt_rate(r["accepted_per_s"]),
                fmt_rate(r["applied_per_s"]),
                fmt_rate(r["raw_per_s"]),
                ratio(r["applied_per_s"], r["raw_per_s"]),
                ratio(r["applied_per_s"], one),
                fmt_ms(f["load"]["p99_s"]) + ("" if f["load"]["sustained"] else " (NOT sustained)"),
                f"{f['lag_p99_s']:.3f} s / {f['lag_max_s']:.3f} s",
                error_text(errs),
            ]
        )
    s.notes = [
        f"Max: {CONCURRENCY} concurrent NDJSON requests of {REQUEST:,} entries ({PAYLOAD}-byte "
        f"payloads) for {b.tput_s:g} s, closed loop. Fixed load: {FIXED_LOAD:,.0f} entries/s "
        f"open loop in {FIXED_REQUEST}-entry requests for {b.load_s:g} s, worst replica's "
        "lag_seconds sampled every 50 ms.",
        "Baseline, same run: writer → relay → N sinks, plain asyncio TCP on loopback, acked once "
        "every sink has the frame. The primary encodes each batch once and sends the same bytes "
        "to every replica, so fan-out costs a send per replica plus every replica's own "
        f"validation and fsync, all on the machine's {os.cpu_count()} cores.",
    ]
    if quick:
        s.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    s.data = data
    return s
