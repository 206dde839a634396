"""The divergent tails this node cut, kept on disk: `<data>/<space>/truncations.json`.

When a deposed primary rejoins and log matching cuts the entries the new primary never had,
that count is the exact number of entries the failover lost from this node, acknowledged ones
included (under `async` an acknowledged entry is durable here first). The control plane reads
it from the space view and completes its decision record with it (`entriesLost`), so the loss
of a failover is measured, not only estimated from the old primary's last report. Kept across
restarts, since a deposed primary is often restarted before it rejoins.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Final, TypedDict

from engram_sidecar.log.segment import replace_atomically

FILE: Final = "truncations.json"
KEEP: Final = 64  # the newest cuts; failovers are rare, decision records keep 20


class Truncation(TypedDict):
    epoch: int  # the epoch of the primary this node followed when it cut
    after: int  # the last sequence kept
    dropped: int  # entries cut
    at_ns: int  # wall clock when cut (for people, not for decisions)


def load(space_dir: Path) -> list[Truncation]:
    """The recorded cuts, oldest first; [] when none, or when the file is unreadable (it is a
    report, never an input to a safety decision)."""
    try:
        raw = json.loads((space_dir / FILE).read_text())
    except (OSError, ValueError):
        return []
    out: list[Truncation] = []
    for t in raw if isinstance(raw, list) else []:
        try:
            out.append(
                Truncation(
                    epoch=int(t["epoch"]),
                    after=int(t["after"]),
                    dropped=int(t["dropped"]),
                    at_ns=int(t.get("at_ns", 0)),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out[-KEEP:]


def record(
    space_dir: Path, history: list[Truncation], *, epoch: int, after: int, dropped: int, space: str
) -> list[Truncation]:
    """`history` plus this cut, stored durably (raises StorageError like any log write)."""
    new = [
        *history,
        Truncation(epoch=epoch, after=after, dropped=dropped, at_ns=time.time_ns()),
    ][-KEEP:]
    replace_atomically(space_dir / FILE, json.dumps(new).encode(), space=space)
    return new
