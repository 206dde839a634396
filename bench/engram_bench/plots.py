"""PNG plots for docs/benchmarks.md (matplotlib, Agg backend), drawn from the sections' data.

Each plot is attached to the section it illustrates (`Section.images`, a path relative to the
Markdown file), so it is rendered right under that section's table. Only full runs draw them
(publish.write_results). Without matplotlib the plots are skipped with a note, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engram_bench.report import Section

OURS = "engram sidecar"
QUANTILES = (("P50", "p50_s", "o"), ("P99", "p99_s", "s"), ("P99.9", "p999_s", "^"))


def _by_key(sections: Sequence[Section]) -> dict[str, Section]:
    return {s.key: s for s in sections}


def render(sections: Sequence[Section], img_dir: Path, rel: str = "img") -> list[str]:
    """Draw every plot whose data is present; attach each to its section. Returns file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        for s in sections:
            if s.key in ("redis-latency", "redis-throughput-lag", "lag-slowed"):
                s.notes.append(
                    "Plots skipped: matplotlib is not installed (pip install -e .[dev])."
                )
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    by = _by_key(sections)
    written: list[str] = []

    def save(fig: Any, name: str, section: Section, alt: str) -> None:
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        section.images.append((alt, f"{rel}/{name}"))
        written.append(name)

    red = by.get("redis-throughput-lag")
    redis_ok = red is not None and not red.data.get("skipped")
    version = red.data.get("redis_version", "") if red is not None else ""
    target = by.get("redis-latency") or by.get("replication-latency")

    # 1. Write latency against offered load: us and Redis (same run), P50 / P99 / P99.9.
    series: list[tuple[str, list[dict[str, Any]], str]] = []
    if redis_ok and red is not None:
        ours_l, red_l = red.data["latency"]
        series = [(OURS, ours_l, "-"), (f"Redis {version}", red_l, "--")]
    elif "replication-latency" in by:
        series = [(OURS, by["replication-latency"].data.get("loads", []), "-")]
    if series and target is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for name, rows, style in series:
            xs = [r["offered_per_s"] for r in rows]
            for i, (q, key, marker) in enumerate(QUANTILES):
                ys = [r[key] * 1000 for r in rows]
                ax.plot(xs, ys, style, color=f"C{i}", marker=marker, label=f"{name} {q}")
        ax.axhline(10, color="grey", linewidth=0.8, linestyle=":", label="goal: P99 10 ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (entries/s, open loop)")
        ax.set_ylabel("write latency (ms, from intended send)")
        ax.set_title("Write latency against offered load (fsync always, 1 replica)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "latency-vs-load.png", target, "Write latency against offered load")

    # 2. Lag over time, us and Redis, at the same offered load.
    if redis_ok and red is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for (name, style), lag in zip(
            ((OURS, "-"), (f"Redis {version}", "--")), red.data["lag"], strict=True
        ):
            pts = lag["series"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xlabel("time since the writer started (s)")
        ax.set_ylabel("replica lag (s)")
        ax.set_title(f"Replica lag at {red.data['lag_offered_per_s']:,.0f} entries/s offered")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "lag-vs-redis.png", red, "Replica lag over time, us and Redis")

    # 3. Lag over time with the replica slowed.
    slow = by.get("lag-slowed")
    if slow is not None and "runs" in slow.data:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for key, style in (("baseline", "-"), ("delayed", "--"), ("paused", "-.")):
            pts = slow.data["runs"][key]["series"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key)
        ax.set_xlabel("time since the writer started (s)")
        ax.set_ylabel("replica lag (s)")
        ax.set_title("Replica lag: direct, behind a delay proxy, paused (SIGSTOP)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "lag-slowed.png", slow, "Replica lag over time with the replica slowed")

    # 4. Catch-up: the live replica and the returning one.
    cu = by.get("catchup")
    if cu is not None and "runs" in cu.data:
        runs = cu.data["runs"]
        fig, axes = plt.subplots(1, len(runs), figsize=(7.5, 3.6), sharey=True, squeeze=False)
        for ax, (path, r) in zip(axes[0], runs.items(), strict=True):
            pts = r["series"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label="r1 (live)")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", label="r2 (returning)")
            for mark, color in (("gone", "red"), ("back", "green"), ("caught", "blue")):
                ax.axvline(r["marks"][mark], color=color, linewidth=0.8, linestyle=":")
            ax.set_title(f"{path}", fontsize=9)
            ax.set_xlabel("time (s)")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("lag (s)")
        axes[0][0].legend(fontsize=7)
        save(fig, "catchup.png", cu, "Lag of the live and the returning replica during catch-up")
    return written
