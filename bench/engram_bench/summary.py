"""The goals table at the top of docs/benchmarks.md, gathered from the sections' data.

Each goal of docs/design.md §8 and of the benchmark issue, with the figure this run measured
and whether it was met. Sections that did not run (``--only``) or were skipped leave their rows
out. The why of every miss is in the section's own notes; this table only points there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from engram_bench.report import Section, fmt_ms, fmt_rate

Row = tuple[str, str, bool | None]


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "**NOT met**")


def _throughput(d: dict[str, Any]) -> Row:
    g = d["goal"]
    v = g["value"]
    aim = "; aim 500K: " + ("met" if v >= 500_000 else "not met")
    return ("≥ 100K entries/s per replica stream (aim 500K)", fmt_rate(v) + aim, g["met"])


def _latency(d: dict[str, Any]) -> Row:
    loads = ", ".join(
        f"{fmt_rate(x['offered_per_s'])}: {fmt_ms(x['p99_s'])}"
        + ("" if x["achieved_per_s"] >= 0.95 * x["offered_per_s"] else " (not sustained)")
        for x in d["loads"]
    )
    return ("write P99 < 10 ms up to 100K entries/s", loads, d["goal"]["met"])


def _lag(d: dict[str, Any]) -> Row:
    g = d["goal"]
    run = next((r for r in d["runs"] if r["share"] == g["share"]), d["runs"][-1])
    load = run["load"]
    short = (
        "" if load["sustained"] else f" (writer achieved only {fmt_rate(load['achieved_per_s'])})"
    )
    return (
        f"lag < 1 s at {g['share']:.0%} of max",
        f"max {g['value']:.3f} s at {fmt_rate(g['share'] * d['max_rate_per_s'])}{short}",
        g["met"],
    )


def _slowed(d: dict[str, Any]) -> Row:
    g = d["goal"]
    paused = d["runs"]["paused"]
    return (
        "lag < 1 s with the replica behind a delayed link; a paused one recovers",
        f"delayed: max {g['value']:.3f} s; paused: back under 0.1 s "
        f"{paused['recovered_s']:.2f} s after SIGCONT",
        g["met"],
    )


def _catchup(d: dict[str, Any]) -> Row:
    g = d["goal"]
    took = ", ".join(
        f"{r['record'].get('path')} {float(r['record'].get('seconds', 0)):.2f} s"
        for r in d["runs"].values()
    )
    return (
        "catch-up of a 10K gap while the live replica's lag stays < 1 s",
        f"{took}; live lag max {g['value']:.3f} s",
        g["met"],
    )


def _promotion(d: dict[str, Any]) -> Row:
    a = d["summary"]["async"]
    aim = a["max_s"] < d["goal"]["aim"]
    return (
        "promotion < 5 s (aim 2 s)",
        f"async P50 {a['p50_s']:.2f} s, max {a['max_s']:.2f} s over {a['runs']} runs; aim 2 s: "
        + ("met" if aim else f"{a['within_aim']}/{a['runs']} runs"),
        d["goal"]["met"],
    )


def _pool(d: dict[str, Any]) -> Row:
    head = d["rows"][0]
    return ("< 1 ms pool overhead per batch", fmt_ms(head["overhead_p50_s"]), d["goal"]["met"])


def _memory(d: dict[str, Any]) -> Row:
    v = d["goal"]["value"]
    return ("< 100 MB per replica stream", f"{v / 1024 / 1024:.1f} MiB", d["goal"]["met"])


def _redis_tput(d: dict[str, Any]) -> Row:
    ours, red = d["tput"]
    return (
        "replicated throughput ≥ Redis's at equal durability",
        f"{fmt_rate(ours['applied_per_s'])} vs Redis {fmt_rate(red['applied_per_s'])}",
        d["goal"]["met"],
    )


def _redis_lat(d: dict[str, Any], tput: Section | None) -> Row:
    text = "-"
    if tput is not None and "latency" in tput.data:
        ours, red = tput.data["latency"]
        text = ", ".join(
            f"{fmt_rate(o['offered_per_s'])}: {fmt_ms(o['p99_s'])} vs {fmt_ms(r['p99_s'])}"
            for o, r in zip(ours, red, strict=True)
        )
    return ("write P99 no worse than Redis's at equal durability", text, d["goal"]["met"])


def _spikes(d: dict[str, Any]) -> Row:
    light = [r for r in d["rows"] if round(r["offered_per_s"]) == 1_000]
    if not light:
        raise KeyError("no 1,000/s rows")
    worst = max(light, key=lambda r: r["p99_s"])
    return (
        "no write P99 above 10 ms at 1,000 entries/s, any ack policy",
        f"worst {worst['policy']}/{worst['replicas']}: {fmt_ms(worst['p99_s'])}",
        all(r["p99_s"] < 0.010 for r in light),
    )


def goals_section(sections: Sequence[Section]) -> Section:
    by = {s.key: s for s in sections}
    makers: list[tuple[str, Callable[[dict[str, Any]], Row]]] = [
        ("replication-throughput", _throughput),
        ("replication-latency", _latency),
        ("replication-lag", _lag),
        ("lag-slowed", _slowed),
        ("catchup", _catchup),
        ("promotion", _promotion),
        ("replication-pool", _pool),
        ("replication-memory", _memory),
        ("redis-throughput-lag", _redis_tput),
        ("redis-latency", lambda d: _redis_lat(d, by.get("redis-throughput-lag"))),
        ("ack-policy", _spikes),
    ]
    s = Section(
        key="goals",
        title="Goals at a glance",
        headers=["goal", "measured in this run", "verdict", "details and why"],
    )
    for key, make in makers:
        sec = by.get(key)
        if sec is None or sec.data.get("skipped"):
            continue
        try:
            goal, measured, met = make(sec.data)
        except (KeyError, TypeError, IndexError, ValueError):
            continue  # a section without the figure (e.g. a partial run) leaves its row out
        s.rows.append([goal, measured, _verdict(met), f"section '{sec.title}'"])
    targets = by.get("redis-targets")
    for g in targets.data.get("goals", []) if targets is not None else []:
        s.rows.append(
            [
                g["target"],
                f"{g['measured']} (Redis {g['redis']})" if g["redis"] != "-" else g["measured"],
                _verdict(g["met"]),
                f"section '{targets.title}'" if targets is not None else "",
            ]
        )
    if "redis-throughput-lag" in by and by["redis-throughput-lag"].data.get("skipped"):
        s.notes.append("The Redis comparison was skipped: redis-server is not installed.")
    s.notes.append(
        "A goal NOT met is explained in its section's notes: what limits it on this machine, "
        "measured against the same-run baseline."
    )
    return s
