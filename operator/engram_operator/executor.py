"""The one action executor: carries out a reconcile `Decision` for one space, action by action.

Local mode (`local.loop`) and the Kubernetes operator (`kube.driver`) both run this code, so the
order of effects can't drift apart between them again. They differ only in what they hand it:

* a `SpaceStore`: where placements, epochs and the switchover are recorded before anyone acts on
  them (`local.store`: cluster.json; `kube.store`: the MemorySpace's status);
* a `NodeDirectory`: where each node's sidecar listens, and the write-lease grant bookkeeping
  (`local.loop.ControlLoop`; `kube.nodes.NodeMonitor`);
* a `Narrator`: how outcomes are told (local mode's lines; Kubernetes Events, metrics and logs).

Sidecars are reached through `engram_contract.client.SidecarClient`, and every assignment is
built by `engram_contract.assignment.assignment_document`.

The safety rules it owns (design §4, issue 11), in the order the actions come:

* **The epoch is recorded before anyone acts on it.** `Place`, `Promote` and a handover's new
  placement go to the store before any sidecar hears of them; so does a failover's epoch
  (`FenceAndElect.record`, a winnerless decision) before the first member is fenced at it.
* **A failover fences every member at the new epoch, in parallel, then elects** among those that
  answered (`reconcile.conclude_failover`: a majority under `quorum`, every replica's answer
  under `one`, by (last epoch, last sequence)). `reconcile` plans it only once the old primary's
  write lease has run out from the last grant sent (`NodeDirectory.note_grant`).
* **An assignment that makes a node primary is a write-lease grant**: stamped, and remembered as
  sent before it is sent.
* **A handover gives the space back if anything fails** after its epoch is recorded and before
  the target leads: the old primary leads again at an epoch above the fence's, recorded like
  any other, so writes pause for at most the catch-up bound. Any error counts, not only the ones
  a sidecar call is expected to raise: a placement recorded and never acted on would later be
  sent to the target without the catch-up, cutting the old primary's last entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from engram_contract.assignment import Member, assignment_document
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_contract.kubernetes import NodeAddresses
from engram_operator.election import DecisionRecord, FenceAnswer
from engram_operator.model import Observation, Placement, SpaceSpec, SwitchoverProgress
from engram_operator.reconcile import (
    AbortSwitchover,
    BeginSwitchover,
    ClearSwitchover,
    Decision,
    ExecuteHandOver,
    FenceAndElect,
    Place,
    Promote,
    PushAssignment,
    Wait,
    conclude_failover,
)
from engram_operator.status import Phase
from engram_operator.switchover import AwaitCatchUp, Demote, Fence, HandOver, PromoteTarget

log = logging.getLogger("engram_operator.executor")

# How often to read the target's applied sequence while the old primary is fenced: writes are
# paused meanwhile, so poll fast (a view is one small GET on loopback or the pod network).
CATCH_UP_POLL: Final = 0.02
# Writes are paused until the give-back is on record: a store error is retried this many times.
GIVE_BACK_ATTEMPTS: Final = 3
GIVE_BACK_RETRY: Final = 0.2


class Superseded(Exception):
    """The store changed under us (another writer): adopt what it holds and decide again. The
    message says so; a driver ends the tick with it."""


class HandOverFailed(Exception):
    """A handover step failed; the message says which and why."""


class SpaceStore(Protocol):
    """Where one space's placement, epochs and switchover live, written before anyone acts."""

    @property
    def placement(self) -> Placement | None: ...

    @property
    def pending_epoch(self) -> Epoch | None:
        """A failover's epoch, recorded, with nobody promoted at it yet."""

    @property
    def switchover(self) -> SwitchoverProgress | None: ...

    @switchover.setter
    def switchover(self, progress: SwitchoverProgress | None) -> None: ...

    async def record(
        self, placement: Placement, *, phase: Phase, promotion: DecisionRecord | None = None
    ) -> None:
        """Make `placement` (and `promotion`, the decision that chose it) durable, with the
        phase the space is in. Raises `Superseded` when someone else wrote meanwhile."""

    async def record_pending(self, plan: FenceAndElect) -> None:
        """Make a failover's epoch durable (`plan.record`, no winner) before anyone is fenced at
        it, so that no restart hands that epoch to another winner."""

    def fence_timeout(self, planned: float) -> float:
        """How long a failover's fence round may take (at most `planned`), so that the
        promotion can still be recorded in time."""

    def retryable(self, err: Exception) -> bool:
        """Whether a failed `record` is worth trying again (an API blip, not a conflict)."""


