"""The Kubernetes driver of the reconcile core: one space's tick, from its object to API writes.

Owns, for one MemorySpace, what `local.loop.ControlLoop` owns for the local cluster: building the
`Observation` (spec, status, node verdicts and reports from `NodeMonitor`), running the pure
`reconcile` tick, handing its decision to the shared `executor.Executor` (the same code local mode
runs) over a `store.StatusStore`, then writing the operator's part of status, posting Events, and
logging the tick's sentence when its gist changes. It is the executor's `Narrator` on Kubernetes:
what the executor did becomes Events, metrics and log lines here.

Epoch-changing writes re-read the object first and carry its resourceVersion (`store`), so a write
based on a stale view (another operator wrote since) is refused instead of applied; the tick then
adopts what it read and decides again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from engram_contract.assignment import valid_incarnation
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_contract.kubernetes import API_GROUP, API_VERSION, KIND
from engram_operator import reconcile as rc
from engram_operator.election import DecisionRecord
from engram_operator.executor import Executor, Superseded
from engram_operator.kube.api import EVENT_MESSAGE_LIMIT, KubeApi, KubeApiError, ObjectRef, now_iso
from engram_operator.kube.convert import event_message, parse_spec
from engram_operator.kube.metrics import OperatorMetrics
from engram_operator.kube.nodes import NodeMonitor
from engram_operator.kube.status_patch import fingerprint, holds, newest_version, status_update
from engram_operator.kube.store import SpaceState, StatusStore
from engram_operator.losses import measure_losses
from engram_operator.model import MemberReport, Placement, SpaceSpec
from engram_operator.verdict import Verdict

log = logging.getLogger("engram_operator.kube")


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
        self.nodes = nodes
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.store = StatusStore(
            namespace=namespace, space=self.space, api=api, nodes=nodes, clock=clock, wall=wall
        )
        self.executor = Executor(
            space=self.space,
            store=self.store,
            nodes=nodes,
            sidecars=sidecars,
            narrator=self,
            clock=clock,
        )
        self.ref = ObjectRef(
            kind=KIND, api_version=f"{API_GROUP}/{API_VERSION}", namespace=namespace, name=name
        )
        self.announced: dict[str, str] = {}
        self.pending_events: list[tuple[str, str, str]] = []
        # Did the last tick end steady, with status written as decided? (kube/cadence.py: only
        # then may the next ticks be skipped while nothing changes.)
        self.settled = False
        self._status_current = False

    @property
    def state(self) -> SpaceState:
        return self.store.state

    def adopt(self, body: Mapping[str, Any]) -> None:
        """Take over what status records (at start, and when another writer moved it)."""
        uid = (body.get("metadata") or {}).get("uid")
        if isinstance(uid, str):
            self.ref = dataclasses.replace(self.ref, uid=uid)
            self.executor.incarnation = uid if valid_incarnation(uid) else None
        self.store.adopt(body)

    # ---- one tick -------------------------------------------------------------------------

    async def tick(self, body: Mapping[str, Any]) -> str:
        """One reconcile tick; returns its sentence. API and sidecar errors end the tick only."""
        started = time.perf_counter()
        self.settled = False
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
        self.store.follow(body)
        parsed = parse_spec(spec_raw)
        if parsed.problem:
            self._announce("InvalidSpec", "Warning", f"{parsed.problem}; fix the MemorySpace spec")
        spec = parsed.spec or self.state.last_spec
        self.state.last_spec = spec
        now = self.clock()
        self.store.observed_at = self.nodes.store.last_read_ok_at or now
        verdicts = self.nodes.verdicts(now)
        reports = self.nodes.reports(self.space, self.executor.incarnation)
        if spec is None:
            sentence = f"holding space {self.space}: {parsed.problem}"
            decision = rc.Decision(actions=(rc.Wait(reason=sentence),), sentence=sentence)
        else:
            decision, obs = self._decide(spec, verdicts, reports, now)
            decision = await self.executor.run(decision, spec, now, obs)
        await self._measure_loss(body)
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
        said = self._say(decision.sentence)
        self.settled = self._status_current and said.startswith(f"space {self.space} is steady")
        return said

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
        if rc.gist(sentence) != rc.gist(self.state.last_sentence) and not steady:
            log.info("%s", sentence)
        self.state.last_sentence = sentence
        return sentence

    # ---- the executor's narrator: what it did, as Events, metrics and log lines ---------------

    def placed(self, old: Placement | None, new: Placement, message: str, *, short: bool) -> None:
        self.state.placement_problem = message if short else None
        if old is None:
            self.event("Normal", "Placed", message)
        elif old.members == new.members and new.epoch > old.epoch:
            # The same members at a new epoch: a split brain fenced, or the primary re-asserted
            # after a promotion that found no majority (reconcile's sentence says which).
            split = message.startswith("split brain")
            self.event("Warning", "SplitBrain" if split else "PrimaryReasserted", message)
        else:
            self.event("Normal", "PlacementChanged", message)
        if short:
            self._announce("UnderReplicated", "Warning", message)

    def fencing(self, record: DecisionRecord) -> None:
        log.warning("space %s: %s", self.space, record.summary)

    def promoted(self, record: DecisionRecord) -> None:
        self.metrics.promotions.labels(space=self.space).inc()
        log.warning("space %s: %s", self.space, record.summary)
        self.event(
            "Warning",
            "Promoted",
            event_message(record.summary, record.to_dict(), EVENT_MESSAGE_LIMIT),
        )

    def blocked(self, reason: str, record: DecisionRecord) -> None:
        self._announce("FailoverBlocked", "Warning", reason)

    def switchover_started(self, sentence: str) -> None:
        self.event("Normal", "SwitchoverStarted", sentence)

    def switchover_stopped(self, reason: str) -> None:
        key = "TargetPrimaryRefused" if reason.startswith("cannot") else "SwitchoverAborted"
        self._announce(key, "Warning", reason)

    def switchover_cleared(self, reason: str) -> None:
        if "withdrawn" in reason:
            self.event("Normal", "SwitchoverWithdrawn", reason)

    def switched_over(self, placement: Placement, message: str) -> None:
        self.metrics.promotions.labels(space=self.space).inc()
        log.info("%s", message)
        self.event("Normal", "SwitchedOver", message)

    def handover_aborted(self, message: str) -> None:
        log.warning("%s", message)
        self.event("Warning", "SwitchoverAborted", message)

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
        self._status_current = False
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
        if text == st.last_patch_gist:
            self._status_current = True
            return  # nothing but numbers in prose changed: not worth a write
        if not st.last_patch_gist and text == fingerprint(holds(body, update.patch)):
            # The object already says this (an operator restart, a peer's takeover).
            st.conditions = update.conditions
            st.last_patch_gist, st.last_patch_at = text, now
            self._status_current = True
            return
        version = newest_version(st.resource_version, _version(body))
        try:
            doc = await self.api.patch_space_status(
                self.namespace, self.space, update.patch, resource_version=version
            )
        except KubeApiError as err:
            if not err.conflict:
                raise
            # Someone wrote since the version we hold (a sidecar's member report, or another
            # operator replica): read it again and decide again on it next tick, rather than
            # write over what we haven't seen (an older epoch, say).
            self.metrics.status_writes.labels("conflict").inc()
            fresh = await self.api.get_space(self.namespace, self.space)
            st.resource_version = _version(fresh)
            self.store.follow(fresh)
            return
        self.metrics.status_writes.labels("written").inc()
        st.resource_version = _version(doc) or st.resource_version
        st.conditions = update.conditions
        st.last_patch_gist, st.last_patch_at = text, now
        self._status_current = True

    async def _measure_loss(self, body: Mapping[str, Any]) -> None:
        """Complete status.lastPromotion with `entriesLost` once the old primary has rejoined
        (engram_operator.losses, as local mode does). Written on its own, guarded by the version
        of the object it was measured on: a newer promotion recorded since is never credited
        with this one's loss."""
        record = (body.get("status") or {}).get("lastPromotion")
        if not isinstance(record, dict) or record.get("entriesLost") is not None:
            return
        epoch = record.get("newEpoch")
        if not isinstance(epoch, int) or epoch == self.state.loss_measured_epoch:
            return
        if self.state.last_promotion_epoch != epoch:
            return  # status shows an older promotion than ours: kopf's copy is behind
        views = {
            str(node): dict((doc.get("spaces") or {}).get(self.space) or {})
            for node, doc in self.nodes.status.items()
        }
        measured = dict(record)
        if not measure_losses([measured], views):
            return
        lost = int(measured["entriesLost"])
        try:
            doc = await self.api.patch_space_status(
                self.namespace,
                self.space,
                {"lastPromotion": {"entriesLost": lost}},
                resource_version=_version(body),
            )
        except KubeApiError as err:
            if err.conflict:
                return  # measured on an older copy: measure again on the next one kopf hands us
            raise
        self.state.loss_measured_epoch = epoch
        self.state.resource_version = _version(doc) or self.state.resource_version
        old = record.get("oldPrimary")
        message = (
            f"the failover of space {self.space} at epoch {epoch} lost {lost} entries: its old"
            f" primary {old} rejoined and cut them (under ackPolicy async, acknowledged writes"
            f" among them; estimated at decision time: {record.get('entriesPossiblyLost')})"
            if lost
            else f"the failover of space {self.space} at epoch {epoch} lost nothing: its old"
            f" primary {old} rejoined with a log identical to the new primary's"
        )
        log.info("%s", message)
        self.event("Warning" if lost else "Normal", "FailoverLossMeasured", message)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.pending_events.append((type_, reason, message))

    def _announce(self, key: str, type_: str, message: str) -> None:
        """An Event for a standing problem: posted again only when its gist changes."""
        if self.announced.get(key) != rc.gist(message):
            self.announced[key] = rc.gist(message)
            self.event(type_, key, message)

    async def _post_events(self) -> None:
        pending, self.pending_events = self.pending_events, []
        for type_, reason, message in pending:
            try:
                await self.api.post_event(self.ref, type_=type_, reason=reason, message=message)
            except KubeApiError as err:
                log.warning("space %s: cannot post %s event: %s", self.space, reason, err)


def _version(body: Mapping[str, Any]) -> str | None:
    version = (body.get("metadata") or {}).get("resourceVersion")
    return version if isinstance(version, str) and version else None
