"""Local mode's control loop: heartbeat every node, judge it, then reconcile every space.

It runs the same pure deciders as the Kubernetes operator (`reconcile`) and the same action
executor (`executor.Executor`), with local stand-ins for what Kubernetes provides: the node
"lease" is a successful `POST /v1/lease` heartbeat (which also renews the node's write leases),
the direct probe is the next heartbeat attempt after the lease expired, and status lives in
`<data>/cluster.json` (`store.FileStore`). It reaches the sidecars only through
`engram_contract.client.SidecarClient`, so it never imports the data plane.

Write-lease grants (heartbeats, and assignments that make a node primary) carry the client's id
and its monotonic send time, so a sidecar can refuse one that arrived late; the loop remembers
when it last sent each (node, space) a grant, and `reconcile` promotes nobody before that grant
has run out.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_contract.kubernetes import NodeAddresses
from engram_operator import reconcile as rc
from engram_operator.election import DecisionRecord
from engram_operator.executor import Executor
from engram_operator.local.store import ClusterFiles, ClusterState, SpaceRecord
from engram_operator.local.supervisor import LocalNode
from engram_operator.losses import measure_losses
from engram_operator.model import MemberReport, NodeInfo, Placement, SpaceSpec, member_reports
from engram_operator.reconcile import DEFAULT_SETTINGS
from engram_operator.verdict import (
    DEFAULT_TIMING,
    LeaseObservation,
    ProbeResult,
    StoreHealth,
    Verdict,
    judge,
)

TIMING: Final = DEFAULT_TIMING
# Before the first placement, wait this long for every node to answer once, so a space isn't
# placed on whichever node happened to start first.
STARTUP_GRACE: Final = 10.0


class LocalNarrator:
    """The executor's narrator in local mode: the tick's sentence says most of it already;
    decision records and switchover outcomes get a line of their own."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def placed(self, old: Placement | None, new: Placement, message: str, *, short: bool) -> None:
        pass

    def fencing(self, record: DecisionRecord) -> None:
        pass

    def promoted(self, record: DecisionRecord) -> None:
        self.say(f"decision record: {json.dumps(record.to_dict())}")

    def blocked(self, reason: str, record: DecisionRecord) -> None:
        pass

    def switchover_started(self, sentence: str) -> None:
        pass

    def switchover_stopped(self, reason: str) -> None:
        pass

    def switchover_cleared(self, reason: str) -> None:
        pass

    def switched_over(self, placement: Placement, message: str) -> None:
        self.say(message)

    def handover_aborted(self, message: str) -> None:
        self.say(message)


