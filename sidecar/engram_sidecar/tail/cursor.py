"""Where the tail of a space's Engram WAL stands, kept with the space's log.

`<data>/<space>/engram-tail.json`, replaced atomically (temp file, fsync, rename, fsync of the
directory) only after the entries it covers are durable in the space's log:

- `file`, `offset`: the Engram file being followed and the byte just past the last entry shipped
  from it (resume here);
- `sequence`: this project's sequence of that entry (0 before the first);
- `runs`: where each shipped entry came from. A run is `[sequence, file, offset,
  engram_sequence]`: the entry with our `sequence` is Engram's `engram_sequence` at `offset`
  of `file`, and the entries after it, up to the next run, follow it one for one in that file
  with Engram's sequence rising by one. A new run starts with every file and wherever Engram's
  sequence does not rise by one. This is where Engram's own sequence of any shipped entry is
  found (`engram_origin`), and from where the tail resumes after the log was cut;
- `compacted`: Engram files recognised as compaction output and not shipped (docs/engram.md).

A crash between a durable append and the cursor's replacement leaves the cursor behind the log;
the tailer rolls it forward on start by matching the log's extra entries against Engram's files
(`tailer.reconcile`), so nothing is shipped twice and nothing is skipped.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from engram_sidecar.log.segment import replace_atomically

FILE: Final = "engram-tail.json"
VERSION: Final = 1
MAX_RUNS: Final = 10_000


@dataclass(frozen=True, slots=True)
class Run:
    sequence: int  # ours, of the run's first entry
    file: str
    offset: int
    engram_sequence: int


@dataclass
class Cursor:
    file: str = ""
    offset: int = 0
    sequence: int = 0
    engram_sequence: int = -1  # of the last entry shipped from `file`; -1 before any
    runs: list[Run] = field(default_factory=list)
    compacted: list[str] = field(default_factory=list)

    def note(
        self, *, sequence: int, file: str, offset: int, end: int, engram_sequence: int
    ) -> None:
        """Entry `sequence` was shipped from `offset..end` of `file`."""
        continues = (
            self.runs
            and self.file == file
            and self.offset == offset
            and self.sequence == sequence - 1
            and self.engram_sequence == engram_sequence - 1
        )
        if not continues:
            self.runs.append(Run(sequence, file, offset, engram_sequence))
            if len(self.runs) > MAX_RUNS:
                # Engram's two sequence counters (`write_sync` and the writer thread) can
                # interleave in one file, a run per entry: keep the cursor small, forget the
                # oldest origins (the log's entries themselves are unaffected).
                del self.runs[: len(self.runs) - MAX_RUNS]
        self.file, self.offset, self.sequence = file, end, sequence
        self.engram_sequence = engram_sequence

    def run_of(self, sequence: int) -> Run | None:
        i = bisect.bisect_right([r.sequence for r in self.runs], sequence) - 1
        return self.runs[i] if i >= 0 and sequence <= self.sequence else None

    def engram_origin(self, sequence: int) -> tuple[str, int] | None:
        """(Engram file, Engram sequence) of our entry `sequence`, if the tail shipped it."""
        r = self.run_of(sequence)
        if r is None:
            return None
        return r.file, r.engram_sequence + (sequence - r.sequence)

    def drop_after(self, sequence: int) -> None:
        """The log was cut after `sequence`: forget the runs of what was cut. The position
        (`file`, `offset`) is left for the tailer to find again (`tailer.locate`)."""
        self.runs = [r for r in self.runs if r.sequence <= sequence]
        self.sequence = min(self.sequence, sequence)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": VERSION,
                "file": self.file,
                "offset": self.offset,
                "sequence": self.sequence,
                "engram_sequence": self.engram_sequence,
                "runs": [[r.sequence, r.file, r.offset, r.engram_sequence] for r in self.runs],
                "compacted": self.compacted,
            },
            separators=(",", ":"),
        ).encode()


class CursorError(Exception):
    pass


def load(space_dir: Path) -> Cursor | None:
    """The stored cursor, None when there is none. An unreadable one is a CursorError: guessing
    a position could ship entries twice or skip some."""
    path = space_dir / FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CursorError(f"{path}: unreadable ({err})") from err
    try:
        if raw.get("version") != VERSION:
            raise CursorError(f"{path}: version {raw.get('version')!r}, expected {VERSION}")
        return Cursor(
            file=str(raw["file"]),
            offset=int(raw["offset"]),
            sequence=int(raw["sequence"]),
            engram_sequence=int(raw["engram_sequence"]),
            runs=[Run(int(a), str(b), int(c), int(d)) for a, b, c, d in raw["runs"]],
            compacted=[str(x) for x in raw.get("compacted", [])],
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CursorError(f"{path}: malformed ({err})") from err


def store(space_dir: Path, cursor: Cursor, *, space: str) -> None:
    replace_atomically(space_dir / FILE, cursor.to_json(), space=space)
