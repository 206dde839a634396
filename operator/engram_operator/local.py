"""The local control plane: sidecar processes on 127.0.0.1 and the control loop that drives them.

It uses the same pure deciders as the Kubernetes operator (`reconcile`), with local stand-ins for
the Kubernetes API: the node "lease" is a successful `POST /v1/lease` heartbeat (which also
renews the node's write leases), the direct probe is the next heartbeat attempt after the lease
expired, and status lives in `<data>/cluster.json`. It talks to sidecars over HTTP only and starts
them as `python -m engram_sidecar`, so it never imports the data plane.

Write-lease grants (heartbeats, and assignments that make a node primary) carry this process's id
and its monotonic send time, so a sidecar can refuse one that arrived late; the loop remembers
when it last sent each (node, space) a grant, and `reconcile` promotes nobody before that grant
has run out. A failover's fence round (`FenceAndElect`) runs here: every member at once, each
bounded by the fence timeout, then `reconcile.conclude_failover` decides on the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator import reconcile as rc
from engram_operator.election import FenceAnswer
from engram_operator.model import NO_EPOCH, MemberReport, NodeInfo, Placement, SpaceSpec
from engram_operator.reconcile import DEFAULT_SETTINGS
from engram_operator.switchover import AwaitCatchUp, Demote, Fence, PromoteTarget
from engram_operator.verdict import (
    LeaseObservation,
    ProbeResult,
    StoreHealth,
    Timing,
    Verdict,
    judge,
)

log = logging.getLogger("engram_operator.local")
TIMING = Timing()


@dataclass
class LocalNode:
    name: NodeName
    http_port: int
    replication_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.replication_port}"


@dataclass
class ClusterFiles:
    root: Path

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def state(self) -> Path:
        return self.root / "cluster.json"

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    def ensure_secret(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.secret.exists():
            fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return self.secret.read_text().strip()


class Processes:
    """Starts, kills and restarts the node processes."""

    def __init__(self, files: ClusterFiles, nodes: list[LocalNode], extra_args: list[str]) -> None:
        self.files = files
        self.nodes = {n.name: n for n in nodes}
        self.extra_args = extra_args

    def start(self, name: NodeName) -> None:
        n = self.nodes[name]
        n.data_dir.mkdir(parents=True, exist_ok=True)
        logf = (self.files.root / f"{name}.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "engram_sidecar",
            "--node",
            name,
            "--data-dir",
            str(n.data_dir),
            "--http-port",
            str(n.http_port),
            "--replication-port",
            str(n.replication_port),
            "--secret-file",
            str(self.files.secret),
            *self.extra_args,
        ]
        n.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        logf.close()

    def kill(self, name: NodeName, sig: int = signal.SIGKILL) -> None:
        p = self.nodes[name].proc
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)

    def stop_all(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGCONT)
                n.proc.terminate()
        for n in self.nodes.values():
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(timeout=5)


@dataclass
class SpaceRecord:
    spec: SpaceSpec
    placement: Placement | None = None
    switchover: rc.SwitchoverProgress | None = None
    last_promotion_epoch: Epoch | None = None
    # The epoch of a failover whose fence round ran but that promoted nobody yet (see
    # `reconcile.FenceAndElect`); recorded in `decisions` (so in cluster.json) before any fence.
    pending_epoch: Epoch | None = None
    last_sentence: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)


def _gist(sentence: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", sentence)


def pending_epoch(placement: Placement | None, decisions: list[dict[str, Any]]) -> Epoch | None:
    """The epoch of an unfinished failover in a space's decision log: a record without a winner
    at an epoch above the placement's (a fence round was recorded, nobody was promoted)."""
    floor = placement.epoch if placement is not None else 0
    pending = [
        int(d["newEpoch"])
        for d in decisions
        if d.get("winner") is None and isinstance(d.get("newEpoch"), int) and d["newEpoch"] > floor
    ]
    return Epoch(max(pending)) if pending else None


