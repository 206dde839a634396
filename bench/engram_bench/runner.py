"""Runs the benchmark scenarios and writes `docs/benchmarks.md` plus a JSON file of raw results."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from engram_bench.publish import write_results
from engram_bench.report import Section

# Order is the order in docs/benchmarks.md.
SCENARIOS: tuple[str, ...] = (
    "wal",
    "wire",
    "replication",
    "lagslow",
    "fanout",
    "compression",
    "ackpolicy",
    "catchup",
    "promotion",
    "redis",
    "cpu",
    "tailmode",
)


def main(*, quick: bool, only: list[str] | None, docs: Path, json_path: Path) -> int:
    unknown = sorted(set(only or ()) - set(SCENARIOS))
    if unknown:
        print(
            f"error: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    t_start = time.perf_counter()
    sections: list[Section] = []
    for key in SCENARIOS:
        if only and key not in only:
            continue
        mod = importlib.import_module(f"engram_bench.{key}")
        print(f"== {key}{' (quick)' if quick else ''}", flush=True)
        t0 = time.perf_counter()
        # A module returns one Section, or a list when its scenarios need several tables.
        result: Section | list[Section] = mod.run(quick=quick)
        for section in result if isinstance(result, list) else [result]:
            print(section.to_markdown(), flush=True)
            sections.append(section)
        print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
    # A full run rewrites docs/benchmarks.md and its plots; an --only run replaces just its own
    # sections and goals there; a quick run is a smoke test and leaves the page alone.
    partial = bool(only)
    write_results(sections, docs=docs, json_path=json_path, quick=quick, partial=partial)
    if quick:
        print(f"wrote {json_path} (quick run: {docs} left as it was)")
    elif partial:
        print(f"wrote {json_path}, and this run's sections and goals in {docs} (plots unchanged)")
    else:
        print(f"wrote {docs}, its plots in {docs.parent / 'img'}, and {json_path}")
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0
