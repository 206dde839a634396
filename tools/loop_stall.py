"""Measure how long control traffic waits behind bulk writes (issue 13, "No stalls").

Starts a primary and two replicas (sidecar processes, fsync always, `--ack-policy`), drives the
primary with `--writers` closed-loop writers of `--entries` NDJSON entries per request (or an
open loop of `--rate` requests/s), and
meanwhile sends the control plane's heartbeat (`POST /v1/lease`) every 50 ms on its own
connection, timing each answer. Prints the heartbeat latencies, the write throughput and errors,
and each node's `engram_replication_event_loop_lag_seconds` histogram, as JSON.

    .venv/bin/python tools/loop_stall.py --entries 10000 --writers 8 --seconds 10

A measuring tool, not a test: its numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from engram_bench.leanhttp import LeanHttp
from engram_bench.load import closed_loop, http_send, open_loop
from engram_bench.report import percentile
from engram_bench.sidecars import LEASE_SECONDS, BenchCluster, bench_dir, ndjson_body
from engram_contract.launcher import HOST

SPACE = "stall"
LAG = "engram_replication_event_loop_lag_seconds"
WRITES = "engram_replication_write_latency_seconds"


def _histogram(text: str, name: str = LAG) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count") or line.startswith(name + "_sum"):
            out[line.split(" ")[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    return out


async def _heartbeats(c: BenchCluster, stop: asyncio.Event) -> list[float]:
    lean = LeanHttp(HOST, c["p"].http_port)
    took: list[float] = []
    try:
        while not stop.is_set():
            body = json.dumps(
                {
                    "control_plane": c.control_plane_id,
                    "sent_mono_ns": time.monotonic_ns(),
                    "lease_seconds": LEASE_SECONDS,
                    "epochs": {SPACE: 1},
                }
            ).encode()
            t0 = time.perf_counter()
            await lean.request(
                "POST",
                "/v1/lease",
                body,
                content_type="application/json",
                headers=c.auth(),
                timeout=10.0,
            )
            took.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    finally:
        await lean.close()
    return took


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=".engram-stall-", dir=bench_dir()) as tmp:
        async with BenchCluster(Path(tmp)) as c:
            for n in ("p", "r1", "r2"):
                c.add_node(n, fsync=args.fsync)
            await c.start()
            await c.assign(SPACE, "p", ["r1", "r2"], ack_policy=args.ack_policy)
            await c.wait_streaming(SPACE, "p")
            before = {n: _histogram((await c.request("GET", n, "/metrics"))[1]) for n in c.nodes}
            stop = asyncio.Event()
            hb = asyncio.create_task(_heartbeats(c, stop))
            body = ndjson_body(args.entries, 100, tag="s")
            send = http_send(c.http("p"), "POST", f"/v1/spaces/{SPACE}/entries", body)
            if args.rate:
                res = await open_loop(
                    send,
                    entries_per_request=args.entries,
                    request_rate=args.rate,
                    duration=args.seconds,
                )
                lat, ok, errors, elapsed = res.latencies, res.ok, res.errors, args.seconds
            else:
                load = await closed_loop(send, concurrency=args.writers, duration=args.seconds)
                lat, ok, errors = load.latencies, load.ok_requests, load.errors
                elapsed = load.elapsed_s
            stop.set()
            beats = await hb
            after = {n: _histogram((await c.request("GET", n, "/metrics"))[1]) for n in c.nodes}
            served = _histogram((await c.request("GET", "p", "/metrics"))[1], WRITES)
    lag = {n: {k: after[n].get(k, 0.0) - before[n].get(k, 0.0) for k in after[n]} for n in after}
    return {
        "entries_per_request": args.entries,
        "writers": args.writers,
        "seconds": args.seconds,
        "load_average": os.getloadavg()[0],
        "ack_policy": args.ack_policy,
        "fsync": args.fsync,
        "rate": args.rate,
        "entries_per_s": ok * args.entries / elapsed,
        "write_errors": dict(errors),
        "write_p50_s": percentile(lat, 50),
        "write_p99_s": percentile(lat, 99),
        "write_max_s": max(lat, default=float("nan")),
        "heartbeats": len(beats),
        "heartbeat_p50_s": percentile(beats, 50),
        "heartbeat_p99_s": percentile(beats, 99),
        "heartbeat_max_s": max(beats, default=float("nan")),
        "loop_lag_histogram": lag,
        "primary_write_latency_histogram": served,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=10_000)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.0, help="open loop, requests/s (0: closed)")
    p.add_argument("--fsync", default="always", choices=("always", "interval", "none"))
    p.add_argument("--ack-policy", default="async", choices=("async", "one", "quorum"))
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=2))