async def _fence_one(
    s: aiohttp.ClientSession, node: NodeName, url: str, epoch: Epoch, timeout: float
) -> FenceAnswer:
    """One member's answer to `POST .../fence {"epoch": epoch}`; never raises."""
    try:
        async with s.post(
            url, json={"epoch": int(epoch)}, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.text()
            if resp.status != 200:
                return FenceAnswer(node=node, ok=False, error=f"HTTP {resp.status} {body[:200]}")
            doc = json.loads(body)
            return FenceAnswer(
                node=node,
                ok=True,
                last_epoch=Epoch(int(doc.get("last_epoch") or 0)),
                last_sequence=Sequence(int(doc.get("last_sequence") or 0)),
            )
    except TimeoutError:
        return FenceAnswer(node=node, ok=False, error=f"no answer within {timeout:g} s")
    except (aiohttp.ClientError, ValueError, TypeError, AttributeError) as err:
        return FenceAnswer(node=node, ok=False, error=f"unreachable: {err!r}"[:200])


class ControlLoop:
    """One tick every `TIMING.check_interval`: heartbeat every node, then reconcile every space."""

    def __init__(
        self,
        *,
        files: ClusterFiles,
        nodes: list[LocalNode],
        spaces: dict[SpaceId, SpaceSpec],
        token: str,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = print,
    ) -> None:
        self.files = files
        self.nodes = {n.name: n for n in nodes}
        self.token = token
        self.clock = clock
        self.say = say
        self.spaces = {s: SpaceRecord(spec) for s, spec in spaces.items()}
        self.renewed_at: dict[NodeName, float] = {}
        self.probes: dict[NodeName, ProbeResult] = {}
        self.status: dict[NodeName, dict[str, Any]] = {}
        self.store = StoreHealth(last_read_ok_at=clock())
        self.started_at = clock()
        # Before the first placement, wait this long for every node to answer once, so a space
        # isn't placed on whichever node happened to start first.
        self.startup_grace = 10.0
        # Who we are to the sidecars: a new process starts a new baseline for their grant-delay
        # estimate (its monotonic clock has another origin).
        self.control_plane = secrets.token_hex(8)
        # (node, space) -> our clock when we last sent that node a write-lease grant for that
        # space. A grant sent by an earlier control-plane process is unknowable: until we have
        # sent one ourselves, count one as sent when we started.
        self.grants: dict[tuple[NodeName, SpaceId], float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._beats: aiohttp.ClientSession | None = None
        self._load()

    # ---- persistence (the local stand-in for MemorySpace.status) --------------------------

    def _load(self) -> None:
        if not self.files.state.exists():
            return
        doc = json.loads(self.files.state.read_text())
        for sid, rec in doc.get("spaces", {}).items():
            if sid in self.spaces and rec.get("placement"):
                p = rec["placement"]
                self.spaces[sid].placement = Placement(
                    primary=NodeName(p["primary"]),
                    replicas=tuple(NodeName(r) for r in p["replicas"]),
                    epoch=Epoch(p["epoch"]),
                )
                self.spaces[sid].decisions = rec.get("decisions", [])
                self.spaces[sid].pending_epoch = pending_epoch(
                    self.spaces[sid].placement, self.spaces[sid].decisions
                )

    def save(self) -> None:
        doc = {
            "nodes": {n.name: {"http": n.http, "address": n.address} for n in self.nodes.values()},
            "spaces": {
                sid: {
                    "placement": None
                    if r.placement is None
                    else {
                        "primary": r.placement.primary,
                        "replicas": list(r.placement.replicas),
                        "epoch": r.placement.epoch,
                    },
                    "ackPolicy": r.spec.ack_policy,
                    "decisions": r.decisions[-20:],
                    "lastSentence": r.last_sentence,
                }
                for sid, r in self.spaces.items()
            },
        }
        # Placement and epochs are recorded here before anyone acts on them: after a power cut
        # the file must hold the old state or the new, whole, never an epoch that was handed out
        # and then forgotten. So: temp file, fsync, rename, fsync the directory.
        tmp = self.files.state.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = memoryview(json.dumps(doc, indent=2).encode())
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.files.state)
        dir_fd = os.open(self.files.state.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ---- HTTP -----------------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})
        return self._session

    async def beat_session(self) -> aiohttp.ClientSession:
        """Heartbeats open a new connection each time: then a refused connection proves the
        grant in it never left, so a killed primary's lease wait starts at its last heartbeat
        that got through, not at the refused one (a reused connection can't tell)."""
        if self._beats is None:
            self._beats = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._beats

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._beats is not None:
            await self._beats.close()

    def _stamp(self) -> tuple[int, float]:
        """(the monotonic ns a grant carries, our clock's reading for it). The stamp is read
        first: the node measures the grant's delay from the stamp, and our wait for the lease to
        run out must start no earlier than that."""
        stamp = time.monotonic_ns()
        return stamp, self.clock()

    def lease_grants(self, space: SpaceId) -> dict[NodeName, float]:
        """When we last sent each node a write-lease grant for `space` (see `self.grants`)."""
        return {n: self.grants.get((n, space), self.started_at) for n in self.nodes}

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
        stamp, sent = self._stamp()
        body = {
            "granted_at_ns": time.time_ns(),
            "control_plane": self.control_plane,
            "sent_mono_ns": stamp,
            "lease_seconds": DEFAULT_SETTINGS.write_lease,
            "epochs": epochs,
        }
        s = await self.beat_session()
        delivered = True
        try:
            async with s.post(
                f"http://{node.http}/v1/lease",
                json=body,
                timeout=aiohttp.ClientTimeout(total=TIMING.probe_timeout),
            ) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientError(f"HTTP {resp.status}")
                self.status[node.name] = await resp.json()
            self.renewed_at[node.name] = sent
            self.probes[node.name] = ProbeResult(ok=True, started_at=sent)
        except aiohttp.ClientConnectorError:
            # No connection, so no byte of the request left: the grant can't arrive, ever (a
            # killed node refuses at once; recording it would only delay the failover).
            delivered = False
            self.probes[node.name] = ProbeResult(ok=False, started_at=sent)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            # Keep its last report: the election needs the dead primary's last sequence.
            self.probes[node.name] = ProbeResult(ok=False, started_at=sent)
        if delivered:
            for sid in epochs:
                self.grants[(node.name, SpaceId(sid))] = sent

    async def push(
        self, space: SpaceId, placement: Placement, nodes: tuple[NodeName, ...], ack_policy: str
    ) -> None:
        def member(n: NodeName) -> dict[str, str]:
            ln = self.nodes[n]
            return {"node": n, "address": ln.address, "http": ln.http}

        doc = {
            "epoch": int(placement.epoch),
            "primary": member(placement.primary),
            "replicas": [member(r) for r in placement.replicas],
            "ackPolicy": ack_policy,
        }
        s = await self.session()
        # An assignment that makes a node primary grants it a write lease from when it arrives:
        # stamped like a heartbeat's grant (so a late one is refused), and remembered.
        stamp, sent = self._stamp()
        headers = {
            "X-Engram-Control-Plane": self.control_plane,
            "X-Engram-Sent-Mono-Ns": str(stamp),
            "X-Engram-Lease-Seconds": str(DEFAULT_SETTINGS.write_lease),
        }
        if placement.primary in nodes and placement.primary in self.nodes:
            self.grants[(placement.primary, space)] = sent

        async def one(n: NodeName) -> None:
            try:
                async with s.put(
                    f"http://{self.nodes[n].http}/v1/spaces/{space}/assignment",
                    json=doc,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as resp:
                    if resp.status not in (200, 409):
                        log.warning(
                            "assignment of %s to %s: HTTP %d %s",
                            space,
                            n,
                            resp.status,
                            await resp.text(),
                        )
            except (aiohttp.ClientError, TimeoutError) as err:
                log.info("assignment of %s to %s failed: %r", space, n, err)

        await asyncio.gather(*(one(n) for n in nodes if n in self.nodes))

    # ---- one tick -------------------------------------------------------------------------

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
                store=self.store,
                timing=TIMING,
            )
            for n in self.nodes
        }

    def reports(self, space: SpaceId) -> dict[NodeName, MemberReport]:
        out: dict[NodeName, MemberReport] = {}
        lag_view: dict[str, dict[str, Any]] = {}
        for st in self.status.values():
            v = st.get("spaces", {}).get(space)
            if v and v.get("role") == "primary":
                lag_view = v.get("replicas", {})
        for name, st in self.status.items():
            v = st.get("spaces", {}).get(space)
            if not v or v.get("role") not in ("primary", "replica"):
                continue
            role = v["role"]
            seq = v["last_sequence"] if role == "primary" else v["applied_sequence"]
            lv = lag_view.get(name, {})
            accepted = v.get("accepted_epoch")
            out[name] = MemberReport(
                node=name,
                role=role,
                epoch=Epoch(v["epoch"]),
                applied_sequence=Sequence(seq),
                lag_seconds=float(lv.get("lag_seconds", 0.0)),
                state=lv.get("state", "Healthy"),
                last_epoch=Epoch(int(v.get("last_epoch") or NO_EPOCH)),
                accepted_epoch=Epoch(int(accepted)) if isinstance(accepted, int) else None,
            )
        return out

    async def tick(self) -> list[str]:
        await asyncio.gather(*(self._heartbeat(n) for n in self.nodes.values()))
        now = self.clock()
        self.store = StoreHealth(last_read_ok_at=now)
        unseen = [n for n in self.nodes if n not in self.renewed_at]
        if unseen and now - self.started_at < self.startup_grace:
            return [f"waiting for {', '.join(sorted(unseen))} to answer before placing spaces"]
        verdicts = self.verdicts(now)
        infos = tuple(NodeInfo(name=n.name, address=n.address) for n in self.nodes.values())
        load: dict[NodeName, int] = {}
        for r in self.spaces.values():
            if r.placement is not None:
                load[r.placement.primary] = load.get(r.placement.primary, 0) + 1
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
                primary_load=load,
                last_promotion_epoch=rec.last_promotion_epoch,
                lease_grants=self.lease_grants(sid),
                pending_epoch=rec.pending_epoch,
            )
            decision = await self.execute(sid, rec, rc.reconcile(obs, now=now), now, obs)
            if rec.placement is not None:
                load[rec.placement.primary] = load.get(rec.placement.primary, 0)
            # Say a sentence when its gist changes, not when only its numbers tick along.
            steady = decision.sentence.startswith(f"space {sid} is steady")
            if _gist(decision.sentence) != _gist(rec.last_sentence) and not steady:
                self.say(decision.sentence)
            rec.last_sentence = decision.sentence
            sentences.append(decision.sentence)
        return sentences

    async def execute(
        self, sid: SpaceId, rec: SpaceRecord, d: rc.Decision, now: float, obs: rc.Observation
    ) -> rc.Decision:
        """Run `d`'s actions in order; returns the decision that was carried out (a fence
        round's conclusion replaces the decision that planned it)."""
        for a in d.actions:
            match a:
                case rc.Place(placement=p):
                    rec.placement = p
                    self._settle_pending(rec)
                    self.save()
                case rc.Promote(record=record, placement=p):
                    rec.placement = p
                    rec.last_promotion_epoch = p.epoch
                    rec.decisions.append(dict(record.to_dict()))
                    self._settle_pending(rec)
                    self.save()
                    self.say(f"decision record: {json.dumps(record.to_dict())}")
                case rc.FenceAndElect():
                    return await self.execute(
                        sid, rec, await self.fence_and_elect(sid, rec, a, obs), now, obs
                    )
                case rc.PushAssignment(placement=p, nodes=nodes):
                    await self.push(sid, p, nodes, rec.spec.ack_policy)
                case rc.BeginSwitchover(target=t):
                    rec.switchover = rc.SwitchoverProgress(target=t, started_at=now)
                case rc.AbortSwitchover(target=t, reason=why):
                    rec.switchover = rc.SwitchoverProgress(
                        target=t, started_at=now, aborted_at=now, abort_reason=why
                    )
                    self._end_switchover(sid, rec)
                case rc.ClearSwitchover():
                    rec.switchover = None
                    self._end_switchover(sid, rec)
                case rc.ExecuteHandOver(plan=plan):
                    await self.hand_over(sid, rec, plan.placement, plan.steps)
                case rc.Wait() | rc.Noop():
                    pass
        return d

    @staticmethod
    def _settle_pending(rec: SpaceRecord) -> None:
        pending, placed = rec.pending_epoch, rec.placement
        if pending is not None and placed is not None and placed.epoch >= pending:
            rec.pending_epoch = None

    async def fence_and_elect(
        self, sid: SpaceId, rec: SpaceRecord, plan: rc.FenceAndElect, obs: rc.Observation
    ) -> rc.Decision:
        """Phase one of a failover: record the epoch, fence every member at it at once, then
        let `reconcile.conclude_failover` elect among those that answered."""
        if rec.pending_epoch != plan.epoch:
            # The epoch is recorded before anyone acts on it: a restarted loop must not hand
            # out the same epoch again with another winner (`pending_epoch` reads it back).
            rec.pending_epoch = plan.epoch
            rec.decisions.append(dict(plan.record.to_dict()))
            self.save()
        s = await self.session()
        answers = await asyncio.gather(
            *(
                _fence_one(
                    s,
                    n,
                    f"http://{self.nodes[n].http}/v1/spaces/{sid}/fence",
                    plan.epoch,
                    plan.timeout,
                )
                for n in plan.nodes
                if n in self.nodes
            )
        )
        return rc.conclude_failover(obs, plan, answers)

    def _end_switchover(self, sid: SpaceId, rec: SpaceRecord) -> None:
        rec.spec = replace(rec.spec, target_primary=None)
        with contextlib.suppress(FileNotFoundError):
            (self.files.requests / f"switchover-{sid}.json").unlink()

    async def hand_over(
        self,
        sid: SpaceId,
        rec: SpaceRecord,
        new: Placement,
        steps: tuple[Fence | AwaitCatchUp | PromoteTarget | Demote, ...],
    ) -> None:
        """A switchover's steps (see `switchover`). The old primary answers the fence only once
        it has stopped acknowledging, so the target may lead as soon as it holds the old
        primary's final entry: no write-lease wait, no majority needed (nothing can be
        acknowledged behind the target's back once the only writer is fenced)."""
        old = rec.placement
        assert old is not None
        rec.placement = new  # the epoch is recorded before anyone acts on it
        self.save()
        s = await self.session()
        final = 0
        for step in steps:
            if isinstance(step, Fence):
                answer = await _fence_one(
                    s,
                    step.node,
                    f"http://{self.nodes[step.node].http}/v1/spaces/{sid}/fence",
                    step.epoch,
                    2.0,
                )
                if not answer.ok:
                    await self._give_back(
                        sid, rec, old, new, f"{step.node} did not take the fence: {answer.error}"
                    )
                    return
                final = answer.last_sequence
            elif isinstance(step, AwaitCatchUp):
                url = f"http://{self.nodes[step.node].http}/v1/spaces/{sid}"
                deadline = self.clock() + step.timeout
                applied = -1
                while self.clock() < deadline:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        async with s.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                            applied = int((await resp.json()).get("applied_sequence", -1))
                    if applied >= max(final, step.sequence):
                        break
                    await asyncio.sleep(0.02)
                else:
                    # Target never caught up: give the space back to the old primary, at an
                    # epoch above the fence's, so the write pause stays bounded.
                    await self._give_back(
                        sid,
                        rec,
                        old,
                        new,
                        f"{step.node} did not reach sequence {final} within {step.timeout:g} s",
                    )
                    return
            elif isinstance(step, PromoteTarget | Demote):
                await self.push(sid, new, (step.node,), rec.spec.ack_policy)
        await self.push(sid, new, new.members, rec.spec.ack_policy)
        self.say(
            f"switched space {sid} over to {new.primary} at epoch {new.epoch} "
            f"(zero loss: {new.primary} held sequence {final} before taking writes)"
        )

    async def _give_back(
        self, sid: SpaceId, rec: SpaceRecord, old: Placement, new: Placement, why: str
    ) -> None:
        back = Placement(primary=old.primary, replicas=old.replicas, epoch=Epoch(new.epoch + 1))
        rec.placement = back
        self.save()
        await self.push(sid, back, back.members, rec.spec.ack_policy)
        self.say(
            f"switchover of space {sid} aborted: {why}; {old.primary} leads again at epoch"
            f" {back.epoch}"
        )

    def poll_requests(self) -> None:
        """Pick up `engram-replication switchover` requests left in the requests folder."""
        if not self.files.requests.is_dir():
            return
        for f in self.files.requests.glob("switchover-*.json"):
            try:
                doc = json.loads(f.read_text())
                sid, target = SpaceId(doc["space"]), NodeName(doc["to"])
            except (ValueError, KeyError):
                f.unlink()
                continue
            rec = self.spaces.get(sid)
            if rec is not None and rec.spec.target_primary != target:
                rec.spec = replace(rec.spec, target_primary=target)
