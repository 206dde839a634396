"""The sidecar on Kubernetes, in-process, against kmock's Kubernetes emulator over real HTTP.

Each test runs one `Node` in the test's event loop and a `KubeSidecar` talking to the emulator
on 127.0.0.1: the node Lease, roles read back from MemorySpace status, member reports, and what
happens when the API server fails, is unreachable or never answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

from engram_contract.assignment import Assignment
from engram_contract.errors import ConfigError
from engram_contract.ids import NodeName
from engram_contract.kubernetes import (
    ANNOTATION_DRAINING,
    ANNOTATION_HTTP,
    ANNOTATION_REPLICATION,
    LABEL_NODE_LEASE,
    OPERATOR_STATUS_FIELDS,
    SIDECAR_STATUS_FIELDS,
)
from engram_sidecar.config import load_config
from engram_sidecar.kube.agent import KubeSidecar, member_report
from engram_sidecar.kube.client import KubeClient, KubeSettings, lease_object, micro_time, resolve
from engram_sidecar.node import Node
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable
from engram_sidecar.space.replicas import CatchUpProgress

ROOT = Path(__file__).resolve().parents[2]
NS = "engram"
LEASES = "coordination.k8s.io/v1/leases"
SPACES = "engram.io/v1alpha1/memoryspaces"
EVENTS = "v1/events"
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def until(check: Callable[[], Any], what: str, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def validate_lease(obj: dict[str, Any]) -> None:
    """Against the Kubernetes schema, when kubernetes-validate is installed."""
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        return
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def validate_memoryspace(obj: dict[str, Any]) -> None:
    """Against the CRD's openAPIV3Schema, when the CRD is there."""
    crd = ROOT / "deploy" / "crds" / "memoryspaces.engram.io.yaml"
    if not crd.exists():
        return
    import jsonschema  # type: ignore[import-untyped]

    doc = yaml.safe_load(crd.read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1alpha1"]
    jsonschema.validate(obj, version["schema"]["openAPIV3Schema"])


def memoryspace(name: str, status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "engram.io/v1alpha1",
        "kind": "MemorySpace",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": len(status.get("replicas", [])), "ackPolicy": "async", **spec},
        "status": status,
    }


def peer_lease(node: str, http: str, replication: str) -> dict[str, Any]:
    return lease_object(node, NS, http=http, replication=replication, renew_ns=time.time_ns())


async def make_node(tmp: Path, name: str, **flags: object) -> Node:
    secret = tmp / "secret"
    secret.write_text("s" * 32)
    base = {
        "node": name,
        "data_dir": str(tmp / name),
        "secret_file": str(secret),
        "replication_port": "0",
        "lag_monitor_interval": "3600",  # states change only when a test says so
        "backoff_steps": "5",
    }
    cfg = load_config(flags={**base, **{k: str(v) for k, v in flags.items()}}, env={})
    node = Node(cfg)
    await node.start()
    return node


class RecordingClient(KubeClient):
    """Keeps (time, body) of every status patch the sidecar sends."""

    def __init__(self, settings: KubeSettings) -> None:
        super().__init__(settings)
        self.sent: list[tuple[float, dict[str, Any]]] = []

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        if method == "PATCH" and path.endswith("/status"):
            self.sent.append((time.monotonic(), json.loads(json.dumps(kw["body"]))))
        return await super().request(method, path, **kw)


class Harness:
    def __init__(self, k8s: kmock.KubernetesEmulator, tmp: Path) -> None:
        self.k8s = k8s
        self.tmp = tmp
        self.url = str(k8s.url).rstrip("/")
        self.nodes: list[Node] = []
        self.sidecars: list[KubeSidecar] = []

    async def node(self, name: str = "n0", **flags: object) -> Node:
        node = await make_node(self.tmp, name, **flags)
        self.nodes.append(node)
        return node

    async def sidecar(
        self, node: Node, *, url: str | None = None, timeout: float = 0.5, settle: float = 0.5
    ) -> KubeSidecar:
        settings = KubeSettings(url or self.url, NS, None, None, timeout)
        kube = KubeSidecar(
            node,
            settings,
            http_address=f"127.0.0.1:{8000 + len(self.sidecars)}",
            replication_address=f"127.0.0.1:{node.replication_port}",
            client=RecordingClient(settings),
            settle=settle,  # the real 2 s only where a test is about it
        )
        await kube.start()
        self.sidecars.append(kube)
        return kube

    async def get(self, resource: str, name: str) -> dict[str, Any] | None:
        group_version, plural = resource.rsplit("/", 1)
        url = f"{self.url}/apis/{group_version}/namespaces/{NS}/{plural}/{name}"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            doc: dict[str, Any] | None = await r.json() if r.status == 200 else None
            return doc

    def requests(self, method: str, path_part: str) -> list[kmock.Request]:
        return [r for r in list(self.k8s) if r.method == method and path_part in r.url.path]

    async def close(self) -> None:
        for kube in self.sidecars:
            await kube.stop()
        for node in self.nodes:
            await node.stop()


@pytest.fixture
async def h(kmock: kmock.KubernetesEmulator, tmp_path: Path) -> AsyncIterator[Harness]:
    kmock.resources[LEASES] = kmock.ResourceInfo(namespaced=True, kind="Lease")
    kmock.resources[SPACES] = kmock.ResourceInfo(
        namespaced=True, kind="MemorySpace", subresources={"status"}
    )
    harness = Harness(kmock, tmp_path)
    try:
        yield harness
    finally:
        await asyncio.wait_for(harness.close(), 5)


def stored(k8s: kmock.KubernetesEmulator, key: tuple[str, str, str]) -> bool:
    try:
        return not k8s.objects[key].deleted
    except KeyError:
        return False


def metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def write(node: Node, space: str) -> tuple[int, int, int]:
    sp = node.lookup(space)
    assert sp is not None
    return await asyncio.wait_for(node.write(sp, [(1, b'{"k":1}')]), 1.0)


# ---- the node Lease ---------------------------------------------------------------------------


async def test_kube_lease_is_created_then_renewed_with_labels_and_addresses(h: Harness) -> None:
    node = await h.node("n0")
    kube = await h.sidecar(node)
    key = (LEASES, NS, "engram-node-n0")
    await until(lambda: stored(h.k8s, key), "Lease created")
    lease = await h.get(LEASES, "engram-node-n0")
    assert lease is not None
    assert lease["metadata"]["labels"] == {LABEL_NODE_LEASE: "true"}
    assert lease["metadata"]["annotations"] == {
        ANNOTATION_DRAINING: "false",
        ANNOTATION_HTTP: kube.http_address,
        ANNOTATION_REPLICATION: f"127.0.0.1:{node.replication_port}",
    }
    spec = lease["spec"]
    assert spec["holderIdentity"] == "n0"
    assert spec["leaseDurationSeconds"] == 2
    assert MICRO_TIME.match(spec["renewTime"]) and MICRO_TIME.match(spec["acquireTime"])
    validate_lease(lease)
    renewed = spec["renewTime"]
    await until(lambda: h.k8s.objects[key]["spec"]["renewTime"] > renewed, "renewTime advances")
    again = await h.get(LEASES, "engram-node-n0")
    assert again is not None and again["spec"]["acquireTime"] == spec["acquireTime"]
    # Created once, then renewed by JSON merge patches; each body a whole valid Lease.
    assert len(h.requests("POST", "/leases")) == 1
    patches = h.requests("PATCH", "/leases/engram-node-n0")
    assert patches
    for r in patches:
        assert r.headers["Content-Type"] == "application/merge-patch+json"
        validate_lease(r.data)
    assert metric(node, "engram_replication_lease_renewals_total", outcome="created") == 1
    assert metric(node, "engram_replication_lease_renewals_total", outcome="ok") >= 1
    assert metric(node, "engram_replication_lease_renewed_timestamp_seconds") > 0


async def test_kube_lease_create_race_ends_in_a_patch(h: Harness) -> None:
    # Our PATCH finds no Lease, but by the time we POST one exists (a late request of the
    # previous incarnation, say): the 409 is answered by patching it.
    h.k8s.objects[LEASES, NS, "engram-node-n0"] = peer_lease("n0", "10.0.0.9:1", "10.0.0.9:2")
    first = [True]

    def vanish_once(request: kmock.Request) -> None:
        if request.method == "PATCH" and first[0]:
            first[0] = False
            raise kmock.KubernetesObjectNotFoundError()

    h.k8s << vanish_once
    node = await h.node("n0")
    settings = KubeSettings(h.url, NS, None, None, 1.0, pod_uid="uid-of-pod-n0")
    kube = KubeSidecar(
        node, settings, http_address="127.0.0.1:1", replication_address="127.0.0.1:2"
    )
    try:
        assert await kube.renew(time.time_ns())
    finally:
        await kube.client.close()
    calls = [r.method for r in list(h.k8s) if "/leases" in r.url.path]
    assert calls == ["PATCH", "POST", "PATCH"]
    lease = await h.get(LEASES, "engram-node-n0")
    assert lease is not None
    assert lease["metadata"]["annotations"][ANNOTATION_HTTP] == "127.0.0.1:1"
    assert metric(node, "engram_replication_lease_renewals_total", outcome="ok") == 1
    assert metric(node, "engram_replication_lease_renewals_total", outcome="created") == 0


@pytest.mark.parametrize("source", ["setting", "pod", "none"])
async def test_kube_lease_is_owned_by_the_pod(h: Harness, source: str) -> None:
    """The node Lease names its pod as owner (the garbage collector deletes it with the pod):
    the uid from kube_pod_uid (the downward API), else read from the pod, else no owner."""
    if source == "pod":
        h.k8s.objects[kmock.resource("v1/pods"), NS, "n0"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "n0", "namespace": NS, "uid": "uid-read"},
        }
    node = await h.node("n0")
    uid = "uid-set" if source == "setting" else ""
    kube = KubeSidecar(
        node,
        KubeSettings(h.url, NS, None, None, 1.0, pod_uid=uid, read_pod=not uid),
        http_address="127.0.0.1:1",
        replication_address="127.0.0.1:2",
    )
    try:
        assert await kube.renew(time.time_ns())
        assert await kube.renew(time.time_ns())
    finally:
        await kube.client.close()
    lease = await h.get(LEASES, "engram-node-n0")
    assert lease is not None
    owners = lease["metadata"].get("ownerReferences") or []
    want = {"setting": "uid-set", "pod": "uid-read", "none": None}[source]
    if want is None:
        assert owners == []
    else:
        assert owners == [{"apiVersion": "v1", "kind": "Pod", "name": "n0", "uid": want}]
    pod_reads = [r for r in list(h.k8s) if "/pods/" in r.url.path]
    assert len(pod_reads) == (0 if source == "setting" else 1)  # read once, not per renewal


