"""This node's standing in one space: its assignment, the highest epoch it accepted, whether it
is fenced, and (as primary) the write lease only the control plane grants (design-notes "Write
lease"). Every decision that says whether this node may acknowledge a write is made here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from engram_contract.assignment import Assignment
from engram_contract.ids import NodeName, SpaceId
from engram_sidecar.log import assignment_store as assignment_file

log = logging.getLogger(__name__)


class NotWritable(Exception):
    """This node can't accept the write now; `reason` is for the 503/421 body."""

    def __init__(
        self, reason: str, *, status: int = 503, primary: str = "", code: str = "unavailable"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.primary = primary
        # "unavailable": refused before anything was written; "not_acknowledged": the entries
        # are in this primary's log but the ack policy was not met, so they may or may not last.
        self.code = code


class Membership:
    def __init__(
        self,
        *,
        space: SpaceId,
        node: NodeName,
        path: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.space = space
        self.node = node
        self.path = path  # where the assignment is saved (assignment.json)
        self.clock = clock
        self.assignment: Assignment | None = None
        self.accepted_epoch = 0
        self.fenced_reason: str | None = None
        # Write lease (design §4): until when, on this node's monotonic clock (`clock`), the
        # control plane's last grant holds. Only the control plane renews it, never replica acks.
        self.lease_seconds = 1.5
        self.lease_until = float("-inf")

    @property
    def role(self) -> str:
        if self.assignment is None:
            return "none"
        return self.assignment.role_of(self.node)

    def assignment_epoch(self) -> int:
        return self.assignment.epoch if self.assignment else 0

    def adopt(self, a: Assignment) -> None:
        """Adopt `a` (already checked not stale), persisting it before acting on it.

        A new primary or epoch ends the write lease: a grant vouched for the old one.
        """
        assignment_file.save(self.path, a, max(a.epoch, self.accepted_epoch))
        old = self.assignment
        if old is None or old.epoch != a.epoch or old.primary != a.primary:
            self.lease_until = float("-inf")
        self.assignment = a
        self.accepted_epoch = max(self.accepted_epoch, a.epoch)
        self.fenced_reason = None

    def note_epoch(self, epoch: int) -> bool:
        """A peer or the control plane proved `epoch`: remember it durably. True if it is new
        (the caller then fences a primary)."""
        if epoch <= self.accepted_epoch:
            return False
        self.accepted_epoch = epoch
        if self.assignment is not None:
            assignment_file.save(self.path, self.assignment, epoch)
        return True

    def fence(self, reason: str) -> None:
        if self.fenced_reason is None:
            log.warning(
                "space %s: node %s stops accepting writes: %s", self.space, self.node, reason
            )
        self.fenced_reason = reason

    def grant_lease(self, since: float, seconds: float | None = None) -> None:
        """The control plane vouched for this node at `since` (this node's monotonic clock).

        `since` is when the grant arrived (a pushed heartbeat) or when the request that earned
        it was sent (a Lease renewal this node made): never later than the control plane's own
        reckoning, so the lease ends here before the control plane counts it gone.
        """
        length = self.lease_seconds if seconds is None else min(seconds, self.lease_seconds)
        self.lease_until = max(self.lease_until, since + length)

    def lease_valid(self, now: float | None = None) -> bool:
        return (self.clock() if now is None else now) < self.lease_until

    def check_writable(self) -> None:
        a = self.assignment
        if a is None:
            raise NotWritable(f"space {self.space} has no assignment on node {self.node}")
        if a.primary.node != self.node:
            raise NotWritable(
                f"node {self.node} is not the primary of space {self.space}; {a.primary.node} is",
                status=421,
                primary=a.primary.http,
            )
        if self.fenced_reason is not None:
            raise NotWritable(f"space {self.space} is fenced on {self.node}: {self.fenced_reason}")
        if a.epoch < self.accepted_epoch:
            raise NotWritable(f"space {self.space}: epoch {a.epoch} was superseded")
        if not self.lease_valid():
            raise NotWritable(
                f"space {self.space}: no write lease on {self.node}: no grant from the control "
                f"plane in the last {self.lease_seconds:.1f} s"
            )

    def check_unchanged(self, a: Assignment | None, epoch: int, first: int, last: int) -> None:
        """After a write's waits: acknowledge only what is still true. The waits took time, in
        which this node may have been deposed, fenced, or lost its lease; any of those and the
        entries `first..last` may not last (issue 11, finding 4)."""
        try:
            self.check_writable()
            if self.assignment is not a or self.accepted_epoch != epoch:
                raise NotWritable(f"space {self.space}: the assignment changed during the write")
        except NotWritable as err:
            raise NotWritable(
                f"{err.reason}; the entries {first}..{last} are in this node's log but NOT "
                "acknowledged",
                code="not_acknowledged",
            ) from None
