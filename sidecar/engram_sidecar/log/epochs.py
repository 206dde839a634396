"""A space's epoch history (epoch -> first sequence written in it) and the fork point.

Stored as JSON, replaced atomically (temp file, fsync, rename, fsync dir), because losing it would
leave a deposed primary unable to find where its log diverged.
"""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path

from engram_sidecar.errors import WalCorruption
from engram_sidecar.log.segment import replace_atomically

History = list[tuple[int, int]]  # (epoch, first sequence), epochs strictly increasing


def load(path: Path) -> History:
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text())
        hist = [(int(e), int(s)) for e, s in raw["epochs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise WalCorruption(str(path), 0, f"unreadable epoch history: {err}") from err
    for (e1, s1), (e2, s2) in itertools.pairwise(hist):
        if e2 <= e1 or s2 < s1:
            raise WalCorruption(str(path), 0, f"epoch history out of order at epoch {e2}")
    return hist


def store(path: Path, history: History, *, space: str = "") -> None:
    """Replace the stored history durably. Raises StorageError (full disk, I/O error)."""
    data = json.dumps({"epochs": [[e, s] for e, s in history]}).encode()
    replace_atomically(path, data, space=space)


def record(history: History, epoch: int, first_sequence: int) -> History | None:
    """The history with `epoch` starting at `first_sequence`, or None when nothing changes."""
    if history and epoch <= history[-1][0]:
        return None
    return [*history, (epoch, first_sequence)]


def epoch_at(history: History, sequence: int) -> int:
    """The epoch that wrote the entry at `sequence`: the latest epoch begun at or before it.

    0 for sequence 0 (the empty prefix every log shares) and for sequences before the first
    recorded epoch. Works for entries released by retention: only the history is consulted.
    Epochs begun after the log's last entry (a promotion with no write yet) start above it and
    so never answer for an existing entry.
    """
    i = bisect.bisect_right(history, sequence, key=lambda h: h[1])
    return history[i - 1][0] if i > 0 else 0


def cut_after(history: History, sequence: int) -> History:
    """The history of a log truncated to end at `sequence`."""
    return [(e, s) for e, s in history if s <= sequence]


def end_of_epoch(history: History, epoch: int, last_sequence: int) -> int:
    """The last sequence written in `epoch` or any earlier epoch, as this log knows it.

    The new primary answers this for a follower's last epoch: the follower keeps entries up to it.
    """
    for e, s in history:
        if e > epoch:
            return min(s - 1, last_sequence)
    return last_sequence


def fork_point(*, local: History, local_last: int, leader: History, leader_last: int) -> int:
    """The last sequence where a follower's log still agrees with the leader's.

    Kafka's leader-epoch rule: take the follower's last epoch, ask the leader where that epoch (or
    the latest earlier one the leader knows) ended, and keep no more than that. Repeat with the
    follower's earlier epochs if the leader never had its last one.
    """
    leader_epochs = {e for e, _ in leader}
    for epoch, _start in reversed(local):
        if epoch in leader_epochs or not leader or epoch < leader[0][0]:
            return min(local_last, end_of_epoch(leader, epoch, leader_last))
        local_last = min(local_last, _start - 1)
    return min(local_last, leader_last)
