"""Tables and verdicts for the Redis comparison (`engram_bench.redis` measures, this renders)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from engram_bench.report import Section, fmt_ms, fmt_rate, ratio, runs_text

TPUT_KEY = "redis-throughput-lag"
LAT_KEY = "redis-latency"
TARGETS_KEY = "redis-targets"
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
    nd_t = data["tput_ndjson"]
    tput = Section(
        key=TPUT_KEY,
        title=f"Versus {rname}: throughput and replica lag (equal durability, same run)",
        headers=[
            "measure",
            "ours (binary)",
            rname,
            "ours ÷ Redis",
            "ours (NDJSON)",
            "baseline (same run)",
        ],
    )

    def row(measure: str, a: str, b: str, r: str, *, base: str = "-", nd: str = "-") -> None:
        tput.rows.append([measure, a, b, r, nd, base])

    row(
        "max entries/s accepted by the primary",
        fmt_rate(ours_t["accepted_per_s"]),
        fmt_rate(red_t["accepted_per_s"]),
        ratio(ours_t["accepted_per_s"], red_t["accepted_per_s"]),
        nd=fmt_rate(nd_t["accepted_per_s"]),
    )
    row(
        "max entries/s applied by the replica",
        fmt_rate(ours_t["applied_per_s"]),
        fmt_rate(red_t["applied_per_s"]),
        ratio(ours_t["applied_per_s"], red_t["applied_per_s"]),
        nd=fmt_rate(nd_t["applied_per_s"]),
    )
    row(
        "request P99 at max (1,000 entries each)",
        fmt_ms(ours_t["request_p99_s"]),
        fmt_ms(red_t["request_p99_s"]),
        ratio(ours_t["request_p99_s"], red_t["request_p99_s"]),
        nd=fmt_ms(nd_t["request_p99_s"]),
    )
    q = data["quorum"]
    row(
        "quorum, 2 replicas: max entries/s applied by both",
        fmt_rate(q["tput"]["applied_per_s"]),
        "-",
        "-",
        base="Redis has no quorum acknowledgement (WAIT is per client, not per write)",
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
        base="achieved: "
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
        base="this row is the baseline",
    )
    row("raw write+fsync P99, same disk", "-", "-", "-", base=fmt_ms(fs["p99_s"]))
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
        f"Ours: primary + 1 replica sidecar, fsync always, ackPolicy async, written to in the "
        f"binary format (the NDJSON column: the same payloads as NDJSON lines). {rname}: "
        f"primary + 1 replica (replicaof), {settings_text}; both on 127.0.0.1, both up for the "
        "whole scenario, each measurement taken on one system then at once on the other.",
        "Max: 8 concurrent requests of 1,000 entries (one HTTP request for us, a pipeline of "
        "1,000 XADDs for Redis), closed loop; 'applied' = entries the replica holds / time "
        "from the first write until the replica had the last one. The quorum row: the same "
        "writer to a space with 2 replicas under ackPolicy quorum, 'applied' by both.",
        f"Lag: an open-loop writer offers {fmt_rate(offered)} (80% of our binary maximum "
        "above) to each in 1,000-entry requests; sampled every 50 ms. Ours: lag_seconds (age "
        "of the oldest entry the replica lacks) and lag_entries from GET /v1/spaces/{space} on "
        "the primary. Redis: master_repl_offset (primary) − slave_repl_offset (replica) from "
        "INFO replication, asked at the same time; entries = bytes ÷ replication-stream bytes "
        f"per XADD measured in the run ({red_l.get('stream_bytes_per_entry', 0):.0f}); seconds "
        "= how long ago the primary's offset passed the replica's, interpolated between "
        "samples (resolution ~50 ms, so values under that are estimates).",
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
            "Why: every entry we accept goes through aiohttp's HTTP handling and the WAL "
            "encoder on the primary, and the replica's one validation pass, all in interpreted "
            "Python (the cpu section prices each hop); Redis parses RESP and appends to its "
            "stream and AOF in C in one event loop, and its replica replays the command stream "
            f"in C. The machine's {os.cpu_count()} cores also host the load generator and "
            "every process."
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
            "ours NDJSON achieved",
            "ours NDJSON P99",
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
            "-",
            "-",
        ]
    )
    worse: list[str] = []
    over: list[str] = []
    for o, r, n in zip(data["latency"][0], data["latency"][1], data["latency_ndjson"], strict=True):
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
                _rate_cell(n),
                fmt_ms(n["p99_s"]),
            ]
        )
        if o["p99_s"] > r["p99_s"]:
            worse.append(f"{fmt_rate(o['offered_per_s'])} ({ratio(o['p99_s'], r['p99_s'])})")
        if not (o["p99_s"] < GOAL_P99_S and o["sustained"]):
            over.append(f"{fmt_rate(o['offered_per_s'])} (P99 {fmt_ms(o['p99_s'])})")
    lat.notes = [
        "Open loop, the same schedule for both: 1,000 requests/s, each carrying offered/1,000 "
        "entries of 100 bytes (a binary HTTP request to us, and in the last two columns an "
        "NDJSON one; an XADD pipeline to Redis), "
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
            "aiohttp, its entries encoded and CRC'd in Python and appended before its "
            "group-committed fsync; Redis does the equivalent in C "
            "in one event loop. At light loads that per-request work is the difference (compare "
            "the no-op round trips: HTTP and RESP cost about the same); at heavy loads it is "
            "queueing, because the Python path saturates a core long before Redis's does."
        ),
        f"Goal: write P99 < {GOAL_P99_S * 1000:g} ms at every load measured here (ours): "
        + ("met." if not over else "NOT met at " + ", ".join(over) + "."),
        _repeats_note(data),
    ]
    if quick:
        for s in (tput, lat):
            s.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    lat.data = {"goal": {"goal": "write P99 <= Redis", "met": not worse}}
    targets = _targets(data, rname)
    if quick:
        targets.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    return [targets, tput, lat]


def _repeats_note(data: Mapping[str, Any]) -> str:
    n = int(data.get("latency_repeats") or 1)
    if n <= 1:
        return "Each latency figure is from one run."
    return (
        f"Each latency load ran {n} times, ours and Redis's interleaved, and the run with the "
        "median P99 is the one reported (its P99, P50 and rate); the P99 of every run, in run "
        "order, is in parentheses. One run's P99 swings several-fold on this shared machine, "
        "Redis's too."
    )


def _at(rows: list[dict[str, Any]], offered: float) -> dict[str, Any] | None:
    return next((r for r in rows if round(r["offered_per_s"]) == offered), None)


def _p99_cell(row: Mapping[str, Any] | None) -> str:
    """The reported (median) run's P99, and every run's when there were several."""
    if row is None:
        return "not measured"
    return fmt_ms(row["p99_s"]) + ("" if row["sustained"] else " (NOT sustained)") + runs_text(row)


def _targets(data: dict[str, Any], rname: str) -> Section:
    """Issue 13's targets, each measured in this run next to Redis, met or not."""
    s = Section(
        key=TARGETS_KEY,
        title=f"Targets of the fast write path (issue 13), next to {rname} in the same run",
        headers=["target", "ours (binary)", "ours (NDJSON)", rname, "verdict"],
    )
    goals: list[dict[str, Any]] = []

    def target(name: str, ours: str, nd: str, red: str, met: bool | None) -> None:
        verdict = "not measured" if met is None else ("met" if met else "**NOT met**")
        s.rows.append([name, ours, nd, red, verdict])
        goals.append({"target": name, "measured": ours, "redis": red, "met": met})

    (ours_t, red_t), nd_t = data["tput"], data["tput_ndjson"]
    o_rate, r_rate = ours_t["applied_per_s"], red_t["applied_per_s"]
    target(
        "replicated entries/s per stream ≥ 1.0× Redis's (aim 2×)",
        f"{fmt_rate(o_rate)} ({ratio(o_rate, r_rate)}; aim 2×: "
        + ("met" if o_rate >= 2 * r_rate else "not met")
        + ")",
        fmt_rate(nd_t["applied_per_s"]),
        fmt_rate(r_rate),
        o_rate >= r_rate,
    )
    lag_cell, lag_met = _lag_target(data["lag"][0])
    target(
        f"replica lag < 1 s at 80% of our max ({fmt_rate(data['lag_offered_per_s'])})",
        lag_cell,
        "-",
        f"max {_s(data['lag'][1]['max_s'])}",
        lag_met,
    )
    ours_l, red_l = data["latency"]
    nd_l = data["latency_ndjson"]
    for offered, bound in ((100_000, 0.010), (50_000, 0.002)):
        o = _at(ours_l, offered)
        target(
            f"write P99 < {bound * 1000:g} ms at {fmt_rate(offered)} offered (async, 1 replica)",
            _p99_cell(o),
            _p99_cell(_at(nd_l, offered)),
            _p99_cell(_at(red_l, offered)),
            None if o is None else bool(o["p99_s"] < bound and o["sustained"]),
        )
    for offered in (1_000, 10_000):
        o, r = _at(ours_l, offered), _at(red_l, offered)
        target(
            f"write P99 no worse than Redis's at {fmt_rate(offered)}",
            _p99_cell(o),
            _p99_cell(_at(nd_l, offered)),
            _p99_cell(r),
            None if o is None or r is None else bool(o["p99_s"] <= r["p99_s"]),
        )
    q = data["quorum"]
    q10 = _at(q["latency"], 10_000)
    target(
        "quorum, 2 replicas: write P99 < 5 ms at 10,000/s",
        _p99_cell(q10),
        "-",
        "-",
        None if q10 is None else bool(q10["p99_s"] < 0.005 and q10["sustained"]),
    )
    q1 = _at(q["latency"], 1_000)
    target(
        "quorum, 2 replicas: no P99 spike above 10 ms at 1,000/s",
        _p99_cell(q1),
        "-",
        "-",
        None if q1 is None else bool(q1["p99_s"] < 0.010),
    )
    qt = q["tput"]["applied_per_s"]
    target(
        "quorum, 2 replicas: max throughput ≥ 150,000 entries/s",
        fmt_rate(qt),
        "-",
        "-",
        qt >= 150_000,
    )
    (_, orr), (_, rr) = data["rss"]
    mib = 1024 * 1024
    target(
        "memory < 100 MB per stream (RSS of the replica, all streams of the scenario)",
        f"{orr / mib:.0f} MiB",
        "-",
        f"{rr / mib:.0f} MiB",
        orr < 100 * mib,
    )
    s.notes = [
        "Every figure is from this scenario's own runs (the two tables below): the binary "
        "write path and the NDJSON one against the same sidecars, Redis in the same run at "
        "equal durability (fsync always on both sides, async replication). 'not measured': "
        "a quick run measures only some loads. Promotion time is in the promotion section; "
        "light-load spikes for every ack policy in the ackpolicy section.",
        _repeats_note(data),
    ]
    s.data = {"goals": goals}
    return s


def _lag_target(lag: Mapping[str, Any]) -> tuple[str, bool]:
    """Our lag run's cell and verdict. A writer that fell short offered less than 80% of max,
    so however small its lag, that run does not show the target met."""
    load = lag["load"]
    short = (
        "" if load["sustained"] else f" (writer achieved only {fmt_rate(load['achieved_per_s'])})"
    )
    cell = f"max {_s(lag['max_s'])}, {lag['max_entries']:,.0f} entries{short}"
    return cell, lag["max_s"] < 1.0 and load["sustained"]