def test_kube_lease_object_is_a_valid_kubernetes_lease() -> None:
    lease = lease_object(
        "n0", NS, http="10.0.0.5:8080", replication="10.0.0.5:7070", renew_ns=1, acquire=True
    )
    assert lease["spec"]["renewTime"] == "1970-01-01T00:00:00.000000Z"
    validate_lease(lease)
    assert micro_time(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"


# ---- roles from MemorySpace status -------------------------------------------------------------


async def test_kube_restarted_sidecar_takes_its_roles_from_status_without_a_push(
    h: Harness,
) -> None:
    h.k8s.objects[LEASES, NS, "engram-node-n1"] = peer_lease("n1", "127.0.0.1:9", "127.0.0.1:1")
    placed = {
        "tenant-a": {"primary": "n0", "replicas": ["n1"], "epoch": 3, "phase": "Healthy"},
        "tenant-b": {"primary": "n1", "replicas": ["n0"], "epoch": 7},
        "tenant-c": {"primary": "n1", "replicas": [], "epoch": 1},  # not this node's
        "tenant-d": {"primary": "n0", "replicas": ["n2"], "epoch": 2},  # n2 has no Lease yet
        "tenant-e": {"primary": "n1", "replicas": ["n0"], "epoch": 4},  # older than on disk
        "tenant-f": {},  # not placed yet
    }
    for name, status in placed.items():
        h.k8s.objects[SPACES, NS, name] = memoryspace(name, status)
    node = await h.node("n0")
    n1 = {"node": "n1", "address": "127.0.0.1:1"}
    newer = {"epoch": 6, "primary": {"node": "n0", "address": "127.0.0.1:2"}, "replicas": [n1]}
    node.assign("tenant-e", Assignment.from_json(newer))
    await h.sidecar(node)

    def role(space: str) -> tuple[str, int] | None:
        sp = node.lookup(space)
        return None if sp is None else (sp.role, sp.assignment_epoch())

    await until(lambda: role("tenant-a") == ("primary", 3), "tenant-a led at epoch 3")
    assert role("tenant-b") == ("replica", 7)
    assert role("tenant-c") is None and role("tenant-d") is None and role("tenant-f") is None
    assert role("tenant-e") == ("primary", 6)  # a stale status is refused, not applied
    sp = node.lookup("tenant-a")
    assert sp is not None and sp.assignment is not None
    assert sp.assignment.replicas[0].address == "127.0.0.1:1"  # from n1's Lease annotation
    # Status names n0 primary at its epoch: the renewal vouches, so writes are accepted.
    await until(sp.lease_valid, "write lease from the Lease renewal")
    assert (await write(node, "tenant-a"))[2] == 3
    # tenant-e is led here by its own (disk) assignment but no status vouches for it.
    sp_e = node.lookup("tenant-e")
    assert sp_e is not None and not sp_e.lease_valid()
    with pytest.raises(NotWritable):
        await write(node, "tenant-e")
    assert not h.requests("PUT", "/")  # nothing was pushed; no object was replaced


async def test_kube_newer_status_demotes_a_primary_after_a_renewal_gap(h: Harness) -> None:
    h.k8s.objects[LEASES, NS, "engram-node-n1"] = peer_lease("n1", "127.0.0.1:9", "127.0.0.1:1")
    h.k8s.objects[SPACES, NS, "tenant-a"] = memoryspace(
        "tenant-a", {"primary": "n0", "replicas": ["n1"], "epoch": 1}
    )
    node = await h.node("n0")
    kube = await h.sidecar(node)
    sp = node.lookup("tenant-a") or await until(lambda: node.lookup("tenant-a"), "tenant-a")
    await until(sp.lease_valid, "write lease")
    # The API goes away long enough for the operator to fail over to n1 at epoch 2.
    broken = _break(h.k8s)
    await until(lambda: not sp.lease_valid(), "write lease lapsed", timeout=4)
    h.k8s.objects[SPACES, NS, "tenant-a"].patch(
        {"status": {"primary": "n1", "replicas": ["n0"], "epoch": 2}}
    )
    broken.clear()
    await until(lambda: sp.role == "replica", "demoted by the newer status after the gap")
    assert sp.assignment_epoch() == 2 and kube.synced


# ---- member reports ---------------------------------------------------------------------------


async def test_kube_status_reports_hold_only_sidecar_fields_and_are_rate_limited(
    h: Harness,
) -> None:
    operator_status = {
        "phase": "Healthy",
        "primary": "n0",
        "replicas": ["n1"],
        "epoch": 4,
        "ready": "2/2",
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Placed"}],
    }
    h.k8s.objects[LEASES, NS, "engram-node-n1"] = peer_lease("n1", "127.0.0.1:9", "127.0.0.1:1")
    h.k8s.objects[SPACES, NS, "tenant-a"] = memoryspace("tenant-a", dict(operator_status))
    node = await h.node("n0", status_report_interval=1.0)
    kube = await h.sidecar(node)
    sent = kube.client.sent  # type: ignore[attr-defined]
    sp: Space = await until(lambda: node.lookup("tenant-a"), "tenant-a assigned")
    await until(lambda: sent, "first report")
    n1 = NodeName("n1")

    # Steady writes: progress changes all the time, but reports come at most once a second.
    began, count = time.monotonic(), len(sent)
    while time.monotonic() - began < 2.2:
        await write(node, "tenant-a")
        await asyncio.sleep(0.05)
    assert 1 <= len(sent) - count <= 3, [t - began for t, _ in sent[count:]]

    # A state change is reported at once (after the 0.5 s floor), not after the interval.
    sp.replicas[n1].state = "Lagging"
    changed_at = time.monotonic()
    await until(lambda: sent[-1][1]["status"]["members"][1]["state"] == "Lagging", "Lagging")
    assert sent[-1][0] - changed_at < 0.8

    # Caught up and idle: one last report, then nothing while nothing changes.
    sp.on_ack(n1, sp.log.last_sequence)
    sp.replicas[n1].state = "Healthy"
    await until(lambda: sent[-1][1]["status"]["maxLagEntries"] == 0, "caught-up report")
    quiet = len(sent)
    await asyncio.sleep(1.5)
    assert len(sent) == quiet

    times = [t for t, _ in sent]
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(times)), times
    for _, body in sent:
        assert set(body) == {"status"}
        assert set(body["status"]) <= SIDECAR_STATUS_FIELDS
        assert not set(body["status"]) & OPERATOR_STATUS_FIELDS
    last = sent[-1][1]["status"]
    assert [m["node"] for m in last["members"]] == ["n0", "n1"]
    assert last["members"][0] == {
        "node": "n0",
        "role": "primary",
        "appliedSequence": sp.log.last_sequence,
        "lagEntries": 0,
        "lagSeconds": 0.0,
        "state": "Healthy",
    }
    assert last["members"][1]["appliedSequence"] == sp.log.last_sequence
    assert last["membersEpoch"] == 4 and MICRO_TIME.match(last["membersReportedAt"])
    obj = await h.get(SPACES, "tenant-a")
    assert obj is not None
    assert {k: obj["status"][k] for k in operator_status} == operator_status  # untouched
    validate_memoryspace(obj)
    assert [r.data for r in h.requests("PATCH", "/status")] == [body for _, body in sent]
    assert metric(node, "engram_replication_status_reports_total", outcome="ok") == len(sent)


