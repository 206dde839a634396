"""Where a node keeps its assignment: `<data>/<space>/assignment.json`, replaced durably.

The document itself (and its only parser and builder) is `engram_contract.assignment`.
"""

from __future__ import annotations

import json
from pathlib import Path

from engram_contract.assignment import Assignment
from engram_sidecar.log.segment import replace_atomically


def save(path: Path, assignment: Assignment, accepted_epoch: int, *, space: str = "") -> None:
    """Replace the saved assignment durably. Raises StorageError (full disk, I/O error)."""
    data = json.dumps({"assignment": assignment.to_json(), "acceptedEpoch": accepted_epoch})
    replace_atomically(path, data.encode(), space=space)


def load(path: Path) -> tuple[Assignment, int] | None:
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return Assignment.from_json(doc["assignment"]), int(doc["acceptedEpoch"])
