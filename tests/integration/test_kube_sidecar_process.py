"""Real sidecar processes with their Kubernetes tasks on, against kmock's emulator over HTTP.

Two nodes start on fresh data directories with `--kube-api-url` pointing at the emulator, where a
MemorySpace's status already places them (as after a restart of the whole StatefulSet, with no
operator running). Nothing is pushed to them: they publish their Leases, find each other's
addresses there, take their roles from the status, accept and replicate writes, and the primary
reports the members back into the status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kmock
import pytest
from tests.integration.cluster import Cluster

from engram_contract.kubernetes import (
    ANNOTATION_DRAINING,
    ANNOTATION_HTTP,
    ANNOTATION_REPLICATION,
    OPERATOR_STATUS_FIELDS,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NS = "engram"
LEASES = "coordination.k8s.io/v1/leases"
SPACES = "engram.io/v1alpha1/memoryspaces"


async def until(check: Callable[[], Any], what: str, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def stored(k8s: kmock.KubernetesEmulator, key: tuple[str, str, str]) -> dict[str, Any] | None:
    try:
        obj = k8s.objects[key]
    except KeyError:
        return None
    if obj.deleted:
        return None
    raw: dict[str, Any] = obj.raw
    return raw


async def test_kube_sidecars_take_roles_from_status_and_report_members(cluster: Cluster) -> None:
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        k8s.resources[LEASES] = kmock.ResourceInfo(namespaced=True, kind="Lease", singular="lease")
        k8s.resources[SPACES] = kmock.ResourceInfo(
            namespaced=True, kind="MemorySpace", singular="memoryspace", subresources={"status"}
        )
        operator_status = {"phase": "Healthy", "primary": "n0", "replicas": ["n1"], "epoch": 2}
        k8s.objects[SPACES, NS, "tenant-a"] = {
            "apiVersion": "engram.io/v1alpha1",
            "kind": "MemorySpace",
            "metadata": {"name": "tenant-a", "namespace": NS},
            "spec": {"replicas": 1, "ackPolicy": "one"},
            "status": dict(operator_status),
        }
        url = str(server.url).rstrip("/")
        for name in ("n0", "n1"):
            cluster.add_node(
                name,
                kube_enabled="true",
                kube_api_url=url,
                kube_namespace=NS,
                status_report_interval=0.5,
            )
        await cluster.start("n0", "n1")

        for name in ("n0", "n1"):
            key = (LEASES, NS, f"engram-node-{name}")
            lease = await until(lambda key=key: stored(k8s, key), f"{name} Lease")  # type: ignore[misc]
            assert lease["metadata"]["annotations"] == {
                ANNOTATION_DRAINING: "false",
                ANNOTATION_HTTP: cluster[name].http,
                ANNOTATION_REPLICATION: cluster[name].address,
            }
            assert lease["spec"]["holderIdentity"] == name

        async def role(name: str) -> tuple[str, int] | None:
            r = await cluster.request("GET", name, "/v1/spaces/tenant-a")
            return (r.body["role"], r.body["epoch"]) if r.status == 200 else None

        async def placed() -> bool:
            return await role("n0") == ("primary", 2) and await role("n1") == ("replica", 2)

        await cluster.wait_until(placed, timeout=8, what="roles from MemorySpace status")
        assert await role("n0") == ("primary", 2)
        assert await role("n1") == ("replica", 2)

        # The Kubernetes agent vouches for its write lease only from a status read made after
        # 2 s of continuous Lease renewals (engram_sidecar.kube.agent): wait for it, bounded.
        async def leased() -> bool:
            r = await cluster.request("GET", "n0", "/v1/spaces/tenant-a")
            return r.status == 200 and r.body.get("write_lease") is True

        await cluster.wait_until(leased, timeout=10, what="n0's write lease from its renewals")
        # ackPolicy one: acknowledged once n1 holds the entries; addresses came from the Leases.
        r = await cluster.write_json("n0", "tenant-a", [{"payload": {"i": i}} for i in range(3)])
        assert r.status == 200, r
        assert r.body["last_sequence"] == 3 and r.body["epoch"] == 2

        def reported() -> dict[str, Any] | None:
            obj = stored(k8s, (SPACES, NS, "tenant-a"))
            members = (obj or {}).get("status", {}).get("members") or []
            done = [m.get("appliedSequence") for m in members] == [3, 3]
            return obj["status"] if obj and done else None

        status = await until(reported, "members reported with both at sequence 3")
        assert [(m["node"], m["role"]) for m in status["members"]] == [
            ("n0", "primary"),
            ("n1", "replica"),
        ]
        assert status["membersEpoch"] == 2 and status["maxLagEntries"] == 0
        assert {k: status[k] for k in operator_status} == operator_status
        for req in k8s:
            if req.method == "PATCH" and req.url.path.endswith("/status"):
                assert set(req.data) == {"status"}
                assert not set(req.data["status"]) & OPERATOR_STATUS_FIELDS