# ---- API trouble ------------------------------------------------------------------------------


def _break(k8s: kmock.KubernetesEmulator) -> asyncio.Event:
    """Every request answers 500 while the returned event is set."""
    broken = asyncio.Event()
    broken.set()

    def fail() -> None:
        if broken.is_set():
            raise kmock.KubernetesError(status=500, message="injected")

    k8s << fail
    return broken


async def test_kube_api_errors_do_not_block_writes_while_the_write_lease_holds(
    h: Harness,
) -> None:
    h.k8s.objects[LEASES, NS, "engram-node-n1"] = peer_lease("n1", "127.0.0.1:9", "127.0.0.1:1")
    h.k8s.objects[SPACES, NS, "tenant-a"] = memoryspace(
        "tenant-a", {"primary": "n0", "replicas": ["n1"], "epoch": 1}
    )
    node = await h.node("n0")
    started = time.monotonic()
    await h.sidecar(node, settle=2.0)
    sp: Space = await until(lambda: node.lookup("tenant-a"), "tenant-a assigned")
    assert not sp.lease_valid()  # the role at once, but a write lease only once settled
    await until(sp.lease_valid, "write lease", timeout=4)  # n1 is down: only renewals vouch
    assert time.monotonic() - started >= 1.9
    broken = _break(h.k8s)
    failed_at = time.monotonic()
    # Writes go on, promptly, while the last accepted renewal's write lease (1.5 s) lasts...
    while time.monotonic() - failed_at < 0.9:
        t0 = time.monotonic()
        await write(node, "tenant-a")
        assert time.monotonic() - t0 < 0.2
        await asyncio.sleep(0.05)
    assert metric(node, "engram_replication_lease_renewals_total", outcome="failed") >= 1
    # ...then stop: nobody vouches for this primary any more.
    await until(lambda: not sp.lease_valid(), "write lease lapsed", timeout=2)
    with pytest.raises(NotWritable, match="no write lease"):
        await write(node, "tenant-a")
    # The API is back: after the gap, 2 s of renewals, then a status read, then writes again.
    lists_before = len(h.requests("GET", "/memoryspaces"))
    broken.clear()
    healed = time.monotonic()
    await until(sp.lease_valid, "write lease again", timeout=4)
    assert time.monotonic() - healed >= 1.9
    assert len(h.requests("GET", "/memoryspaces")) > lists_before
    await write(node, "tenant-a")


