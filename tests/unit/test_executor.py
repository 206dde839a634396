"""The one action executor (engram_operator.executor), run over both of its stores.

Every scenario runs twice: over local mode's cluster.json (`local.store.FileStore`) and over a
MemorySpace's status (`kube.store.StatusStore`, behind the real `KubeApi` with its HTTP call
replaced), with the sidecars faked in memory. What is checked is what each store made durable
and what the sidecars were told, in order.

The last test drives local mode's `ControlLoop` over HTTP against fake sidecars: before the
executor was shared, a fence whose HTTP call raised an error outside aiohttp's own (aiohttp lets
`ConnectionResetError` out of a closing transport) ended the tick with the target recorded as
primary and nobody told: never given back, and the next tick would have made the target primary
without the catch-up, cutting the old primary's last entries.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import kopf
import pytest
from aiohttp import web

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_contract.kubernetes import NodeAddresses
from engram_contract.launcher import free_port
from engram_operator import reconcile as rc
from engram_operator.election import DecisionRecord
from engram_operator.executor import Executor
from engram_operator.kube.api import KubeApi, KubeApiError
from engram_operator.kube.driver import SpaceDriver
from engram_operator.kube.metrics import OperatorMetrics
from engram_operator.kube.nodes import NodeMonitor, NodeRecord
from engram_operator.local.loop import ControlLoop
from engram_operator.local.store import ClusterFiles, ClusterState, SpaceRecord
from engram_operator.local.supervisor import LocalNode
from engram_operator.model import MemberReport, NodeInfo, Placement, SpaceSpec
from engram_operator.switchover import HandOver, plan_switchover
from engram_operator.verdict import Verdict

SPACE = SpaceId("orders")
A, B, C = NodeName("node-a"), NodeName("node-b"), NodeName("node-c")
NODES = (A, B, C)
HTTP = {n: f"127.0.0.1:{18100 + i}" for i, n in enumerate(NODES)}
PLACED = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
NOW = 1000.0
_T0 = time.monotonic()


def clock() -> float:
    """NOW, moving on with real time (a catch-up's deadline must pass)."""
    return NOW + (time.monotonic() - _T0)


class FakeSidecars:
    """The sidecar calls the executor makes, answered from memory."""

    def __init__(self) -> None:
        self.node_of = {http: n for n, http in HTTP.items()}
        self.calls: list[tuple[str, NodeName, Any]] = []
        self.fence_error: dict[NodeName, BaseException] = {}
        self.last: dict[NodeName, tuple[int, int]] = {A: (3, 100), B: (3, 100), C: (3, 98)}
        self.applied: dict[NodeName, int] = {}
        self.refuse: set[NodeName] = set()
        # Called at each fence with the node: tests check what was durable by then.
        self.on_fence: Callable[[NodeName], None] = lambda node: None

    def assigned(self) -> list[tuple[NodeName, int, str]]:
        """(node, epoch, primary) of every assignment sent, in order."""
        return [(n, d["epoch"], d["primary"]["node"]) for k, n, d in self.calls if k == "assign"]

    async def fence(
        self,
        http: str,
        space: SpaceId,
        epoch: int,
        *,
        timeout: float = 2.0,
        incarnation: str | None = None,
    ) -> dict[str, Any]:
        node = self.node_of[http]
        self.calls.append(("fence", node, epoch))
        self.on_fence(node)
        if node in self.fence_error:
            raise self.fence_error[node]
        last_epoch, last_sequence = self.last[node]
        return {"last_epoch": last_epoch, "last_sequence": last_sequence}

    async def assign(
        self, http: str, space: SpaceId, doc: Mapping[str, Any], *, sent_mono_ns: int
    ) -> dict[str, Any]:
        node = self.node_of[http]
        self.calls.append(("assign", node, dict(doc)))
        if node in self.refuse:
            raise SidecarError(f"PUT assignment on {http}: HTTP 409", status=409)
        return {"epoch": doc["epoch"]}

    async def space_view(self, http: str, space: SpaceId) -> dict[str, Any]:
        node = self.node_of[http]
        return {"applied_sequence": self.applied.get(node, self.last[node][1])}


class Directory:
    """The executor's `NodeDirectory` for the file store's world."""

    def __init__(self) -> None:
        self.grants: dict[tuple[NodeName, SpaceId], float] = {}

    def addresses(self) -> dict[str, NodeAddresses]:
        return {
            n: {"address": f"127.0.0.1:{18200 + i}", "http": HTTP[n]} for i, n in enumerate(NODES)
        }

    def stamp(self) -> tuple[int, float]:
        return 1, NOW

    def note_grant(self, node: NodeName, space: SpaceId, sent: float) -> None:
        self.grants[(node, space)] = sent

    def note_view(self, node: NodeName, space: SpaceId, view: Mapping[str, Any]) -> None:
        pass


@dataclass
class Told:
    """A narrator that keeps what it was told."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def placed(self, old: Placement | None, new: Placement, message: str, *, short: bool) -> None:
        self.lines.append(("placed", message))

    def fencing(self, record: DecisionRecord) -> None:
        self.lines.append(("fencing", record.summary))

    def promoted(self, record: DecisionRecord) -> None:
        self.lines.append(("promoted", record.summary))

    def blocked(self, reason: str, record: DecisionRecord) -> None:
        self.lines.append(("blocked", reason))

    def switchover_started(self, sentence: str) -> None:
        self.lines.append(("switchover_started", sentence))

    def switchover_stopped(self, reason: str) -> None:
        self.lines.append(("switchover_stopped", reason))

    def switchover_cleared(self, reason: str) -> None:
        self.lines.append(("switchover_cleared", reason))

    def switched_over(self, placement: Placement, message: str) -> None:
        self.lines.append(("switched_over", message))

    def handover_aborted(self, message: str) -> None:
        self.lines.append(("handover_aborted", message))


class FakeKube:
    """The API server's side of `KubeApi.request` for one MemorySpace: GET and status merge
    patches (refused with 409 on a stale resourceVersion), and Events."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.version = 1
        self.obj: dict[str, Any] = {
            "metadata": {"name": SPACE, "namespace": "engram", "uid": "u-1"},
            "spec": {"replicas": 2, "ackPolicy": "quorum"},
            "status": status,
        }
        self.events: list[str] = []
        self.fail_patches = 0

    def body(self) -> dict[str, Any]:
        doc = copy.deepcopy(self.obj)
        doc["metadata"]["resourceVersion"] = str(self.version)
        return doc

    async def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        if method == "GET":
            return self.body()
        if method == "POST":
            self.events.append(body["reason"])
            return {}
        assert method == "PATCH", method
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version is not None and version != str(self.version):
            raise KubeApiError("conflict", status=409)
        if self.fail_patches:
            self.fail_patches -= 1
            raise KubeApiError("PATCH: HTTP 503", status=503)
        self.obj["status"].update(body["status"])
        self.version += 1
        return self.body()


@dataclass
class World:
    """An executor over one of the two stores, and how to read what that store made durable."""

    executor: Executor
    sidecars: FakeSidecars
    durable: Callable[[], dict[str, Any]]  # primary, replicas, epoch, pending as recorded
    told: Callable[[], list[str]]  # what the narrator was told (kinds, or Event reasons)
    spec: SpaceSpec


def _file_world(root: Path, spec: SpaceSpec, placement: Placement) -> World:
    sidecars = FakeSidecars()
    directory = Directory()
    files = ClusterFiles(root)
    root.mkdir(parents=True, exist_ok=True)
    spaces = {SPACE: SpaceRecord(spec, placement=placement)}
    state = ClusterState(files, spaces, directory.addresses)
    state.save()
    told = Told()
    executor = Executor(
        space=SPACE,
        store=state.store(SPACE),
        nodes=directory,
        sidecars=cast("SidecarClient", sidecars),
        narrator=told,
        clock=clock,
    )

    def durable() -> dict[str, Any]:
        saved = json.loads(files.state.read_text())["spaces"][SPACE]
        pending = [
            d["newEpoch"]
            for d in saved["decisions"]
            if d.get("winner") is None and d["newEpoch"] > saved["placement"]["epoch"]
        ]
        return {**saved["placement"], "pending": max(pending, default=None)}

    return World(executor, sidecars, durable, lambda: [k for k, _ in told.lines], spec)


def _status_world(spec: SpaceSpec, placement: Placement) -> World:
    sidecars = FakeSidecars()
    kube = FakeKube(
        {"primary": placement.primary, "replicas": list(placement.replicas), "epoch": 3}
    )
    api = KubeApi(lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"), user_agent="t/1")
    api.request = kube.request  # type: ignore[method-assign]
    monitor = NodeMonitor(
        api=api, sidecars=cast("SidecarClient", sidecars), namespace="engram", selector={}
    )
    for i, n in enumerate(NODES):
        monitor.records[n] = NodeRecord(
            name=n,
            http=HTTP[n],
            address=f"127.0.0.1:{18200 + i}",
            zone=None,
            rack=None,
            renew_time=None,
        )
    driver = SpaceDriver(
        namespace="engram",
        name=SPACE,
        api=api,
        sidecars=cast("SidecarClient", sidecars),
        nodes=monitor,
        metrics=OperatorMetrics(),
        clock=clock,
    )
    driver.adopt(kube.body())
    driver.store.observed_at = clock()

    def durable() -> dict[str, Any]:
        status = kube.obj["status"]
        promotion = status.get("lastPromotion") or {}
        pending = promotion.get("newEpoch") if promotion.get("winner", 0) is None else None
        return {
            "primary": status["primary"],
            "replicas": status["replicas"],
            "epoch": status["epoch"],
            "pending": pending if pending and pending > status["epoch"] else None,
        }

    def told() -> list[str]:
        return [reason for _, reason, _ in driver.pending_events]

    world = World(driver.executor, sidecars, durable, told, spec)
    world.kube = kube  # type: ignore[attr-defined]
    return world


@pytest.fixture(params=["file", "status"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_world(store_kind: str, tmp_path: Path) -> Callable[..., World]:
    def make(spec: SpaceSpec | None = None, placement: Placement = PLACED) -> World:
        spec = spec or SpaceSpec(replicas=2, ack_policy="quorum")
        if store_kind == "file":
            return _file_world(tmp_path / "local", spec, placement)
        return _status_world(spec, placement)

    return make


def _alive(*dead: NodeName) -> dict[NodeName, Verdict]:
    return {
        n: Verdict(node=n, state="Dead" if n in dead else "Alive", reason="test") for n in NODES
    }


def _handover(fenced_timeout: float = 5.0) -> HandOver:
    plan = plan_switchover(
        space=SPACE,
        placement=PLACED,
        target=B,
        verdicts=_alive(),
        primary_last_sequence=Sequence(100),
        target_applied=Sequence(100),
        started_at=NOW,
        now=NOW,
        timeout=30.0,
        fenced_timeout=fenced_timeout,
    )
    assert isinstance(plan, HandOver)
    return plan


async def _switch(world: World, plan: HandOver) -> rc.Decision:
    decision = rc.Decision(
        actions=(rc.BeginSwitchover(target=B), rc.ExecuteHandOver(plan=plan)),
        sentence=f"switching space {SPACE} over to {B}",
        operation="SwitchingOver",
    )
    return await world.executor.run(decision, world.spec, NOW, None)


# ---- switchover -----------------------------------------------------------------------------


async def test_executor_switchover_hands_over_after_the_fence_and_the_catch_up(
    make_world: Callable[..., World],
) -> None:
    w = make_world()
    await _switch(w, _handover())
    assert w.durable()["primary"] == B and w.durable()["epoch"] == 4
    kinds = [(k, n) for k, n, _ in w.sidecars.calls]
    # Recorded first, then: fence the old primary, promote the target, demote the old, tell all.
    assert kinds[0] == ("fence", A)
    assert w.sidecars.assigned()[:2] == [(B, 4, B), (A, 4, B)]
    assert {n for n, e, p in w.sidecars.assigned()[2:]} == {A, B, C}
    told = w.told()
    assert "switched_over" in told or "SwitchedOver" in told, told
    assert w.executor.store.switchover is not None
    assert w.executor.store.switchover.aborted_at is None


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("Cannot write to closing transport"),  # leaks out of aiohttp
        SidecarError("POST fence on node-a: no answer"),
        RuntimeError("anything else"),
    ],
    ids=["connection-reset", "sidecar-error", "runtime-error"],
)
async def test_executor_switchover_whose_fence_raises_gives_the_space_back(
    make_world: Callable[..., World], error: Exception
) -> None:
    w = make_world()
    w.sidecars.fence_error[A] = error
    seen: list[dict[str, Any]] = []
    w.sidecars.on_fence = lambda node: seen.append(w.durable())
    await _switch(w, _handover())
    # The new epoch was on record before the fence was sent ...
    assert seen and seen[0]["primary"] == B and seen[0]["epoch"] == 4
    # ... and the old primary leads again, recorded, at an epoch above the fence's.
    back = w.durable()
    assert (back["primary"], back["replicas"], back["epoch"]) == (A, [B, C], 5)
    assert sorted(w.sidecars.assigned()) == [(A, 5, A), (B, 5, A), (C, 5, A)]
    progress = w.executor.store.switchover
    assert progress is not None and progress.aborted_at is not None
    assert "node-a leads again at epoch 5" in progress.abort_reason
    told = w.told()
    assert "handover_aborted" in told or "SwitchoverAborted" in told, told


async def test_executor_switchover_whose_target_never_catches_up_gives_the_space_back(
    make_world: Callable[..., World],
) -> None:
    w = make_world()
    w.sidecars.applied[B] = 90  # stays 10 behind the old primary's final sequence
    await _switch(w, _handover(fenced_timeout=0.1))
    assert (w.durable()["primary"], w.durable()["epoch"]) == (A, 5)
    assert (B, 4, B) not in w.sidecars.assigned(), "the target was promoted without the catch-up"
    assert w.executor.store.switchover is not None
    assert "did not reach sequence 100" in w.executor.store.switchover.abort_reason


async def test_executor_switchover_whose_target_refuses_the_role_gives_the_space_back(
    make_world: Callable[..., World],
) -> None:
    w = make_world()
    w.sidecars.refuse.add(B)
    await _switch(w, _handover())
    assert (w.durable()["primary"], w.durable()["epoch"]) == (A, 5)
    assert w.executor.store.switchover is not None
    assert "did not take the primary role" in w.executor.store.switchover.abort_reason


async def test_status_store_give_back_retries_an_api_error() -> None:
    w = _status_world(SpaceSpec(replicas=2, ack_policy="quorum"), PLACED)
    kube: FakeKube = w.kube  # type: ignore[attr-defined]
    w.sidecars.fence_error[A] = SidecarError("no answer")

    def blip(node: NodeName) -> None:
        kube.fail_patches = 1  # the give-back's first PATCH gets a 503

    w.sidecars.on_fence = blip
    await _switch(w, _handover())
    assert kube.fail_patches == 0
    assert (w.durable()["primary"], w.durable()["epoch"]) == (A, 5)
    assert "SwitchoverAborted" in w.told()


# ---- failover -------------------------------------------------------------------------------


def _failover_obs(spec: SpaceSpec) -> rc.Observation:
    reports = {
        n: MemberReport(
            node=n,
            role="replica",
            epoch=Epoch(3),
            applied_sequence=Sequence(s),
            last_epoch=Epoch(3),
        )
        for n, s in ((B, 100), (C, 98))
    }
    return rc.Observation(
        space=SPACE,
        spec=spec,
        placement=PLACED,
        nodes=tuple(NodeInfo(name=n, address="x:1") for n in NODES),
        verdicts=_alive(A),
        reports=reports,
        lease_grants={n: NOW - 10.0 for n in NODES},
    )


async def test_executor_failover_records_the_epoch_then_fences_every_member_then_promotes(
    make_world: Callable[..., World],
) -> None:
    spec = SpaceSpec(replicas=2, ack_policy="quorum")
    w = make_world(spec)
    obs = _failover_obs(spec)
    planned = rc.reconcile(obs, now=NOW)
    assert isinstance(planned.actions[-1], rc.FenceAndElect), planned.sentence
    w.sidecars.fence_error[A] = SidecarError("connection refused", delivered=False)
    seen: list[dict[str, Any]] = []
    w.sidecars.on_fence = lambda node: seen.append(w.durable())
    done = await w.executor.run(planned, spec, NOW, obs)
    assert done.sentence.startswith(f"promoted {B} to primary"), done.sentence
    # Every member fenced, each after the epoch was recorded as pending.
    assert sorted(n for k, n, _ in w.sidecars.calls if k == "fence") == [A, B, C]
    assert all(s["pending"] == 4 and s["epoch"] == 3 for s in seen), seen
    got = w.durable()
    assert (got["primary"], got["epoch"], got["pending"]) == (B, 4, None)
    assert {n for n, e, p in w.sidecars.assigned()} <= {B, C}
    assert (B, 4, B) in w.sidecars.assigned()


async def test_executor_failover_counts_a_fence_that_raises_as_no_answer(
    make_world: Callable[..., World],
) -> None:
    spec = SpaceSpec(replicas=2, ack_policy="quorum")
    w = make_world(spec)
    obs = _failover_obs(spec)
    planned = rc.reconcile(obs, now=NOW)
    w.sidecars.fence_error[A] = SidecarError("connection refused", delivered=False)
    w.sidecars.fence_error[C] = ConnectionResetError("Cannot write to closing transport")
    done = await w.executor.run(planned, spec, NOW, obs)
    # 1 of 3 answered: under quorum nobody is promoted, and the epoch stays on record.
    assert "quorum needs 2" in done.sentence, done.sentence
    got = w.durable()
    assert (got["primary"], got["epoch"], got["pending"]) == (A, 3, 4)
    assert w.sidecars.assigned() == []


async def test_file_store_that_cannot_save_keeps_the_record_as_it_was(tmp_path: Path) -> None:
    w = _file_world(tmp_path / "local", SpaceSpec(replicas=2), PLACED)
    (tmp_path / "local" / "cluster.tmp").mkdir()  # the temp file can't be written
    with pytest.raises(OSError):
        await w.executor.run(
            rc.Decision(
                actions=(
                    rc.Place(
                        placement=Placement(primary=A, replicas=(B,), epoch=Epoch(4)), message="m"
                    ),
                ),
                sentence="s",
            ),
            w.spec,
            NOW,
            None,
        )
    assert w.executor.store.placement == PLACED
    assert w.sidecars.calls == []


# ---- local mode end to end, over HTTP -------------------------------------------------------


class FakeSidecarServer:
    """A sidecar's control API on 127.0.0.1, enough for local mode's loop: heartbeats answer
    the space's view, assignments are taken, the fence answers a final sequence."""

    def __init__(self, name: NodeName) -> None:
        self.name = name
        self.assignments: list[dict[str, Any]] = []
        self.accepted = 0
        self.last_sequence = 10
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def view(self) -> dict[str, Any] | None:
        if not self.assignments:
            return None
        a = self.assignments[-1]
        role = "primary" if a["primary"]["node"] == self.name else "replica"
        return {
            "space": SPACE,
            "role": role,
            "epoch": a["epoch"],
            "accepted_epoch": max(self.accepted, a["epoch"]),
            "last_sequence": self.last_sequence,
            "applied_sequence": self.last_sequence,
            "last_epoch": 1,
            "write_lease": role == "primary",
            "replicas": {},
        }

    async def start(self) -> None:
        app = web.Application()

        async def lease(request: web.Request) -> web.Response:
            view = self.view()
            return web.json_response(
                {"node": self.name, "spaces": {SPACE: view} if view is not None else {}}
            )

        async def assign(request: web.Request) -> web.Response:
            doc = await request.json()
            if doc["epoch"] < self.accepted:
                return web.json_response({"error": "stale_epoch"}, status=409)
            self.accepted = doc["epoch"]
            self.assignments.append(doc)
            return web.json_response(self.view())

        async def fence(request: web.Request) -> web.Response:
            self.accepted = max(self.accepted, (await request.json())["epoch"])
            return web.json_response({"last_epoch": 1, "last_sequence": self.last_sequence})

        async def space(request: web.Request) -> web.Response:
            return web.json_response(self.view() or {})

        app.router.add_post("/v1/lease", lease)
        app.router.add_put("/v1/spaces/{space}/assignment", assign)
        app.router.add_post("/v1/spaces/{space}/fence", fence)
        app.router.add_get("/v1/spaces/{space}", space)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fake_nodes() -> AsyncIterator[dict[NodeName, FakeSidecarServer]]:
    servers = {n: FakeSidecarServer(n) for n in NODES}
    for s in servers.values():
        await s.start()
    try:
        yield servers
    finally:
        for s in servers.values():
            await s.stop()


async def test_local_loop_gives_the_space_back_when_the_switchover_fence_raises(
    tmp_path: Path,
    fake_nodes: dict[NodeName, FakeSidecarServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = ClusterFiles(tmp_path)
    token = files.ensure_secret()
    nodes = [LocalNode(n, fake_nodes[n].port, free_port(), tmp_path / n) for n in NODES]
    said: list[str] = []
    loop = ControlLoop(
        files=files,
        nodes=nodes,
        spaces={SPACE: SpaceSpec(replicas=2, ack_policy="quorum")},
        token=token,
        say=said.append,
    )
    try:
        for _ in range(3):
            await loop.tick()
        placed = loop.spaces[SPACE].placement
        assert placed is not None and placed.epoch == 1, said
        old, target = placed.primary, placed.replicas[0]

        # The fence's HTTP call raises what aiohttp lets through from a closing transport.
        real = aiohttp.ClientSession._request

        async def failing(self: aiohttp.ClientSession, method: str, url: Any, **kw: Any) -> Any:
            if str(url).endswith("/fence"):
                raise ConnectionResetError("Cannot write to closing transport")
            return await real(self, method, url, **kw)

        monkeypatch.setattr(aiohttp.ClientSession, "_request", failing)
        files.requests.mkdir(exist_ok=True)
        request = files.requests / f"switchover-{SPACE}.json"
        request.write_text(json.dumps({"space": SPACE, "to": target}))
        loop.poll_requests()
        await loop.tick()  # begins the switchover and hands over: the fence raises

        back = loop.spaces[SPACE].placement
        assert back is not None
        assert (back.primary, back.replicas, back.epoch) == (old, placed.replicas, 3), said
        on_disk = json.loads(files.state.read_text())["spaces"][SPACE]["placement"]
        assert (on_disk["primary"], on_disk["epoch"]) == (old, 3)
        for n in NODES:
            last = fake_nodes[n].assignments[-1]
            assert (last["epoch"], last["primary"]["node"]) == (3, old), n
        assert not request.exists()
        assert any("aborted" in s and f"{old} leads again at epoch 3" in s for s in said), said

        monkeypatch.undo()
        await loop.tick()
        assert loop.spaces[SPACE].placement == back  # it stays given back (no retry locally)
        assert loop.spaces[SPACE].spec.target_primary is None
    finally:
        await loop.close()
        await asyncio.sleep(0)


async def test_node_monitor_known_follows_placements_and_leases_though_kept_between() -> None:
    # known() is kept between calls (every space's tick asks); each change must still show.
    api = KubeApi(lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"), user_agent="t/1")
    monitor = NodeMonitor(
        api=api, sidecars=cast("SidecarClient", FakeSidecars()), namespace="engram", selector={}
    )

    def record(n: str) -> NodeRecord:
        return NodeRecord(
            name=NodeName(n),
            http="127.0.0.1:1",
            address="127.0.0.1:2",
            zone=None,
            rack=None,
            renew_time=None,
        )

    monitor.records[NodeName("a")] = record("a")
    assert monitor.known() == ["a"]
    monitor.placements[SpaceId("s")] = None  # as attach leaves a space not placed yet
    monitor.set_placement(
        SpaceId("s"), Placement(primary=NodeName("b"), replicas=(NodeName("c"),), epoch=Epoch(1))
    )
    assert monitor.known() == ["a", "b", "c"]
    monitor.set_placement(
        SpaceId("s"), Placement(primary=NodeName("b"), replicas=(NodeName("d"),), epoch=Epoch(2))
    )
    assert monitor.known() == ["a", "b", "d"]
    monitor.records[NodeName("e")] = record("e")  # a Lease seen, written straight in
    assert monitor.known() == ["a", "b", "d", "e"]
    monitor.known().append(NodeName("z"))  # a caller's copy: the kept list is not touched
    assert monitor.known() == ["a", "b", "d", "e"]
    await monitor.detach(SpaceId("s"))
    assert monitor.known() == ["a", "e"]
