"""Log matching (design §4; Raft's prevLogIndex/prevLogTerm, Kafka's leader epochs): pure rules.

An entry is identified by (epoch, sequence), never by sequence alone. A primary creates at most
one entry per sequence in its epoch, and a replica appends only after proving it holds the entry
the batch follows, so two logs that hold the same (epoch, sequence) agree on every entry up to
it. Both sides read epochs from the epoch history (epoch -> first sequence written in it), so no
entry is read from disk to decide, and sequences released by retention still have an epoch.

The replica answers a batch whose previous entry it can't match with its own entry at or below
that point (`Mismatch`); the primary then backs up (`resend_point`). Each round strictly lowers
the sequence tried, so the two meet at the fork point in a few round trips.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

History = Sequence[tuple[int, int]]  # (epoch, first sequence), both strictly increasing


def epoch_at(history: History, sequence: int) -> int:
    """The epoch of entry `sequence` by `history`; 0 for sequence 0 (before the log)."""
    if sequence < 1 or not history:
        return 0
    i = bisect.bisect_right(history, sequence, key=lambda h: h[1])
    return history[i - 1][0] if i else 0


def epoch_start(history: History, epoch: int) -> int:
    """First sequence written in `epoch` (which `history` must hold)."""
    for e, s in history:
        if e == epoch:
            return s
    raise KeyError(f"epoch {epoch} is not in the history")


def epoch_end(history: History, epoch: int, last: int) -> tuple[int, int]:
    """(E, X): E is the highest epoch in `history` at or below `epoch`, X its last sequence.

    (0, 0) when every epoch of the history is above `epoch`. Kafka's OffsetsForLeaderEpoch.
    """
    best = (0, 0)
    for i, (e, _s) in enumerate(history):
        if e > epoch:
            break
        end = history[i + 1][1] - 1 if i + 1 < len(history) else last
        best = (e, min(end, last))
    return best


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The replica can't append: resend from `resend_from`, after its entry (epoch_hint, -1)."""

    gap: bool  # its log ends before the batch's previous entry
    resend_from: int
    epoch_hint: int
    why: str


def check_prev(*, history: History, last: int, prev_seq: int, prev_epoch: int) -> Mismatch | None:
    """None when this log holds (prev_epoch, prev_seq): the batch may be applied.

    Otherwise the replica's own entry at or below `prev_seq` to try next. When its entry at
    `prev_seq` has a *higher* epoch than the primary's, every entry of that epoch here is
    divergent (one primary per epoch starts it at one sequence, and the primary's epoch at
    `prev_seq` is lower), so the hint skips the whole run.
    """
    if prev_seq > last:
        return Mismatch(
            True,
            last + 1,
            epoch_at(history, last),
            f"log ends at {last}, batch follows {prev_seq}",
        )
    mine = epoch_at(history, prev_seq)
    if mine == prev_epoch:
        return None
    point = prev_seq
    if mine > prev_epoch:
        point = epoch_start(history, mine) - 1
    return Mismatch(
        False,
        point + 1,
        epoch_at(history, point),
        f"entry {prev_seq} is epoch {mine} here, {prev_epoch} on the primary",
    )


def resend_point(*, history: History, last: int, replica_seq: int, replica_epoch: int) -> int:
    """Where the primary resends from after the replica named its entry (replica_epoch, seq).

    If the primary holds the same entry, right after it. Otherwise after the last entry of the
    primary's highest epoch at or below the replica's (never past `replica_seq`): the next
    batch then proves or refutes that point, and each refusal names a lower one.
    """
    seq = min(replica_seq, last)
    if seq == replica_seq and epoch_at(history, seq) == replica_epoch:
        return seq + 1
    _, end = epoch_end(history, replica_epoch, last)
    point = min(seq, end)
    if point == replica_seq:  # same sequence, different epoch: the fork is below it
        point -= 1
    return max(point, 0) + 1


def overlap(
    *, history: History, last: int, first_seq: int, epochs: list[int]
) -> tuple[int, int | None]:
    """Compare a batch starting at `first_seq` with the entries this log already holds.

    Returns (how many leading entries this log already holds identically, the first sequence
    where it holds a different entry or None). Log matching makes the epoch comparison enough.
    """
    held = 0
    for i, e in enumerate(epochs):
        seq = first_seq + i
        if seq > last:
            return held, None
        if epoch_at(history, seq) != e:
            return held, seq
        held += 1
    return held, None


def refusal_deposes(replica_epoch: int, leading_epoch: int) -> bool:
    """Whether a replica's STALE_EPOCH refusal, naming the epoch it holds, proves that this
    primary (assigned at `leading_epoch`) was deposed.

    Only an epoch above the one this node leads at does. A refusal naming that same epoch (or
    an older one) answers a frame this node sent before it adopted its current assignment, one
    still in flight when the control plane re-asserted it at the epoch the replica holds:
    fencing on it would leave the re-asserted primary fenced with nobody above it.
    """
    return replica_epoch > leading_epoch
