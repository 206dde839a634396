"""Operator-facing WAL tools: `wal dump` (like pg_waldump) and `wal verify`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import TextIO

from engram_contract.formats.entry import EntryType
from engram_contract.ids import validate_space_id
from engram_sidecar.errors import InvalidSpaceId
from engram_sidecar.log.verify import Problem, dump, verify_space


def _type_name(t: int) -> str:
    try:
        return EntryType(t).name.lower()
    except ValueError:
        return f"unknown({t})"


def _preview(payload: bytes, width: int = 60) -> str:
    text = payload[:width].decode("utf-8", errors="replace")
    text = text.replace("\n", "\\n")
    return text + ("…" if len(payload) > width else "")


def wal_dump(data_dir: Path, space: str, from_sequence: int, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out  # looked up per call: redirects and capture work
    try:
        validate_space_id(space)
    except InvalidSpaceId as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    space_dir = data_dir / space
    if not (space_dir / "wal").is_dir():
        print(f"error: no WAL for space {space!r} under {data_dir}", file=sys.stderr)
        return 2
    count = 0
    for path, offset, item in dump(space_dir, from_sequence):
        if isinstance(item, Problem):
            print(f"error: {item}", file=sys.stderr)
            return 1
        ts = dt.datetime.fromtimestamp(item.timestamp_ns / 1e9, tz=dt.UTC)
        print(
            f"seq={item.sequence} epoch={item.epoch} type={_type_name(item.entry_type)} "
            f"ts={ts.isoformat(timespec='microseconds')} len={len(item.payload)} "
            f"at={Path(path).name}:{offset} payload={_preview(item.payload)}",
            file=out,
        )
        count += 1
    print(f"# {count} entries", file=out)
    return 0


def wal_verify(data_dir: Path, space: str | None, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if not data_dir.is_dir():
        print(f"error: data directory {data_dir} does not exist", file=sys.stderr)
        return 2
    if space is not None:
        try:
            validate_space_id(space)
        except InvalidSpaceId as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not (data_dir / space / "wal").is_dir():
            print(f"error: no WAL for space {space!r} under {data_dir}", file=sys.stderr)
            return 2
        dirs = [data_dir / space]
    else:
        dirs = sorted(p for p in data_dir.iterdir() if (p / "wal").is_dir())
        if not dirs:
            print(f"error: no memory spaces under {data_dir}", file=sys.stderr)
            return 2
    bad = 0
    for d in dirs:
        r = verify_space(d)
        state = "ok" if not r.problems else "CORRUPT"
        print(
            f"{r.space}: {state}: {r.entries} entries, sequences {r.first_sequence}..."
            f"{r.last_sequence}, {r.segments} segments, {r.bytes} bytes",
            file=out,
        )
        for p in r.problems:
            print(f"  error: {p}", file=out)
        bad += bool(r.problems)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """`engram-replication wal …` (exec'd as `python -m engram_sidecar.walcli`)."""
    p = argparse.ArgumentParser(prog="engram-replication wal", description=__doc__)
    wsub = p.add_subparsers(dest="wal_command", required=True, metavar="WAL_COMMAND")
    d = wsub.add_parser("dump", help="print one line per entry (like pg_waldump)")
    d.add_argument("--data-dir", type=Path, required=True)
    d.add_argument("--space", required=True)
    d.add_argument("--from", dest="from_sequence", type=int, default=1, metavar="SEQ")
    v = wsub.add_parser("verify", help="check every CRC and sequence; non-zero exit on corruption")
    v.add_argument("--data-dir", type=Path, required=True)
    v.add_argument("--space", default=None)
    args = p.parse_args(argv)
    if args.wal_command == "dump":
        return wal_dump(args.data_dir, args.space, args.from_sequence)
    return wal_verify(args.data_dir, args.space)


if __name__ == "__main__":
    sys.exit(main())
