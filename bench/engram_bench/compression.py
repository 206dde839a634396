"""Compression on and off: bytes on the wire, throughput and write latency, same run.

One primary and one replica (fsync always, ackPolicy async), two spaces written in turn: one
assigned with ``"compression": false`` and one with ``"compression": true`` (zstd per BATCH).
The payloads are 100-byte JSON lines, half random (base64) and half repeated text, so they
compress about as well as real episode records do, not as well as padding does.

Per mode: a closed-loop writer (8 concurrent requests of 1,000 entries) for a fixed time, then
an open-loop writer at `FIXED_LOAD`. Bytes on the wire are the deltas of
``engram_replication_bytes_total{direction="out"}`` on the primary and ``{direction="in"}`` on
the replica, from /metrics, over both writers (frame headers, heartbeats and ACKs included:
the counters are per node, and nothing else runs on these nodes meanwhile).

Baselines, same run: the entries' stored size (64-byte header + payload each: what an
uncompressed stream must carry at least), and the raw loopback pipeline's entries/s
(`pipeline.raw_pipeline`, one sink).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engram_bench.load import closed_loop, error_text, http_send, open_loop
from engram_bench.pipeline import raw_pipeline
from engram_bench.report import Section, fmt_ms, fmt_rate, ratio
from engram_bench.sidecars import BenchCluster, bench_dir
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE

PAYLOAD: Final = 100
REQUEST: Final = 1_000
CONCURRENCY: Final = 8
FIXED_LOAD: Final = 10_000.0
FIXED_REQUEST: Final = 100
BYTES: Final = "engram_replication_bytes_total"


@dataclass(frozen=True)
class Budget:
    tput_s: float
    raw_s: float
    load_s: float


FULL: Final = Budget(5.0, 2.0, 5.0)
QUICK: Final = Budget(0.5, 0.2, 0.3)


def mixed_body(entries: int, payload_bytes: int = PAYLOAD, seed: int = 7) -> bytes:
    """NDJSON lines of exactly `payload_bytes`: half random base64, half repeated text."""
    rng = random.Random(seed)
    lines = []
    for i in range(entries):
        head = f'{{"i":{i},"r":"'
        mid = '","s":"'
        room = payload_bytes - len(head) - len(mid) - 2
        if room < 2:
            raise ValueError(f"payload_bytes {payload_bytes} too small")
        rand_len = room // 2
        rand = base64.b64encode(rng.randbytes(rand_len))[:rand_len].decode()
        text = ("episode-field:" * payload_bytes)[: room - rand_len]
        lines.append(head + rand + mid + text + '"}')
    return ("\n".join(lines) + "\n").encode()


async def _mode(c: BenchCluster, space: str, b: Budget) -> dict[str, Any]:
    out0 = await c.metric("p", BYTES, {"direction": "out"})
    in0 = await c.metric("r", BYTES, {"direction": "in"})
    path = f"/v1/spaces/{space}/entries"
    t0 = time.perf_counter()
    res = await closed_loop(
        http_send(c.http("p"), "POST", path, mixed_body(REQUEST)),
        concurrency=CONCURRENCY,
        duration=b.tput_s,
    )
    mid = int((await c.space_view("p", space))["last_sequence"])
    t_applied = await c.wait_applied(space, ["r"], mid, timeout=120.0)
    fixed = await open_loop(
        http_send(c.http("p"), "POST", path, mixed_body(FIXED_REQUEST, seed=8)),
        entries_per_request=FIXED_REQUEST,
        request_rate=FIXED_LOAD / FIXED_REQUEST,
        duration=b.load_s,
    )
    last = int((await c.space_view("p", space))["last_sequence"])
    await c.wait_applied(space, ["r"], last, timeout=60.0)
    await asyncio.sleep(0.1)  # the replica's last ACK reaches the primary's counters
    out1 = await c.metric("p", BYTES, {"direction": "out"})
    in1 = await c.metric("r", BYTES, {"direction": "in"})
    return {
        "entries": last,
        "accepted_per_s": res.ok_requests * REQUEST / res.elapsed_s,
        "applied_per_s": mid / (t_applied - t0),
        "bytes_out": out1 - out0,
        "bytes_in_replica": in1 - in0,
        "stored_bytes": last * (ENTRY_HEADER_SIZE + PAYLOAD),
        "fixed": fixed.summary(),
        "errors": {**dict(res.errors), **dict(fixed.errors)},
    }


async def _main(quick: bool) -> dict[str, Any]:
    b = QUICK if quick else FULL
    data: dict[str, Any] = {"quick": quick, "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix=".engram-bench-comp-", dir=bench_dir()) as tmp:
        async with BenchCluster(Path(tmp) / "nodes") as c:
            c.add_node("p")
            c.add_node("r")
            await c.start()
            await c.assign("comp-off", "p", ["r"])
            await c.assign("comp-on", "p", ["r"], compression=True)
            for sp in ("comp-off", "comp-on"):
                await c.wait_streaming(sp, "p")
            data["raw_per_s"] = await raw_pipeline(1, b.raw_s)
            data["off"] = await _mode(c, "comp-off", b)
            data["on"] = await _mode(c, "comp-on", b)
    return data


def run(*, quick: bool) -> Section:
    data = asyncio.run(_main(quick))
    b = QUICK if quick else FULL
    off, on = data["off"], data["on"]
    s = Section(
        key="compression",
        title="Compression on and off: bytes on the wire (fsync always, 1 replica)",
        headers=[
            "compression",
            "entries",
            "wire bytes out (primary)",
            "wire bytes/entry",
            "vs stored size",
            "vs uncompressed",
            "applied by replica",
            "vs raw pipeline",
            f"write P99 at {FIXED_LOAD:,.0f}/s",
            "errors",
        ],
    )
    s.rows.append(
        [
            f"baseline: stored entries ({ENTRY_HEADER_SIZE} + {PAYLOAD} bytes)",
            "-",
            "-",
            f"{ENTRY_HEADER_SIZE + PAYLOAD}",
            "1.00x",
            "-",
            fmt_rate(data["raw_per_s"]) + " (raw pipeline)",
            "1.00x",
            "-",
            "-",
        ]
    )
    per = {k: data[k]["bytes_out"] / max(1, data[k]["entries"]) for k in ("off", "on")}
    for key, label in (("off", "off"), ("on", "on (zstd)")):
        m = data[key]
        s.rows.append(
            [
                label,
                f"{m['entries']:,}",
                f"{m['bytes_out']:,.0f}",
                f"{per[key]:.1f}",
                ratio(per[key], ENTRY_HEADER_SIZE + PAYLOAD),
                ratio(per[key], per["off"]),
                fmt_rate(m["applied_per_s"]),
                ratio(m["applied_per_s"], data["raw_per_s"]),
                fmt_ms(m["fixed"]["p99_s"])
                + ("" if m["fixed"]["sustained"] else " (NOT sustained)"),
                error_text(m["errors"]),
            ]
        )
    saved = 1 - on["bytes_out"] / max(1.0, off["bytes_out"]) * off["entries"] / max(
        1, on["entries"]
    )
    s.notes = [
        f"Payloads: {PAYLOAD}-byte JSON lines, half random base64, half repeated text. Per mode: "
        f"{CONCURRENCY} concurrent requests of {REQUEST:,} entries for {b.tput_s:g} s (closed "
        f"loop), then {FIXED_LOAD:,.0f} entries/s in {FIXED_REQUEST}-entry requests for "
        f'{b.load_s:g} s (open loop). Wire bytes: delta of {BYTES}{{direction="out"}} on the '
        "primary /metrics over both writers (the replica counted "
        f"{off['bytes_in_replica']:,.0f} bytes in with compression off and "
        f"{on['bytes_in_replica']:,.0f} with it on).",
        f"Compression saved {saved:.0%} of the bytes per entry on the wire. It costs CPU on "
        "both ends (zstd level 3 per batch; the wire benchmark above prices it per entry); on "
        f"loopback with {os.cpu_count()} shared cores bandwidth is free and CPU is not, so "
        "the throughput column shows its cost, not its benefit: on a real network link, fewer "
        "bytes is the point.",
    ]
    if quick:
        s.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    data["bytes_per_entry"] = per
    data["saved"] = saved
    s.data = data
    return s
