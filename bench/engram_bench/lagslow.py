"""Replica lag under load with the replica slowed, next to the same load with it not slowed.

One primary and one replica (sidecar processes, fsync always, ackPolicy async); an open-loop
writer offers a fixed load in 100-entry requests for the same time in every row, while lag
(lag_seconds and lag_entries of GET /v1/spaces/{space} on the primary) is sampled every 50 ms:

- **baseline**: the replica connected directly;
- **delayed link**: the primary reaches the replica through a TCP proxy (`rawpeer.RawProcess`
  ``delay``) that holds every chunk for `DELAY_S` each way: a replica in a distant zone;
- **paused replica**: partway through, the replica process gets SIGSTOP for `pause_s`, then
  SIGCONT: a replica stalled by GC, a noisy neighbour or a slow disk. Reported: the peak lag
  and how long after SIGCONT the lag was back under `RECOVERED_S`.

With ackPolicy async a slow replica must not slow the writer: each row shows the write P99 too.
Baseline round trips, same run: 64-byte ping-pong to a plain sink directly and through the proxy
(what the proxy adds, measured rather than assumed).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engram_bench.load import LoadResult, Sampler, error_text, open_loop, ping_rtts
from engram_bench.rawpeer import RawProcess
from engram_bench.redispeer import OursSide
from engram_bench.report import Section, fmt_ms, fmt_rate, percentile
from engram_bench.sidecars import BenchCluster, bench_dir
from engram_contract.formats.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from engram_contract.launcher import HOST

PAYLOAD: Final = 100
REQUEST: Final = 100
DELAY_S: Final = 0.025
SAMPLE_S: Final = 0.05
RECOVERED_S: Final = 0.1
GOAL_LAG_S: Final = 1.0


@dataclass(frozen=True)
class Budget:
    offered: float
    run_s: float
    pause_at_s: float
    pause_s: float
    pings: int


FULL: Final = Budget(20_000.0, 8.0, 2.0, 2.0, 200)
QUICK: Final = Budget(10_000.0, 0.6, 0.15, 0.3, 20)


async def _run(
    side: OursSide, space: str, b: Budget, pause: tuple[float, float] | None
) -> dict[str, Any]:
    c = side.c
    origin = time.perf_counter()
    sampler = Sampler(lambda: side.lag_probe(space), SAMPLE_S, origin).start()
    writer = asyncio.create_task(
        open_loop(
            side.send(space, REQUEST),
            entries_per_request=REQUEST,
            request_rate=b.offered / REQUEST,
            duration=b.run_s,
        )
    )
    resumed_at = None
    if pause is not None:
        at, length = pause
        await asyncio.sleep(at)
        c.pause(side.replica)
        try:
            await asyncio.sleep(length)
        finally:
            c.resume(side.replica)
        resumed_at = time.perf_counter() - origin
    load: LoadResult = await writer
    await side.replicated_at(space, timeout=60.0)
    points = await sampler.stop()
    secs = [s for _, (s, _) in points]
    recovered = None
    if resumed_at is not None:
        after = [t for t, (s, _) in points if t >= resumed_at and s <= RECOVERED_S]
        recovered = after[0] - resumed_at if after else float("nan")
    return {
        "series": [[t, s, e] for t, (s, e) in points],
        "p50_s": percentile(secs, 50),
        "p99_s": percentile(secs, 99),
        "max_s": max(secs, default=float("nan")),
        "max_entries": max((e for _, (_, e) in points), default=0.0),
        "recovered_s": recovered,
        "resumed_at_s": resumed_at,
        "sample_failures": sampler.failures,
        "load": load.summary(),
    }


async def _main(quick: bool) -> dict[str, Any]:
    b = QUICK if quick else FULL
    data: dict[str, Any] = {"quick": quick, "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix=".engram-bench-lagslow-", dir=bench_dir()) as tmp:
        async with (
            BenchCluster(Path(tmp) / "nodes") as c,
            RawProcess("sink") as sink,
            RawProcess("delay", sink.port, round(DELAY_S * 1e6)) as sink_proxy,
        ):
            # The delayed replica is a node of its own: a primary keeps one link per replica
            # node, at one address, shared by every space it ships to that node.
            for n in ("p", "r", "rd"):
                c.add_node(n)
            await c.start()
            data["ping_direct"] = await ping_rtts(sink.port, b.pings)
            data["ping_proxy"] = await ping_rtts(sink_proxy.port, b.pings)
            async with RawProcess("delay", c["rd"].replication_port, round(DELAY_S * 1e6)) as px:
                await c.assign("slow-base", "p", ["r"])
                await c.assign("slow-delay", "p", ["rd"], via={"rd": f"{HOST}:{px.port}"})
                await c.assign("slow-pause", "p", ["r"])
                for sp in ("slow-base", "slow-delay", "slow-pause"):
                    await c.wait_streaming(sp, "p")
                direct, delayed = OursSide(c, "p", "r", PAYLOAD), OursSide(c, "p", "rd", PAYLOAD)
                data["runs"] = {
                    "baseline": await _run(direct, "slow-base", b, None),
                    "delayed": await _run(delayed, "slow-delay", b, None),
                    "paused": await _run(direct, "slow-pause", b, (b.pause_at_s, b.pause_s)),
                }
    data["budget"] = b.__dict__
    return data


def run(*, quick: bool) -> Section:
    data = asyncio.run(_main(quick))
    b = QUICK if quick else FULL
    d50, d99 = percentile(data["ping_direct"], 50), percentile(data["ping_direct"], 99)
    p50, p99 = percentile(data["ping_proxy"], 50), percentile(data["ping_proxy"], 99)
    s = Section(
        key="lag-slowed",
        title="Replica lag with the replica slowed (ackPolicy async, fsync always, 1 replica)",
        headers=[
            "replica",
            "achieved",
            "lag P50",
            "lag P99",
            "lag max",
            "max lag entries",
            "back under 0.1 s after SIGCONT",
            "write P99",
            "errors",
        ],
    )
    labels = {
        "baseline": "baseline: direct, not slowed",
        "delayed": f"behind a {DELAY_S * 1000:g} ms-each-way proxy",
        "paused": f"SIGSTOP for {b.pause_s:g} s at t={b.pause_at_s:g} s",
    }
    runs = data["runs"]
    for key, label in labels.items():
        r = runs[key]
        load = r["load"]
        rec = r["recovered_s"]
        s.rows.append(
            [
                label,
                fmt_rate(load["achieved_per_s"])
                + ("" if load["sustained"] else " (NOT sustained)"),
                f"{r['p50_s']:.3f} s",
                f"{r['p99_s']:.3f} s",
                f"{r['max_s']:.3f} s",
                f"{r['max_entries']:,.0f}",
                "-" if rec is None else f"{rec:.2f} s",
                fmt_ms(load["p99_s"]),
                error_text(load["errors"]),
            ]
        )
    base_w = runs["baseline"]["load"]["p99_s"]
    worst_w = max(runs["delayed"]["load"]["p99_s"], runs["paused"]["load"]["p99_s"])
    delayed_ok = runs["delayed"]["max_s"] < GOAL_LAG_S
    s.notes = [
        f"Open-loop writer: {fmt_rate(b.offered)} in {REQUEST}-entry NDJSON requests "
        f"({PAYLOAD}-byte payloads) for {b.run_s:g} s per row; lag sampled every "
        f"{SAMPLE_S * 1000:.0f} ms from GET /v1/spaces/{{space}} on the primary (lag_seconds = "
        "age of the oldest entry the replica lacks).",
        f"Baseline round trips, same run ({FRAME_HEADER_SIZE}-byte ping-pong to a plain sink): "
        "direct P50 "
        f"{fmt_ms(d50)} / P99 {fmt_ms(d99)}; through the delay proxy P50 {fmt_ms(p50)} / P99 "
        f"{fmt_ms(p99)} (the proxy adds {fmt_ms(p50 - d50)} per round trip).",
        f"Goal: lag < {GOAL_LAG_S:g} s behind the delayed link: "
        + ("met" if delayed_ok else "NOT met")
        + f" (max {runs['delayed']['max_s']:.3f} s). A paused replica lags by at least the "
        "pause, by construction; what matters is that it recovers, and how fast.",
        "ackPolicy async: a slowed replica should not slow the writer. Write P99 "
        f"{fmt_ms(base_w)} with the replica unimpeded, at worst {fmt_ms(worst_w)} with it "
        f"slowed ({worst_w / max(base_w, 1e-9):.2f}x).",
    ]
    if quick:
        s.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    data["ping_direct"] = {"p50_s": d50, "p99_s": d99}
    data["ping_proxy"] = {"p50_s": p50, "p99_s": p99}
    data["goal"] = {"goal": GOAL_LAG_S, "value": runs["delayed"]["max_s"], "met": delayed_ok}
    s.data = data
    return s
