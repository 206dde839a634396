"""The Kubernetes driver of the reconcile core: one space's tick, from its object to API writes.

Owns, for one MemorySpace, what `local.ControlLoop` owns for the local cluster: building the
`Observation` (spec, status, node verdicts and reports from `NodeMonitor`), running the pure
`reconcile` tick, and executing its actions in order — `Place`/`Promote`/`ExecuteHandOver` patch
status (the epoch is recorded before anyone acts on it), `PushAssignment` PUTs the assignment
built by `contract.assignment_from_status` to each sidecar — then writing the operator's part of
status, posting Events, and logging the tick's sentence when its gist changes.

Epoch-changing writes re-read the object first and carry its resourceVersion, so a write based on
a stale view (another operator wrote since) is refused instead of applied; the tick then adopts
what it read and decides again.

A failover's fence round (`FenceAndElect`) records its epoch as a winnerless `lastPromotion`
(the same guarded write), fences every member in parallel, and acts on
`reconcile.conclude_failover`'s answer in the same tick.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from engram_contract.assignment import assignment_from_status
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_contract.kubernetes import API_GROUP, API_VERSION, KIND
from engram_operator import reconcile as rc
from engram_operator.election import FenceAnswer
from engram_operator.kube_api import EVENT_MESSAGE_LIMIT, KubeApi, KubeApiError, ObjectRef, now_iso
from engram_operator.kube_handover import hand_over
from engram_operator.kube_metrics import OperatorMetrics
from engram_operator.kube_model import (
    SpaceState,
    event_message,
    gist,
    last_promotion_epoch,
    parse_spec,
    pending_epoch,
    placement_fields,
    placement_from_status,
    switchover_from_status,
)
from engram_operator.kube_nodes import NodeMonitor
from engram_operator.kube_status import fingerprint, status_update
from engram_operator.model import MemberReport, Placement, SpaceSpec, SwitchoverProgress
from engram_operator.status import Condition
from engram_operator.verdict import Verdict

log = logging.getLogger("engram_operator.kube")

# Status is patched at once when anything but numbers changed; a change of numbers only (lease
# ages, lag in the message) waits this long, so a steady space costs one write per 5 s at most.
STATUS_REFRESH: Final = 5.0
# A failover must be on record soon after the lease read that judged the primary dead: a sidecar
# whose Lease renewals resume vouches for its own write leases again only from a status read
# made after LEASE_DURATION (2 s) of renewals (engram_sidecar.kube), so a promotion recorded
# later than that could miss the read that should have deposed it. Half of it, for margin.
PROMOTION_DEADLINE: Final = 1.0
# Of that deadline, what the API writes after the fence round need (a GET and a PATCH to record
# the promotion, on a healthy API server tens of ms each): the fence round gets the rest.
RECORD_RESERVE: Final = 0.3


class Superseded(Exception):
    """Status changed under us (another writer): adopt what was read and decide again."""


class SpaceDriver:
    """Reconciles one MemorySpace; `tick()` is called once per node refresh by its daemon."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        api: KubeApi,
        sidecars: SidecarClient,
        nodes: NodeMonitor,
        metrics: OperatorMetrics,
        settings: rc.Settings = rc.DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.namespace = namespace
        self.space = SpaceId(name)
        self.api = api
        self.sidecars = sidecars
        self.nodes = nodes
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.state = SpaceState()
        self.observed_at = 0.0  # monotonic time of the lease read this tick decided on
        self.ref = ObjectRef(
            kind=KIND, api_version=f"{API_GROUP}/{API_VERSION}", namespace=namespace, name=name
        )

    # ---- state from status ----------------------------------------------------------------

    def adopt(self, body: Mapping[str, Any]) -> None:
        """Take over what status records (at start, and when another writer moved it)."""
        status = body.get("status") or {}
        uid = (body.get("metadata") or {}).get("uid")
        if isinstance(uid, str):
            self.ref = dataclasses.replace(self.ref, uid=uid)
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

    def _follow(self, status: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        """Adopt a placement at a higher epoch than ours: someone else recorded it."""
        seen = placement_from_status(status)
        mine = self.state.placement
        if seen is not None and (mine is None or seen.epoch > mine.epoch):
            log.info("space %s: adopting epoch %d from status", self.space, seen.epoch)
            self.adopt(body)
            self.nodes.set_placement(self.space, self.state.placement)

    # ---- one tick -------------------------------------------------------------------------

    async def tick(self, body: Mapping[str, Any]) -> str:
        """One reconcile tick; returns its sentence. API and sidecar errors end the tick only."""
        started = time.perf_counter()
        try:
            sentence = await self._tick(copy.deepcopy(dict(body)))
        except Superseded as why:
            sentence = str(why)
        except (KubeApiError, SidecarError) as err:
            self.metrics.reconcile_errors.inc()
            sentence = f"space {self.space}: tick failed, retrying: {err}"
            log.warning("%s", sentence)
        finally:
            self.metrics.decision_duration.observe(time.perf_counter() - started)
        return sentence

    async def _tick(self, body: dict[str, Any]) -> str:
        spec_raw: dict[str, Any] = body.get("spec") or {}
        status_raw: dict[str, Any] = body.get("status") or {}
        self._follow(status_raw, body)
        parsed = parse_spec(spec_raw)
        if parsed.problem:
            self._announce("InvalidSpec", "Warning", f"{parsed.problem}; fix the MemorySpace spec")
        spec = parsed.spec or self.state.last_spec
        self.state.last_spec = spec
        if parsed.spec is not None:
            self.state.wire = parsed.wire
        now = self.clock()
        self.observed_at = self.nodes.store.last_read_ok_at or now
        verdicts = self.nodes.verdicts(now)
        reports = self.nodes.reports(self.space)
        if spec is None:
            sentence = f"holding space {self.space}: {parsed.problem}"
            decision = rc.Decision(actions=(rc.Wait(reason=sentence),), sentence=sentence)
        else:
            decision, obs = self._decide(spec, verdicts, reports, now)
            decision = await self._execute(decision, spec, now, obs)
        await self._write_status(
            spec or SpaceSpec(),
            body,
            decision,
            verdicts=verdicts,
            reports=reports,
            now=now,
            problem=parsed.problem,
        )
        await self._post_events()
        return self._say(decision.sentence)

    def _decide(
        self,
        spec: SpaceSpec,
        verdicts: Mapping[NodeName, Verdict],
        reports: Mapping[NodeName, MemberReport],
        now: float,
    ) -> tuple[rc.Decision, rc.Observation | None]:
        hold = self.nodes.unsettled(now) if self.state.placement is None else None
        if hold is not None and not spec.paused:
            return rc.Decision(actions=(rc.Wait(reason=hold),), sentence=hold), None
        obs = rc.Observation(
            space=self.space,
            spec=spec,
            placement=self.state.placement,
            nodes=self.nodes.infos(),
            verdicts=verdicts,
            reports=reports,
            switchover=self.state.switchover,
            primary_load=self.nodes.primary_load(),
            last_promotion_epoch=self.state.last_promotion_epoch,
            lease_grants=self.nodes.lease_grants(self.space),
            pending_epoch=self.state.pending_epoch,
        )
        return rc.reconcile(obs, now=now, settings=self.settings), obs

    def _say(self, sentence: str) -> str:
        # Say a sentence when its gist changes, not when only its numbers tick along.
        steady = sentence.startswith(f"space {self.space} is steady")
        if gist(sentence) != gist(self.state.last_sentence) and not steady:
            log.info("%s", sentence)
        self.state.last_sentence = sentence
        return sentence

    # ---- actions --------------------------------------------------------------------------

    async def _execute(
        self, decision: rc.Decision, spec: SpaceSpec, now: float, obs: rc.Observation | None
    ) -> rc.Decision:
        """Run the actions in order; returns the decision carried out (a fence round's
        conclusion replaces the decision that planned it)."""
        st = self.state
        for action in decision.actions:
            match action:
                case rc.FenceAndElect() if obs is not None:
                    concluded = await self._fence_and_elect(action, obs)
                    return await self._execute(concluded, spec, now, obs)
                case rc.Place(placement=p, message=message):
                    await self._place(p, message, spec)
                case rc.Promote(record=record, placement=p):
                    await self.record(p, phase="FailingOver", promotion=dict(record.to_dict()))
                    self.metrics.promotions.labels(space=self.space).inc()
                    log.warning("space %s: %s", self.space, record.summary)
                    self.event(
                        "Warning",
                        "Promoted",
                        event_message(record.summary, record.to_dict(), EVENT_MESSAGE_LIMIT),
                    )
                case rc.PushAssignment(placement=p, nodes=nodes):
                    await self.push(p, nodes)
                case rc.BeginSwitchover(target=target):
                    st.switchover = SwitchoverProgress(target=target, started_at=now)
                    self.event("Normal", "SwitchoverStarted", decision.sentence)
                case rc.AbortSwitchover(target=target, reason=why):
                    began = st.switchover.started_at if st.switchover else now
                    st.switchover = SwitchoverProgress(
                        target=target, started_at=began, aborted_at=now, abort_reason=why
                    )
                    reason = (
                        "TargetPrimaryRefused" if why.startswith("cannot") else "SwitchoverAborted"
                    )
                    self._announce(reason, "Warning", why)
                case rc.ClearSwitchover(reason=why):
                    st.switchover = None
                    if "withdrawn" in why:
                        self.event("Normal", "SwitchoverWithdrawn", why)
                case rc.ExecuteHandOver(plan=plan):
                    await hand_over(self, plan)
                case rc.Wait(record=record) if record is not None:
                    self._announce("FailoverBlocked", "Warning", action.reason)
                case _:
                    pass
        return decision

    async def _fence_and_elect(self, plan: rc.FenceAndElect, obs: rc.Observation) -> rc.Decision:
        """Phase one of a failover: record the epoch (unless this retry already did), fence
        every member at it in parallel, and let `reconcile.conclude_failover` decide."""
        if self.state.pending_epoch != plan.epoch:
            await self.record_pending(plan)
        late = self.clock() - self.observed_at
        # The promotion must still be on record within PROMOTION_DEADLINE of the lease read.
        timeout = max(0.05, min(plan.timeout, PROMOTION_DEADLINE - RECORD_RESERVE - late))
        addresses = self.nodes.addresses()

        async def one(node: NodeName) -> FenceAnswer:
            if node not in addresses:
                return FenceAnswer(node=node, ok=False, error="no address (its Lease is gone)")
            http = addresses[node]["http"]
            try:
                answer = await self.sidecars.fence(http, self.space, plan.epoch, timeout=timeout)
                return FenceAnswer(
                    node=node,
                    ok=True,
                    last_epoch=Epoch(int(answer.get("last_epoch") or 0)),
                    last_sequence=Sequence(int(answer.get("last_sequence") or 0)),
                )
            except (SidecarError, TypeError, ValueError) as err:
                return FenceAnswer(node=node, ok=False, error=str(err)[:200])

        answers = await asyncio.gather(*(one(n) for n in plan.nodes))
        return rc.conclude_failover(obs, plan, answers)

    async def record_pending(self, plan: rc.FenceAndElect) -> None:
        """Record a failover's epoch (a winnerless lastPromotion) before anyone is fenced at it,
        with the same guard as `record`: a restarted or peer operator reads it back and never
        hands that epoch to another winner."""
        for attempt in (1, 2):
            self._check_deadline(True)
            fresh = await self.api.get_space(self.namespace, self.space, timeout=PROMOTION_DEADLINE)
            status = fresh.get("status") or {}
            if placement_from_status(status) != self.state.placement:
                self.adopt(fresh)
                self.nodes.set_placement(self.space, self.state.placement)
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
                await self.api.patch_space_status(
                    self.namespace,
                    self.space,
                    {"phase": "FailingOver", "lastPromotion": dict(plan.record.to_dict())},
                    resource_version=version,
                    timeout=PROMOTION_DEADLINE,
                )
            except KubeApiError as err:
                if err.conflict and attempt == 1:
                    continue  # the sidecar's members patch moved the version; read again
                raise
            self.state.pending_epoch = plan.epoch
            log.warning("space %s: %s", self.space, plan.record.summary)
            return

    async def _place(self, placement: Placement, message: str, spec: SpaceSpec) -> None:
        old = self.state.placement
        await self.record(placement, phase="Placing")
        short = len(placement.replicas) < spec.replicas
        self.state.placement_problem = message if short else None
        if old is None:
            self.event("Normal", "Placed", message)
        elif old.members == placement.members and placement.epoch > old.epoch:
            # The same members at a new epoch: a split brain fenced, or the primary re-asserted
            # after a promotion that found no majority (reconcile's sentence says which).
            split = message.startswith("split brain")
            self.event("Warning", "SplitBrain" if split else "PrimaryReasserted", message)
        else:
            self.event("Normal", "PlacementChanged", message)
        if short:
            self._announce("UnderReplicated", "Warning", message)

    async def record(
        self,
        placement: Placement,
        *,
        phase: str,
        promotion: Mapping[str, object] | None = None,
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
                self.nodes.set_placement(self.space, self.state.placement)
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
                patch["lastPromotion"] = dict(promotion)
            version = (fresh.get("metadata") or {}).get("resourceVersion")
            self._check_deadline(promotion is not None)
            try:
                await self.api.patch_space_status(
                    self.namespace, self.space, patch, resource_version=version, timeout=bound
                )
            except KubeApiError as err:
                if err.conflict and attempt == 1:
                    continue  # the sidecar's members patch moved the version; read again
                raise
            self.state.placement = placement
            self.state.placed_at = placed_at
            if promotion is not None:
                self.state.last_promotion_epoch = placement.epoch
            pending = self.state.pending_epoch
            if pending is not None and placement.epoch >= pending:
                self.state.pending_epoch = None
            self.nodes.set_placement(self.space, placement)
            return

    def _check_deadline(self, promotion: bool) -> None:
        late = self.clock() - self.observed_at
        if promotion and late > PROMOTION_DEADLINE:
            raise Superseded(
                f"space {self.space}: promotion not recorded within {PROMOTION_DEADLINE:g} s"
                f" of the lease read it was based on ({late:.1f} s); deciding again"
            )

    async def push(self, placement: Placement, nodes: tuple[NodeName, ...]) -> set[NodeName]:
        """PUT the assignment of `placement` to `nodes`; returns the nodes that did not take it."""
        addresses = self.nodes.addresses()
        # A member without a known address (its Lease is gone) can't be reached either way;
        # leaving it out lets the rest of the space run.
        status = {
            **placement_fields(placement),
            "replicas": [r for r in placement.replicas if r in addresses],
        }
        doc = assignment_from_status(status, self.state.wire, addresses)
        if doc is None:
            log.warning(
                "space %s: no address for primary %s; cannot push", self.space, placement.primary
            )
            return set(nodes)

        # An assignment that makes a node primary grants its write lease: stamped, remembered.
        stamp, sent = self.nodes.stamp()
        if placement.primary in nodes and placement.primary in addresses:
            self.nodes.note_grant(placement.primary, self.space, sent)

        async def one(node: NodeName) -> NodeName | None:
            if node not in addresses:
                return node
            try:
                view = await self.sidecars.assign(
                    addresses[node]["http"], self.space, doc, sent_mono_ns=stamp
                )
            except SidecarError as err:
                level = logging.INFO if err.status in (0, 409) else logging.WARNING
                log.log(level, "space %s: assignment to %s failed: %s", self.space, node, err)
                return node
            self.nodes.note_view(node, self.space, view)
            return None

        failed = await asyncio.gather(*(one(n) for n in nodes))
        return {n for n in failed if n is not None}

    # ---- status and events ----------------------------------------------------------------

    async def _write_status(
        self,
        spec: SpaceSpec,
        body: Mapping[str, Any],
        decision: rc.Decision,
        *,
        verdicts: Mapping[NodeName, Verdict],
        reports: Mapping[NodeName, MemberReport],
        now: float,
        problem: str | None,
    ) -> None:
        st = self.state
        update = status_update(
            space=self.space,
            spec=spec,
            placement=st.placement,
            placement_problem=st.placement_problem,
            switchover=st.switchover,
            placed_at=st.placed_at,
            previous=st.conditions,
            operation=decision.operation,
            sentence=decision.sentence,
            verdicts=verdicts,
            reports=reports,
            generation=(body.get("metadata") or {}).get("generation"),
            problem=problem,
            now=now,
            wall=self.wall(),
            now_iso=now_iso(),
        )
        if update.under_replicated:
            self._announce("UnderReplicated", "Warning", update.under_replicated)
        text = fingerprint(update.patch)
        if text == st.last_patch_gist and now - st.last_patch_at < STATUS_REFRESH:
            return
        await self.api.patch_space_status(self.namespace, self.space, update.patch)
        st.conditions = update.conditions
        st.last_patch_gist, st.last_patch_at = text, now

    def event(self, type_: str, reason: str, message: str) -> None:
        self.state.pending_events.append((type_, reason, message))

    def _announce(self, key: str, type_: str, message: str) -> None:
        """An Event for a standing problem: posted again only when its gist changes."""
        if self.state.announced.get(key) != gist(message):
            self.state.announced[key] = gist(message)
            self.event(type_, key, message)

    async def _post_events(self) -> None:
        pending, self.state.pending_events = self.state.pending_events, []
        for type_, reason, message in pending:
            try:
                await self.api.post_event(self.ref, type_=type_, reason=reason, message=message)
            except KubeApiError as err:
                log.warning("space %s: cannot post %s event: %s", self.space, reason, err)
