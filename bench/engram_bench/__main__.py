"""`engram-replication bench` / `engram-replication-bench`: run the benchmarks.

A program of its own (exec'd by the product's console script), so the product never imports the
benchmark and the runtime image can leave it out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from engram_bench import runner


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="engram-replication bench",
        description="run the benchmarks and regenerate docs/benchmarks.md",
    )
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    p.add_argument("--only", action="append", default=None, help="scenario key (repeatable)")
    p.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--json", type=Path, default=Path("bench/results/latest.json"))
    args = p.parse_args(argv)
    return runner.main(quick=args.quick, only=args.only, docs=args.docs, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