class NodeDirectory(Protocol):
    """Where the nodes' sidecars listen, and when each was last sent a write-lease grant."""

    def addresses(self) -> Mapping[str, NodeAddresses]: ...

    def stamp(self) -> tuple[int, float]:
        """(the monotonic ns a grant carries, the control plane's clock reading for it)."""

    def note_grant(self, node: NodeName, space: SpaceId, sent: float) -> None:
        """`node` was sent a write-lease grant for `space` at `sent` (it may arrive, or not)."""

    def note_view(self, node: NodeName, space: SpaceId, view: Mapping[str, Any]) -> None:
        """`node` answered an assignment with this view of `space` (fresher than its last
        report)."""


class Narrator(Protocol):
    """How a driver tells what was done: Events and metrics on Kubernetes, lines locally."""

    def placed(self, old: Placement | None, new: Placement, message: str, *, short: bool) -> None:
        """`new` was recorded (`short`: fewer replicas than asked for; `message` says why)."""

    def fencing(self, record: DecisionRecord) -> None:
        """A failover's epoch was recorded; every member is being fenced at it."""

    def promoted(self, record: DecisionRecord) -> None: ...

    def blocked(self, reason: str, record: DecisionRecord) -> None:
        """A failover found no winner."""

    def switchover_started(self, sentence: str) -> None: ...

    def switchover_stopped(self, reason: str) -> None:
        """The switchover was refused, or aborted before anything was fenced."""

    def switchover_cleared(self, reason: str) -> None:
        """The switchover completed, or the user withdrew it."""

    def switched_over(self, placement: Placement, message: str) -> None: ...

    def handover_aborted(self, message: str) -> None:
        """A handover step failed; the old primary leads again."""