async def _silent_server() -> tuple[asyncio.Server, int]:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_kube_unreachable_or_silent_api_server_never_stalls_the_node(h: Harness) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    silent, port = await _silent_server()
    try:
        gone = await h.node("n0")
        mute = await h.node("n1")
        await h.sidecar(gone, url=f"http://127.0.0.1:{closed}")
        await h.sidecar(mute, url=f"http://127.0.0.1:{port}", timeout=0.2)
        worst = 0.0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.1  # the event loop (the data plane's) never waited on the API
        for node in (gone, mute):
            assert metric(node, "engram_replication_lease_renewals_total", outcome="failed") >= 2
            assert metric(node, "engram_replication_lease_renewals_total", outcome="ok") == 0
    finally:
        silent.close()


async def test_kube_client_sends_the_bearer_token(h: Harness, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    client = KubeClient(KubeSettings(h.url, NS, token, None, 1.0))
    try:
        await client.list(f"/apis/{SPACES.rsplit('/', 1)[0]}/namespaces/{NS}/memoryspaces")
    finally:
        await client.close()
    (req,) = h.requests("GET", "/memoryspaces")
    assert req.headers["Authorization"] == "Bearer tok-123"


# ---- settings ---------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **flags: str) -> Any:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    return load_config(flags={"node": "n0", "secret_file": str(secret), **flags}, env={})


def test_kube_settings_auto_is_off_outside_a_cluster_and_on_with_a_url(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    assert resolve(_cfg(tmp_path), env={}, sa_dir=sa) is None
    got = resolve(_cfg(tmp_path, kube_api_url="http://127.0.0.1:1/"), env={}, sa_dir=sa)
    assert got == KubeSettings("http://127.0.0.1:1", "default", None, None, 1.0)
    off = _cfg(tmp_path, kube_api_url="http://127.0.0.1:1", kube_enabled="false")
    assert resolve(off, env={}, sa_dir=sa) is None
    with pytest.raises(ConfigError, match="kube_enabled=true"):
        resolve(_cfg(tmp_path, kube_enabled="true"), env={}, sa_dir=sa)
    with pytest.raises(ConfigError, match="kube_token_file"):
        bad = _cfg(tmp_path, kube_api_url="http://x:1", kube_token_file=str(tmp_path / "nope"))
        resolve(bad, env={}, sa_dir=sa)


def test_kube_settings_in_cluster_use_the_service_account(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    for name, text in (("token", "t"), ("namespace", "prod\n"), ("ca.crt", "x")):
        (sa / name).write_text(text)
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    got = resolve(_cfg(tmp_path), env=env, sa_dir=sa)
    assert got == KubeSettings(
        "https://[fd00::1]:6443", "prod", sa / "token", sa / "ca.crt", 1.0, read_pod=True
    )
    explicit = _cfg(tmp_path, kube_namespace="other", kube_timeout="0.5")
    got = resolve(explicit, env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, sa_dir=sa)
    assert got is not None
    assert (got.api_url, got.namespace, got.timeout) == ("https://10.0.0.1:443", "other", 0.5)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"kube_timeout": "1.5"}, "kube_timeout"),
        ({"kube_timeout": "0"}, "kube_timeout"),
        ({"status_report_interval": "0.1"}, "status_report_interval"),
        ({"kube_enabled": "yes"}, "kube_enabled"),
    ],
)
def test_kube_settings_are_validated(tmp_path: Path, flags: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **flags)


