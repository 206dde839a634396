"""The executor's store on Kubernetes: one MemorySpace's status (I/O).

Owns what the operator remembers of a space between ticks (`SpaceState`, rebuilt from status on
start and whenever another writer moved it) and the guarded writes that record a placement, a
promotion or a failover's epoch before anyone acts on it:

* **Re-read first.** Every epoch-changing write `GET`s the MemorySpace; if status no longer holds
  the placement we believe in (another operator replica wrote it), we adopt what we read and
  raise `Superseded`: the tick decides again on the new view.
* **Carry the resourceVersion read**, so the API server refuses the patch if anything changed in
  between (a sidecar's member report moving the version costs one re-read).
* **Within the promotion deadline.** A failover must be on record soon after the Lease read that
  judged the primary dead (PROMOTION_DEADLINE), or it decides again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from engram_contract.ids import Epoch, SpaceId
from engram_operator.election import DecisionRecord
from engram_operator.executor import Superseded
from engram_operator.kube.api import KubeApi, KubeApiError, now_iso
from engram_operator.kube.convert import (
    last_promotion_epoch,
    pending_epoch,
    placement_fields,
    placement_from_status,
    switchover_from_status,
)
from engram_operator.kube.nodes import NodeMonitor
from engram_operator.model import Placement, SpaceSpec, SwitchoverProgress
from engram_operator.reconcile import FenceAndElect
from engram_operator.status import Condition, Phase

log = logging.getLogger("engram_operator.kube")

# A failover must be on record soon after the lease read that judged the primary dead: a sidecar
# whose Lease renewals resume vouches for its own write leases again only from a status read
# made after LEASE_DURATION (2 s) of renewals (the sidecar's lease/status agent), so a promotion
# recorded later than that could miss the read that should have deposed it. Half of it, for margin.
PROMOTION_DEADLINE: Final = 1.0
# Of that deadline, what the API writes after the fence round need (a GET and a PATCH to record
# the promotion, on a healthy API server tens of ms each): the fence round gets the rest.
RECORD_RESERVE: Final = 0.3


@dataclasses.dataclass
class SpaceState:
    """What the driver remembers about one space between ticks (rebuilt from status on start)."""

    placement: Placement | None = None
    switchover: SwitchoverProgress | None = None
    last_promotion_epoch: Epoch | None = None
    pending_epoch: Epoch | None = None  # a failover's epoch, recorded, nobody promoted yet
    placed_at: str | None = None
    placement_problem: str | None = None
    conditions: tuple[Condition, ...] = ()
    last_spec: SpaceSpec | None = None
    last_sentence: str = ""
    last_patch_gist: str = ""
    last_patch_at: float = -math.inf
    # The newEpoch of the lastPromotion whose entriesLost we wrote (until kopf's copy shows it).
    loss_measured_epoch: int | None = None
    # The newest resourceVersion we know from our own writes and reads (kopf's copy of the
    # object may lag behind our last write): every status write carries the newer of the two.
    resource_version: str | None = None


class StatusStore:
    """A `executor.SpaceStore` over the MemorySpace `namespace/space`."""

    def __init__(
        self,
        *,
        namespace: str,
        space: SpaceId,
        api: KubeApi,
        nodes: NodeMonitor,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.namespace = namespace
        self.space = space
        self.api = api
        self.nodes = nodes
        self.clock = clock
        self.wall = wall
        self.state = SpaceState()
        # Monotonic time of the Lease read the current tick decided on (the driver sets it).
        self.observed_at = 0.0

    # ---- what the executor reads and sets ----------------------------------------------------

    @property
    def placement(self) -> Placement | None:
        return self.state.placement

    @property
    def pending_epoch(self) -> Epoch | None:
        return self.state.pending_epoch

    @property
    def switchover(self) -> SwitchoverProgress | None:
        return self.state.switchover

    @switchover.setter
    def switchover(self, progress: SwitchoverProgress | None) -> None:
        # Written to status with the tick's status patch (it is not epoch-changing).
        self.state.switchover = progress

    def retryable(self, err: Exception) -> bool:
        return isinstance(err, KubeApiError)

    def fence_timeout(self, planned: float) -> float:
        """The promotion must still be on record within PROMOTION_DEADLINE of the lease read."""
        late = self.clock() - self.observed_at
        return max(0.05, min(planned, PROMOTION_DEADLINE - RECORD_RESERVE - late))

    # ---- status in ---------------------------------------------------------------------------

    def adopt(self, body: Mapping[str, Any]) -> None:
        """Take over what status records (at start, and when another writer moved it)."""
        status = body.get("status") or {}
        st = self.state
        st.placement = placement_from_status(status)
        st.switchover = switchover_from_status(status, now=self.clock(), wall=self.wall())
        st.last_promotion_epoch = last_promotion_epoch(status)
        st.pending_epoch = pending_epoch(status)
        placed = status.get("placedAt")
        st.placed_at = placed if isinstance(placed, str) else None
        st.conditions = tuple(
            Condition.from_dict(c) for c in status.get("conditions") or [] if isinstance(c, dict)
        )
        self.nodes.set_placement(self.space, st.placement)

    def follow(self, body: Mapping[str, Any]) -> None:
        """Adopt a placement at a higher epoch than ours: someone else recorded it."""
        seen = placement_from_status(body.get("status") or {})
        mine = self.state.placement
        if seen is not None and (mine is None or seen.epoch > mine.epoch):
            log.info("space %s: adopting epoch %d from status", self.space, seen.epoch)
            self.adopt(body)

    # ---- status out: the guarded writes ------------------------------------------------------

    async def record(
        self, placement: Placement, *, phase: Phase, promotion: DecisionRecord | None = None
    ) -> None:
        """Record `placement` in status before anyone acts on it (re-read first: see module).

        `phase` goes with it, so that status never shows the new primary under the old phase
        while the pushes that follow are in flight."""
        # A promotion's API calls get the rest of the deadline, no more (see PROMOTION_DEADLINE).
        bound = PROMOTION_DEADLINE if promotion is not None else None
        for attempt in (1, 2):
            self._check_deadline(promotion is not None)
            fresh = await self.api.get_space(self.namespace, self.space, timeout=bound)
            seen = placement_from_status(fresh.get("status") or {})
            if seen != self.state.placement:
                self.adopt(fresh)
                raise Superseded(
                    f"space {self.space}: status changed under us (now {seen}); deciding again"
                )
            placed_at = now_iso()
            patch: dict[str, object] = {
                **placement_fields(placement),
                "placedAt": placed_at,
                "phase": phase,
            }
            if promotion is not None:
                patch["lastPromotion"] = promotion_patch(promotion)
            version = (fresh.get("metadata") or {}).get("resourceVersion")
            self._check_deadline(promotion is not None)
            try:
                written = await self.api.patch_space_status(
                    self.namespace, self.space, patch, resource_version=version, timeout=bound
                )
            except KubeApiError as err:
                if err.conflict and attempt == 1:
                    continue  # the sidecar's members patch moved the version; read again
                raise
            st = self.state
            st.resource_version = _version(written) or st.resource_version
            st.placement = placement
            st.placed_at = placed_at
            if promotion is not None:
                st.last_promotion_epoch = placement.epoch
            if st.pending_epoch is not None and placement.epoch >= st.pending_epoch:
                st.pending_epoch = None
            self.nodes.set_placement(self.space, placement)
            return

    async def record_pending(self, plan: FenceAndElect) -> None:
        """Record a failover's epoch (a winnerless lastPromotion) before anyone is fenced at it,
        with the same guard as `record`: a restarted or peer operator reads it back and never
        hands that epoch to another winner."""
        for attempt in (1, 2):
            self._check_deadline(True)
            fresh = await self.api.get_space(self.namespace, self.space, timeout=PROMOTION_DEADLINE)
            status = fresh.get("status") or {}
            if placement_from_status(status) != self.state.placement:
                self.adopt(fresh)
                raise Superseded(f"space {self.space}: status changed under us; deciding again")
            recorded = pending_epoch(status)
            if recorded is not None and recorded > plan.epoch:
                self.state.pending_epoch = recorded
                raise Superseded(
                    f"space {self.space}: epoch {recorded} is already recorded for a failover;"
                    " deciding again"
                )
            version = (fresh.get("metadata") or {}).get("resourceVersion")
            self._check_deadline(True)
            try:
                written = await self.api.patch_space_status(
                    self.namespace,
                    self.space,
                    {"phase": "FailingOver", "lastPromotion": promotion_patch(plan.record)},
                    resource_version=version,
                    timeout=PROMOTION_DEADLINE,
                )
            except KubeApiError as err:
                if err.conflict and attempt == 1:
                    continue  # the sidecar's members patch moved the version; read again
                raise
            self.state.pending_epoch = plan.epoch
            self.state.resource_version = _version(written) or self.state.resource_version
            return

    def _check_deadline(self, promotion: bool) -> None:
        late = self.clock() - self.observed_at
        if promotion and late > PROMOTION_DEADLINE:
            raise Superseded(
                f"space {self.space}: promotion not recorded within {PROMOTION_DEADLINE:g} s"
                f" of the lease read it was based on ({late:.1f} s); deciding again"
            )


def promotion_patch(record: DecisionRecord) -> dict[str, object]:
    """status.lastPromotion for a new decision. A merge patch merges into the old record, so a
    field the new one lacks is cleared explicitly: the last failover's measured loss
    (`entriesLost`) must not stand for this one's."""
    return {"entriesLost": None, **record.to_dict()}


def _version(doc: Mapping[str, Any]) -> str | None:
    version = (doc.get("metadata") or {}).get("resourceVersion")
    return version if isinstance(version, str) and version else None