class Executor:
    """Runs one space's decisions against its store, its nodes' sidecars and its narrator."""

    def __init__(
        self,
        *,
        space: SpaceId,
        store: SpaceStore,
        nodes: NodeDirectory,
        sidecars: SidecarClient,
        narrator: Narrator,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.space = space
        self.store = store
        self.nodes = nodes
        self.sidecars = sidecars
        self.narrator = narrator
        self.clock = clock
        # The life of the space (its MemorySpace uid; None in local mode): carried in every
        # assignment and fence, so a node still holding an earlier space of the same name is
        # neither taken for a member of this one nor elected with its log.
        self.incarnation: str | None = None

    async def run(
        self, decision: Decision, spec: SpaceSpec, now: float, obs: Observation | None
    ) -> Decision:
        """Run the actions in order; returns the decision carried out (a fence round's
        conclusion replaces the decision that planned it)."""
        store, say = self.store, self.narrator
        for action in decision.actions:
            match action:
                case FenceAndElect() if obs is not None:
                    concluded = await self.fence_and_elect(action, obs)
                    return await self.run(concluded, spec, now, obs)
                case Place(placement=p, message=message):
                    old = store.placement
                    await store.record(p, phase="Placing")
                    say.placed(old, p, message, short=len(p.replicas) < spec.replicas)
                case Promote(record=record, placement=p):
                    await store.record(p, phase="FailingOver", promotion=record)
                    say.promoted(record)
                case PushAssignment(placement=p, nodes=nodes):
                    await self.push(p, nodes, spec)
                case BeginSwitchover(target=target):
                    store.switchover = SwitchoverProgress(target=target, started_at=now)
                    say.switchover_started(decision.sentence)
                case AbortSwitchover(target=target, reason=why):
                    began = store.switchover.started_at if store.switchover else now
                    store.switchover = SwitchoverProgress(
                        target=target, started_at=began, aborted_at=now, abort_reason=why
                    )
                    say.switchover_stopped(why)
                case ClearSwitchover(reason=why):
                    store.switchover = None
                    say.switchover_cleared(why)
                case ExecuteHandOver(plan=plan):
                    await self.hand_over(plan, spec)
                case Wait(record=record) if record is not None:
                    say.blocked(action.reason, record)
                case _:
                    pass
        return decision

    # ---- failover ---------------------------------------------------------------------------

    async def fence_and_elect(self, plan: FenceAndElect, obs: Observation) -> Decision:
        """Phase one of a failover: record the epoch (unless this retry already did), fence
        every member at it in parallel, and let `reconcile.conclude_failover` decide."""
        if self.store.pending_epoch != plan.epoch:
            await self.store.record_pending(plan)
            self.narrator.fencing(plan.record)
        timeout = self.store.fence_timeout(plan.timeout)
        addresses = self.nodes.addresses()

        async def one(node: NodeName) -> FenceAnswer:
            where = addresses.get(node)
            if where is None:
                return FenceAnswer(node=node, ok=False, error="no address known")
            try:
                answer = await self.sidecars.fence(
                    where["http"],
                    self.space,
                    plan.epoch,
                    timeout=timeout,
                    incarnation=self.incarnation,
                )
                return FenceAnswer(
                    node=node,
                    ok=True,
                    last_epoch=Epoch(int(answer.get("last_epoch") or 0)),
                    last_sequence=Sequence(int(answer.get("last_sequence") or 0)),
                )
            except Exception as err:  # whatever went wrong, it did not answer
                # Safe either way: only members that answered vote, and under `quorum` a
                # majority must have. A member that took the epoch without answering just
                # refuses the old primary, which is what the fence is for.
                return FenceAnswer(node=node, ok=False, error=_text(err)[:200])

        answers = await asyncio.gather(*(one(n) for n in plan.nodes))
        return conclude_failover(obs, plan, answers)

    # ---- assignments ------------------------------------------------------------------------

    async def push(
        self, placement: Placement, nodes: tuple[NodeName, ...], spec: SpaceSpec
    ) -> set[NodeName]:
        """PUT the assignment of `placement` to `nodes`; returns the nodes that did not take it."""
        addresses = self.nodes.addresses()
        if placement.primary not in addresses:
            log.warning(
                "space %s: no address for primary %s; cannot push", self.space, placement.primary
            )
            return set(nodes)
        # A member without a known address (its Lease is gone) can't be reached either way;
        # leaving it out lets the rest of the space run.
        members = [
            Member(m, addresses[m]["address"], addresses[m]["http"])
            for m in placement.members
            if m in addresses
        ]
        doc = assignment_document(
            int(placement.epoch),
            members,
            ack_policy=spec.ack_policy,
            compression=spec.compression,
            tuning=spec.tuning,
            incarnation=self.incarnation,
        )
        # An assignment that makes a node primary grants its write lease: stamped, and
        # remembered as sent before it is (the failover's lease wait starts from it).
        stamp, sent = self.nodes.stamp()
        if placement.primary in nodes:
            self.nodes.note_grant(placement.primary, self.space, sent)

        async def one(node: NodeName) -> NodeName | None:
            where = addresses.get(node)
            if where is None:
                return node
            try:
                view = await self.sidecars.assign(
                    where["http"], self.space, doc, sent_mono_ns=stamp
                )
            except SidecarError as err:
                level = logging.INFO if err.status in (0, 409) else logging.WARNING
                log.log(level, "space %s: assignment to %s failed: %s", self.space, node, err)
                return node
            self.nodes.note_view(node, self.space, view)
            return None

        failed = await asyncio.gather(*(one(n) for n in nodes))
        return {n for n in failed if n is not None}

    # ---- switchover -------------------------------------------------------------------------

    async def hand_over(self, plan: HandOver, spec: SpaceSpec) -> None:
        """A switchover's steps (see `switchover`). The old primary answers the fence only once
        it has stopped acknowledging, so the target may lead as soon as it holds the old
        primary's final entry: no write-lease wait, no majority needed."""
        old, new, space = self.store.placement, plan.placement, self.space
        if old is None:
            return
        await self.store.record(new, phase="SwitchingOver")  # before anyone acts on it
        final = 0
        try:
            for step in plan.steps:
                if isinstance(step, Fence):
                    answer = await self.sidecars.fence(
                        self._http(step.node), space, step.epoch, incarnation=self.incarnation
                    )
                    try:
                        final = int(answer.get("last_sequence") or 0)
                    except (TypeError, ValueError, OverflowError) as err:
                        raise HandOverFailed(
                            f"{step.node} answered the fence with {answer}"
                        ) from err
                elif isinstance(step, AwaitCatchUp):
                    await self._await_catch_up(step.node, max(final, step.sequence), step.timeout)
                elif isinstance(step, PromoteTarget):
                    if await self.push(new, (step.node,), spec):
                        raise HandOverFailed(f"{step.node} did not take the primary role")
                elif isinstance(step, Demote):
                    # A replica that missed it is re-sent its role by a later tick.
                    await self.push(new, (step.node,), spec)
        except Exception as err:  # any failure here must give the space back
            if not isinstance(err, SidecarError | HandOverFailed):
                log.warning("space %s: handover step failed", space, exc_info=True)
            await self._give_back(old, new, _text(err), spec)
            return
        await self.push(new, new.members, spec)
        self.narrator.switched_over(
            new,
            f"switched space {space} over to {new.primary} at epoch {new.epoch} (zero loss:"
            f" {new.primary} held sequence {final} before taking writes)",
        )

    def _http(self, node: NodeName) -> str:
        where = self.nodes.addresses().get(node)
        if where is None:
            raise HandOverFailed(f"no address known for {node}")
        return where["http"]

    async def _await_catch_up(self, node: NodeName, wanted: int, timeout: float) -> None:
        http = self._http(node)
        deadline = self.clock() + timeout
        applied = -1
        while self.clock() < deadline:
            with contextlib.suppress(SidecarError, ValueError, TypeError):
                view = await self.sidecars.space_view(http, self.space)
                applied = int(view.get("applied_sequence", -1))
            if applied >= wanted:
                return
            await asyncio.sleep(CATCH_UP_POLL)
        raise HandOverFailed(
            f"{node} did not reach sequence {wanted} within {timeout:g} s (applied {applied})"
        )

    async def _give_back(self, old: Placement, new: Placement, why: str, spec: SpaceSpec) -> None:
        """The old primary leads again, at an epoch above the fence's."""
        back = Placement(primary=old.primary, replicas=old.replicas, epoch=Epoch(new.epoch + 1))
        # Writes are paused until this is on record, so a store error is retried. If it still
        # fails, the next tick finds the target recorded as primary and sends it its role
        # without the catch-up: the old primary's last entries could then be cut.
        for attempt in range(1, GIVE_BACK_ATTEMPTS + 1):
            try:
                await self.store.record(back, phase="SwitchingOver")
                break
            except Exception as err:
                if attempt == GIVE_BACK_ATTEMPTS or not self.store.retryable(err):
                    raise
                await asyncio.sleep(GIVE_BACK_RETRY)
        await self.push(back, back.members, spec)
        reason = (
            f"switchover of space {self.space} to {new.primary} aborted: {why};"
            f" {old.primary} leads again at epoch {back.epoch}"
        )
        now = self.clock()
        progress = self.store.switchover
        self.store.switchover = SwitchoverProgress(
            target=new.primary,
            started_at=progress.started_at if progress else now,
            aborted_at=now,
            abort_reason=reason,
        )
        self.narrator.handover_aborted(reason)


def _text(err: Exception) -> str:
    """An error as a status message: a sidecar's own words, else its type too."""
    if isinstance(err, SidecarError | HandOverFailed):
        return str(err)
    return f"{type(err).__name__}: {err}"