async def test_kube_report_of_a_space_without_replicas(tmp_path: Path) -> None:
    node = await make_node(tmp_path, "n0")
    try:
        doc = {"epoch": 1, "primary": {"node": "n0", "address": "127.0.0.1:2"}}
        _, sp = node.assign("tenant-a", Assignment.from_json(doc))
        report = member_report(sp, time.time_ns())
    finally:
        await node.stop()
    assert json.loads(json.dumps(report)) == {
        "members": [
            {
                "node": "n0",
                "role": "primary",
                "appliedSequence": 0,
                "lagEntries": 0,
                "lagSeconds": 0.0,
                "state": "Healthy",
            }
        ],
        "maxLagEntries": 0,
        "maxLagSeconds": 0.0,
        "membersEpoch": 1,
    }


async def test_kube_catch_up_is_reported_in_members_and_as_an_event(h: Harness) -> None:
    h.k8s.resources[EVENTS] = kmock.ResourceInfo(namespaced=True, kind="Event")
    h.k8s.objects[LEASES, NS, "engram-node-n1"] = peer_lease("n1", "127.0.0.1:9", "127.0.0.1:1")
    h.k8s.objects[SPACES, NS, "tenant-c"] = memoryspace(
        "tenant-c", {"primary": "n0", "replicas": ["n1"], "epoch": 2}
    )
    node = await h.node("n0", status_report_interval=0.5)
    kube = await h.sidecar(node)
    sent = kube.client.sent  # type: ignore[attr-defined]
    sp: Space = await until(lambda: node.lookup("tenant-c"), "tenant-c assigned")
    n1 = NodeName("n1")
    sp.replicas[n1].catchup = CatchUpProgress("snapshot", "far behind", 0, 5000, total_bytes=1000)

    def catch_up_row() -> dict[str, Any] | None:
        for _, body in sent:
            rows = body["status"]["members"]
            if len(rows) > 1 and "catchUp" in rows[1]:
                return dict(rows[1]["catchUp"])
        return None

    row = await until(catch_up_row, "a member row with catchUp")
    assert row["phase"] == "snapshot" and row["entriesTotal"] == 5000
    sp.replicas[n1].catchup = None
    sp.caught_up.append(
        {
            "replica": "n1",
            "path": "snapshot",
            "entries": 5000,
            "bytes": 1000,
            "seconds": 1.5,
            "reason": "far behind",
            "at_ns": time.time_ns(),
        }
    )
    sp.replicas[n1].state = "Lagging"  # a material change, so a report (and the event) goes now
    await until(lambda: h.requests("POST", "/events"), "a ReplicaCaughtUp event")
    events = [r.data for r in h.requests("POST", "/events")]
    assert len(events) == 1
    ev = events[0]
    assert ev["reason"] == "ReplicaCaughtUp" and "replica n1 caught up by snapshot" in ev["message"]
    assert ev["involvedObject"]["kind"] == "MemorySpace"
    assert ev["involvedObject"]["name"] == "tenant-c"
    validate_lease(ev)  # any built-in object: kubernetes-validate checks it by its kind