class ControlLoop:
    """One tick every `TIMING.check_interval`: heartbeat every node, then reconcile every space."""

    def __init__(
        self,
        *,
        files: ClusterFiles,
        nodes: list[LocalNode],
        spaces: Mapping[SpaceId, SpaceSpec],
        token: str,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = print,
        sidecars: SidecarClient | None = None,
    ) -> None:
        self.files = files
        self.nodes = {n.name: n for n in nodes}
        self.clock = clock
        self.say = say
        self.spaces = {s: SpaceRecord(spec) for s, spec in spaces.items()}
        self.renewed_at: dict[NodeName, float] = {}
        self.probes: dict[NodeName, ProbeResult] = {}
        self.status: dict[NodeName, dict[str, Any]] = {}
        self.health = StoreHealth(last_read_ok_at=clock())
        self.started_at = clock()
        self.startup_grace = STARTUP_GRACE
        # Who we are to the sidecars is the client's id: a new process starts a new baseline
        # for their grant-delay estimate (its monotonic clock has another origin).
        self.sidecars = sidecars or SidecarClient(
            token,
            probe_timeout=TIMING.probe_timeout,
            lease_seconds=DEFAULT_SETTINGS.write_lease,
            handles_drain=True,
        )
        # (node, space) -> our clock when we last sent that node a write-lease grant for that
        # space. A grant sent by an earlier control-plane process is unknowable: until we have
        # sent one ourselves, count one as sent when we started.
        self.grants: dict[tuple[NodeName, SpaceId], float] = {}
        self.cluster = ClusterState(files, self.spaces, self.addresses)
        self.cluster.load()
        narrator = LocalNarrator(say)
        self.executors = {
            sid: Executor(
                space=sid,
                store=self.cluster.store(sid),
                nodes=self,
                sidecars=self.sidecars,
                narrator=narrator,
                clock=clock,
            )
            for sid in self.spaces
        }

    def save(self) -> None:
        """Write cluster.json now (the executor's store does after every recorded change)."""
        self.cluster.save()

    async def close(self) -> None:
        await self.sidecars.close()

    # ---- the nodes, as the executor sees them (`executor.NodeDirectory`) -------------------

    def addresses(self) -> dict[str, NodeAddresses]:
        return {n.name: {"address": n.address, "http": n.http} for n in self.nodes.values()}

    def stamp(self) -> tuple[int, float]:
        """(the monotonic ns a grant carries, our clock's reading for it). The stamp is read
        first: the node measures the grant's delay from the stamp, and our wait for the lease to
        run out must start no earlier than that."""
        stamp = time.monotonic_ns()
        return stamp, self.clock()

    def note_grant(self, node: NodeName, space: SpaceId, sent: float) -> None:
        self.grants[(node, space)] = max(sent, self.grants.get((node, space), sent))

    def note_view(self, node: NodeName, space: SpaceId, view: Mapping[str, Any]) -> None:
        """Nothing to do: the next tick's heartbeats, awaited before it decides, bring views at
        least as fresh."""

    def lease_grants(self, space: SpaceId) -> dict[NodeName, float]:
        """When we last sent each node a write-lease grant for `space` (see `self.grants`)."""
        return {n: self.grants.get((n, space), self.started_at) for n in self.nodes}

    # ---- heartbeats: the local node lease ----------------------------------------------------

    async def _heartbeat(self, node: LocalNode) -> None:
        # Grant write leases only on a heartbeat that follows a successful one. A grant sent to a
        # node that stopped answering may sit in its socket and be read after we promote; this
        # way the last grant is at most one check interval after the last success. The node
        # also refuses a grant that arrives more than max_grant_delay late (by the stamps), and
        # reconcile promotes nobody until the last grant sent has run out (`self.grants`).
        last = self.probes.get(node.name)
        grant = last is not None and last.ok
        epochs = {
            sid: int(r.placement.epoch)
            for sid, r in self.spaces.items()
            if grant and r.placement is not None and r.placement.primary == node.name
        }
        stamp, sent = self.stamp()
        try:
            doc = await self.sidecars.heartbeat(
                node.http, epochs, sent_mono_ns=stamp, expect=node.name
            )
        except SidecarError as err:
            # Keep its last report: the election needs the dead primary's last sequence.
            self.probes[node.name] = ProbeResult(ok=False, started_at=sent)
            # No connection means no byte of the request left: that grant can never arrive (a
            # killed node refuses at once; counting it would only delay the failover).
            if err.delivered:
                for sid in epochs:
                    self.note_grant(node.name, sid, sent)
            return
        self.status[node.name] = doc
        self.renewed_at[node.name] = sent
        self.probes[node.name] = ProbeResult(ok=True, started_at=sent)
        for sid in epochs:
            self.note_grant(node.name, sid, sent)

    def verdicts(self, now: float) -> dict[NodeName, Verdict]:
        return {
            n: judge(
                LeaseObservation(
                    node=n,
                    renewed_at=self.renewed_at.get(n),
                    duration=TIMING.lease_duration,
                    probe=self.probes.get(n),
                ),
                now=now,
                store=self.health,
                timing=TIMING,
            )
            for n in self.nodes
        }

    def reports(self, space: SpaceId) -> dict[NodeName, MemberReport]:
        return member_reports(self.status, space)

    def primary_load(self) -> dict[NodeName, int]:
        load: dict[NodeName, int] = {}
        for r in self.spaces.values():
            if r.placement is not None:
                load[r.placement.primary] = load.get(r.placement.primary, 0) + 1
        return load

    # ---- one tick ----------------------------------------------------------------------------

    async def tick(self) -> list[str]:
        await asyncio.gather(*(self._heartbeat(n) for n in self.nodes.values()))
        now = self.clock()
        self.health = StoreHealth(last_read_ok_at=now)
        unseen = [n for n in self.nodes if n not in self.renewed_at]
        if unseen and now - self.started_at < self.startup_grace:
            return [f"waiting for {', '.join(sorted(unseen))} to answer before placing spaces"]
        verdicts = self.verdicts(now)
        infos = tuple(
            NodeInfo(
                name=n.name,
                address=n.address,
                draining=bool(self.status.get(n.name, {}).get("draining")),
            )
            for n in self.nodes.values()
        )
        sentences = []
        for sid, rec in self.spaces.items():
            obs = rc.Observation(
                space=sid,
                spec=rec.spec,
                placement=rec.placement,
                nodes=infos,
                verdicts=verdicts,
                reports=self.reports(sid),
                switchover=rec.switchover,
                primary_load=self.primary_load(),
                last_promotion_epoch=rec.last_promotion_epoch,
                lease_grants=self.lease_grants(sid),
                pending_epoch=rec.pending_epoch,
            )
            decision = rc.reconcile(obs, now=now)
            decision = await self.executors[sid].run(decision, rec.spec, now, obs)
            # Say a sentence when its gist changes, not when only its numbers tick along.
            steady = decision.sentence.startswith(f"space {sid} is steady")
            if rc.gist(decision.sentence) != rc.gist(rec.last_sentence) and not steady:
                self.say(decision.sentence)
            rec.last_sentence = decision.sentence
            sentences.append(decision.sentence)
            views: dict[str, dict[str, Any]] = {
                str(node): st.get("spaces", {}).get(sid) or {} for node, st in self.status.items()
            }
            if measure_losses(rec.decisions, views):
                self.cluster.save()
        return sentences

    def poll_requests(self) -> None:
        """Pick up `engram-replication switchover` requests left in the requests folder."""
        for sid, target in self.files.switchover_requests():
            rec = self.spaces.get(sid)
            if rec is not None and rec.spec.target_primary != target:
                rec.spec = replace(rec.spec, target_primary=target)
