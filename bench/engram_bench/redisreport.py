"""Tables and verdicts for the Redis comparison (`engram_bench.redis` measures, this renders)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from engram_bench.report import Section, fmt_ms, fmt_rate, ratio

TPUT_KEY = "redis-throughput-lag"
LAT_KEY = "redis-latency"
GOAL_P99_S = 0.010
EMPTY = '""'


def _skipped(quick: bool) -> list[Section]:
    s = Section(
        key=TPUT_KEY,
        title="Versus Redis: skipped",
        headers=[],
        notes=[
            "redis-server is not installed on this machine (Debian: apt-get install "
            "redis-server), so the comparison with Redis was skipped. Nothing else depends on it.",
        ],
        data={"skipped": True, "quick": quick},
    )
    return [s]


def _s(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f} s"


def _rate_cell(load: Mapping[str, Any]) -> str:
    cell = fmt_rate(load["achieved_per_s"])
    return cell if load["sustained"] else cell + " (NOT sustained)"


def render(
    data: dict[str, Any] | None,
    *,
    quick: bool,
    version: str | None,
    settings: Mapping[str, str],
    budget: Any,
) -> list[Section]:
    if data is None:
        return _skipped(quick)
    rname = f"Redis {version}"
    ours_t, red_t = data["tput"]
    ours_l, red_l = data["lag"]
    ours_n, red_n = data["noop"]
    fs = data["fsync"]
    offered = data["lag_offered_per_s"]
    tput = Section(
        key=TPUT_KEY,
        title=f"Versus {rname}: throughput and replica lag (equal durability, same run)",
        headers=["measure", "ours", rname, "ours ÷ Redis", "baseline (same run)"],
    )

    def row(measure: str, a: str, b: str, r: str, base: str = "-") -> None:
        tput.rows.append([measure, a, b, r, base])

    row(
        "max entries/s accepted by the primary",
        fmt_rate(ours_t["accepted_per_s"]),
        fmt_rate(red_t["accepted_per_s"]),
        ratio(ours_t["accepted_per_s"], red_t["accepted_per_s"]),
    )
    row(
        "max entries/s applied by the replica",
        fmt_rate(ours_t["applied_per_s"]),
        fmt_rate(red_t["applied_per_s"]),
        ratio(ours_t["applied_per_s"], red_t["applied_per_s"]),
    )
    row(
        "request P99 at max (1,000 entries each)",
        fmt_ms(ours_t["request_p99_s"]),
        fmt_ms(red_t["request_p99_s"]),
        ratio(ours_t["request_p99_s"], red_t["request_p99_s"]),
    )
    for label, key in (("P50", "p50_s"), ("P99", "p99_s"), ("max", "max_s")):
        row(
            f"replica lag {label} at {fmt_rate(offered)} offered",
            _s(ours_l[key]),
            _s(red_l[key]),
            ratio(ours_l[key], red_l[key]),
        )
    row(
        "replica lag max, entries",
        f"{ours_l['max_entries']:,.0f}",
        f"{red_l['max_entries']:,.0f} (≈)",
        ratio(ours_l["max_entries"], red_l["max_entries"]),
    )
    row(
        "write P99 during the lag run",
        fmt_ms(ours_l["load"]["p99_s"]),
        fmt_ms(red_l["load"]["p99_s"]),
        ratio(ours_l["load"]["p99_s"], red_l["load"]["p99_s"]),
        "achieved: "
        + _rate_cell(ours_l["load"])
        + " ours, "
        + _rate_cell(red_l["load"])
        + " Redis",
    )
    row(
        "no-op round trip P99 at 1,000/s",
        fmt_ms(ours_n["p99_s"]) + " (GET /healthz)",
        fmt_ms(red_n["p99_s"]) + " (PING)",
        ratio(ours_n["p99_s"], red_n["p99_s"]),
        "this row is the baseline",
    )
    row("raw write+fsync P99, same disk", "-", "-", "-", fmt_ms(fs["p99_s"]))
    (op, orr), (rp, rr) = data["rss"]
    mib = 1024 * 1024
    row(
        "RSS primary / replica at the end",
        f"{op / mib:.0f} / {orr / mib:.0f} MiB",
        f"{rp / mib:.0f} / {rr / mib:.0f} MiB",
        "-",
    )
    wins_tput = ours_t["applied_per_s"] >= red_t["applied_per_s"]
    settings_text = ", ".join(f"{k} {v or EMPTY}" for k, v in settings.items() if k != "bind")
    tput.notes = [
        f"Ours: primary + 1 replica sidecar, fsync always, ackPolicy async. {rname}: primary + "
        f"1 replica (replicaof), {settings_text}; both on 127.0.0.1, both up for the whole "
        "scenario, each measurement taken on one system then at once on the other.",
        "Max: 8 concurrent requests of 1,000 entries (HTTP NDJSON for us, a pipeline of "
        "1,000 XADDs for Redis), closed loop; 'applied' = entries the replica holds / time "
        "from the first write until the replica had the last one.",
        f"Lag: an open-loop writer offers {fmt_rate(offered)} (80% of our maximum above) to "
        "each in 1,000-entry requests; sampled every 50 ms. Ours: lag_seconds (age of the "
        "oldest entry the replica lacks) and lag_entries from GET /v1/spaces/{space} on the "
        "primary. Redis: master_repl_offset (primary) − slave_repl_offset (replica) from INFO "
        "replication, asked at the same time; entries = bytes ÷ replication-stream bytes per "
        f"XADD measured in the run ({red_l.get('stream_bytes_per_entry', 0):.0f}); seconds = "
        "how long ago the primary's offset passed the replica's, interpolated between samples "
        "(resolution ~50 ms, so values under that are estimates).",
        "RSS: Redis holds every stream entry in memory (its AOF is only for recovery), so its "
        "RSS grows with the data written in the scenario; our sidecar keeps entries on disk in "
        "the WAL and only in-flight batches in memory.",
        "Not quite equal, in Redis's favour: its replica's offset counts commands it has "
        "executed, before its AOF fsync; ours counts entries the replica has fsynced and "
        "acknowledged.",
        "Goal: at equal durability, replicated throughput ≥ Redis's: "
        + (
            f"met ({fmt_rate(ours_t['applied_per_s'])} vs {fmt_rate(red_t['applied_per_s'])})."
            if wins_tput
            else f"NOT met: {fmt_rate(ours_t['applied_per_s'])} vs "
            f"{fmt_rate(red_t['applied_per_s'])} "
            f"({ours_t['applied_per_s'] / max(red_t['applied_per_s'], 1e-9):.0%} of Redis). "
            "Why: every entry we accept goes through aiohttp's HTTP parsing, a json.loads per "
            "NDJSON line, two CRC32Cs and the framing in Python on the primary, and the "
            "replica validates both CRCs per entry again, all in interpreted code; Redis "
            "parses RESP and appends to its stream and AOF in C in one event loop, and its "
            "replica replays the command stream in C. The machine's "
            f"{os.cpu_count()} cores also host the load generator and both processes."
        ),
    ]
    tput.data = {**data, "redis_version": version, "settings": dict(settings), "budget": budget}
    tput.data["goal"] = {"goal": "replicated throughput >= Redis", "met": wins_tput}

    lat = Section(
        key=LAT_KEY,
        title=f"Versus {rname}: write latency under open-loop load (same run)",
        headers=[
            "offered",
            "ours achieved",
            "ours P50",
            "ours P99",
            "ours P99.9",
            "Redis achieved",
            "Redis P50",
            "Redis P99",
            "Redis P99.9",
            "P99 ours ÷ Redis",
        ],
    )
    lat.rows.append(
        [
            "baseline: no-op round trip at 1,000/s",
            "-",
            fmt_ms(ours_n["p50_s"]),
            fmt_ms(ours_n["p99_s"]),
            fmt_ms(ours_n["p999_s"]),
            "-",
            fmt_ms(red_n["p50_s"]),
            fmt_ms(red_n["p99_s"]),
            fmt_ms(red_n["p999_s"]),
            ratio(ours_n["p99_s"], red_n["p99_s"]),
        ]
    )
    worse: list[str] = []
    over: list[str] = []
    for o, r in zip(data["latency"][0], data["latency"][1], strict=True):
        lat.rows.append(
            [
                fmt_rate(o["offered_per_s"]),
                _rate_cell(o),
                fmt_ms(o["p50_s"]),
                fmt_ms(o["p99_s"]),
                fmt_ms(o["p999_s"]),
                _rate_cell(r),
                fmt_ms(r["p50_s"]),
                fmt_ms(r["p99_s"]),
                fmt_ms(r["p999_s"]),
                ratio(o["p99_s"], r["p99_s"]),
            ]
        )
        if o["p99_s"] > r["p99_s"]:
            worse.append(f"{fmt_rate(o['offered_per_s'])} ({ratio(o['p99_s'], r['p99_s'])})")
        if not (o["p99_s"] < GOAL_P99_S and o["sustained"]):
            over.append(f"{fmt_rate(o['offered_per_s'])} (P99 {fmt_ms(o['p99_s'])})")
    lat.notes = [
        "Open loop, the same schedule for both: 1,000 requests/s, each carrying offered/1,000 "
        "entries of 100 bytes (HTTP NDJSON to us, an XADD pipeline to Redis), "
        "latency from the intended send time (coordinated-omission safe); the replica drains "
        "between loads. Baseline: a no-op round trip at 1,000/s to each (GET /healthz, PING); "
        f"the disk's raw write+fsync P99 in the same run: {fmt_ms(fs['p99_s'])}.",
        "Goal: at equal durability, write P99 no worse than Redis's: "
        + (
            "met at every load."
            if not worse
            else "NOT met at "
            + ", ".join(worse)
            + ". Why: an acknowledged write of ours is an HTTP request parsed and routed by "
            "aiohttp, NDJSON validated line by line (json.loads per entry), CRC'd, framed and "
            "appended in Python before its group-committed fsync; Redis does the equivalent in C "
            "in one event loop. At light loads that per-request work is the difference (compare "
            "the no-op round trips: HTTP and RESP cost about the same); at heavy loads it is "
            "queueing, because the Python path saturates a core long before Redis's does."
        ),
        f"Goal: write P99 < {GOAL_P99_S * 1000:g} ms at every load measured here (ours): "
        + ("met." if not over else "NOT met at " + ", ".join(over) + "."),
    ]
    if quick:
        for s in (tput, lat):
            s.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    lat.data = {"goal": {"goal": "write P99 <= Redis", "met": not worse}}
    return [tput, lat]