async def test_kube_drain_marks_the_lease_and_waits_until_the_space_is_led_elsewhere(
    h: Harness,
) -> None:
    node = await h.node("n0")
    kube = await h.sidecar(node)
    n1 = {"node": "n1", "address": "127.0.0.1:1"}
    lead = {"epoch": 2, "primary": {"node": "n0", "address": "127.0.0.1:2"}, "replicas": [n1]}
    node.assign("tenant-a", Assignment.from_json(lead))

    async def annotation() -> str | None:
        lease = await h.get(LEASES, "engram-node-n0")
        return None if lease is None else lease["metadata"]["annotations"][ANNOTATION_DRAINING]

    async def announce() -> None:
        await kube.renew(kube.wall_ns())

    # Nobody moves the space: the drain gives up after its timeout, the Lease says draining.
    assert not await node.drain(0.2, announce=announce)
    assert await annotation() == "true"
    assert node.status()["draining"] is True
    # The operator's switchover demotes n0: the drain ends as soon as it leads nothing.
    follow = {"epoch": 3, "primary": n1, "replicas": [{"node": "n0", "address": "127.0.0.1:2"}]}
    waiting = asyncio.create_task(node.drain(10.0, announce=announce))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    node.assign("tenant-a", Assignment.from_json(follow))
    assert await asyncio.wait_for(waiting, 2.0) is True


