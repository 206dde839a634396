"""Day-2 operations against a real kube-apiserver (issue 15): deleting a MemorySpace (the
operator's finalizer, with the API server's real deletion semantics and uids), re-creating it,
and node Leases owned by their pod (the garbage collector of kube-controller-manager removes a
Lease with its pod). Processes and credentials as in test_k8s_operator.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.k8s.harness import Release, until

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]


async def test_deleting_and_recreating_a_space_through_the_api_server(release: Release) -> None:
    await release.start_nodes(3)
    release.operator("operator", "--standalone")
    release.apply_space("orders", {"replicas": 2})
    st = await release.healthy("orders")
    first_uid = release.space("orders")["metadata"]["uid"]
    assert "engram.io/operator" in release.space("orders")["metadata"]["finalizers"]
    r = await release.cluster.write_json(st["primary"], "orders", [{"payload": 1}])
    assert r.status == 200
    await release.cluster.wait_replicated("orders", st["primary"], timeout=10)

    release.cp.kubectl("delete", "msp", "orders", "-n", release.namespace, "--wait=false")
    await until(lambda: not release.space("orders"), "the MemorySpace gone", 30)
    for node in ("n0", "n1", "n2"):
        n = release.cluster[node]
        assert not n.space_dir("orders").exists()
        assert (n.data_dir / ".retired" / "orders" / first_uid / "wal").is_dir()  # Retain
    assert release.events("orders", "Retired")

    release.apply_space("orders", {"replicas": 2})
    st = await release.healthy("orders", timeout=30)
    assert st["epoch"] == 1
    assert release.space("orders")["metadata"]["uid"] != first_uid
    r = await release.cluster.write_json(st["primary"], "orders", [{"payload": 2}])
    assert r.status == 200 and r.body["last_sequence"] == 1


def _pod(name: str) -> dict[str, Any]:
    # Stored only: there is no kubelet or scheduler, so it never runs (and, unscheduled, it is
    # deleted at once).
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "sidecar", "image": "engram-replication:test"}]},
    }


async def test_a_node_lease_goes_with_its_pod(release: Release) -> None:
    if not (release.cp.bin / "kube-controller-manager").exists():
        pytest.skip("kube-controller-manager was not built: no garbage collector")
    rest = release.cp.rest()
    pods = f"/api/v1/namespaces/{release.namespace}/pods"
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases"
    pod = rest.create(pods, _pod("n0"))
    uid = pod["metadata"]["uid"]
    # As the chart's StatefulSet does: the pod's uid from the downward API.
    await release.cluster.start_nodes(1, **release.kube_flags(), kube_pod_uid=uid)

    def owned() -> dict[str, Any] | None:
        lease = rest.get_or_none(f"{leases}/engram-node-n0")
        return lease if lease and lease["metadata"].get("ownerReferences") else None

    lease = await until(owned, "the node Lease with an owner", 10)
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "n0", "uid": uid}
    ]
    # Scale-down: the pod and its sidecar go; the garbage collector removes the Lease.
    await release.cluster["n0"].stop()
    rest.delete(f"{pods}/n0")
    await until(
        lambda: rest.get_or_none(f"{leases}/engram-node-n0") is None,
        "the Lease deleted with its pod",
        60,
    )
