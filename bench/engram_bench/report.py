"""Benchmark results: one Section per scenario, rendered to Markdown and JSON."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Section:
    """One scenario's results: a table, notes, and the raw numbers for JSON."""

    key: str
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    images: list[tuple[str, str]] = field(default_factory=list)  # (alt text, relative path)

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.headers:
            lines.append("| " + " | ".join(_cell(h) for h in self.headers) + " |")
            lines.append("|" + "---|" * len(self.headers))
            lines.extend("| " + " | ".join(_cell(c) for c in r) + " |" for r in self.rows)
            lines.append("")
        if self.notes:
            lines.extend(f"- {n}" for n in self.notes)
            lines.append("")
        for alt, path in self.images:
            lines += [f"![{alt}]({path})", ""]
        return "\n".join(lines)


def _cell(text: str) -> str:
    """A table cell: a '|' in the text would end the cell."""
    return text.replace("|", "\\|")


def percentile(samples: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no samples."""
    s = sorted(samples)
    if not s:
        return math.nan
    # Rounded before ceil: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, which
    # would make every P99.9 of 1,000 samples the maximum.
    rank = math.ceil(round(q / 100.0 * len(s), 9))
    k = max(0, min(len(s) - 1, rank - 1))
    return s[k]


def fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}/s"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def runs_text(row: Mapping[str, Any]) -> str:
    """The P99 of every run of a median-of-runs summary (`load.median_run`), as
    " (runs: a / b / c)", or "" for a single run."""
    runs = row.get("p99_runs_s") or []
    if len(runs) <= 1:
        return ""
    return " (runs: " + " / ".join(fmt_ms(x) for x in runs) + ")"


def ratio(value: float, baseline: float) -> str:
    if baseline == 0 or math.isnan(baseline) or math.isnan(value):
        return "n/a"
    return f"{value / baseline:.2f}x"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown RAM"


def filesystem_of(path: Path) -> str:
    """The mount holding `path`: 'ext4 at /' (from /proc/mounts; longest matching mount)."""
    try:
        target = str(path.resolve())
        best = ("", "unknown")
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best[0]):
                best = (mnt, parts[2])
        return f"{best[1]} at {best[0] or '?'}"
    except OSError:
        return "unknown filesystem"


def machine_description(data_dir: Path | None = None) -> str:
    import os

    cpus = os.cpu_count() or 0
    text = (
        f"{platform.machine()}, {cpus} cores ({_cpu_model()}), {_mem_total()}, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )
    if data_dir is not None:
        text += f"; benchmark data on {filesystem_of(data_dir)}"
    return text