async def test_drain_does_not_wait_for_a_space_nobody_could_take_over(tmp_path: Path) -> None:
    node = await make_node(tmp_path, "n0")
    try:
        assert node.readiness() is None  # no spaces: ready
        solo = {"epoch": 1, "primary": {"node": "n0", "address": "127.0.0.1:2"}}
        node.assign("tenant-a", Assignment.from_json(solo))
        assert node.readiness() is None  # a primary that is not fenced is in step
        assert await asyncio.wait_for(node.drain(10.0), 1.0) is True
        assert node.readiness() == "draining: shutting down"
    finally:
        await node.stop()


def test_failure_domain_comes_from_the_node_labels_each_setting_overriding() -> None:
    from engram_sidecar.kube.client import failure_domain, lease_object

    labels = {"topology.kubernetes.io/zone": "eu-1a", "engram.io/rack": "r7", "other": "x"}
    assert failure_domain(labels) == {
        "topology.kubernetes.io/zone": "eu-1a",
        "engram.io/rack": "r7",
    }
    assert failure_domain(labels, zone="eu-1b") == {
        "topology.kubernetes.io/zone": "eu-1b",
        "engram.io/rack": "r7",
    }
    assert failure_domain({}) == {}
    lease = lease_object(
        "n0", "ns", http="h:1", replication="h:2", renew_ns=0, domain=failure_domain(labels)
    )
    assert lease["metadata"]["labels"] == {
        "engram.io/node-lease": "true",
        "topology.kubernetes.io/zone": "eu-1a",
        "engram.io/rack": "r7",
    }
