"""Day-2 operations of the Kubernetes operator against kmock (issue 15): deleting a MemorySpace
(the finalizer retires it on every node, keeping or deleting its files) and re-creating it under
the same name, which is a new space (a new uid) that starts again at epoch 1.

Same set-up as test_operator.py (its `env` fixture): kopf against kmock's emulator, three real
sidecars whose node Leases the harness renews.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.integration import test_operator as base
from tests.integration.kube_harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

env = base.env
Env = base.Env


async def _gone(e: Env, name: str) -> None:
    await wait_for(lambda: not e.kube.space(name), timeout=20, what=f"MemorySpace {name} gone")


async def _hosted(e: Env, node: str, space: str) -> bool:
    r = await e.cluster.request("GET", node, f"/v1/spaces/{space}")
    return r.status == 200


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
async def test_deleting_a_space_retires_it_everywhere_and_a_recreated_one_starts_fresh(
    env: Env, policy: str
) -> None:
    env.operator("operator", "--standalone")
    await env.kube.create_space("orders", {"replicas": 2, "deletionPolicy": policy}, uid="life-1")
    st = await env.healthy("orders")
    primary = st["primary"]
    for i in range(3):
        assert await env.write(primary, "orders", i) == i + 1
    await env.cluster.wait_replicated("orders", primary, timeout=10)
    # The finalizer is on the object before anyone deletes it.
    assert "engram.io/operator" in env.kube.space("orders")["metadata"]["finalizers"]

    await env.kube.delete_space("orders")
    await _gone(env, "orders")
    for node in ("n0", "n1", "n2"):
        assert not await _hosted(env, node, "orders"), f"{node} still hosts orders"
        n = env.cluster[node]
        assert not n.space_dir("orders").exists()
        tomb = n.data_dir / ".retired" / "orders" / "life-1"
        assert tomb.is_dir(), f"{node}: no record of the retired incarnation"
        kept = (tomb / "wal").is_dir()
        assert kept == (policy == "Retain"), f"{node}: files kept={kept} under {policy}"
    retired = env.kube.events("orders", "Retired")
    assert retired and "n0, n1, n2" in retired[0]["message"]
    # The old primary takes no more writes.
    r = await env.cluster.write_json(primary, "orders", [{"payload": {"late": 1}}], timeout=3.0)
    assert r.status == 404

    # Re-created under the same name: a new space (new uid) at epoch 1, on empty logs.
    await env.kube.create_space("orders", {"replicas": 2}, uid="life-2")

    def placed() -> dict[str, Any] | None:
        s = env.kube.status("orders")
        return s if s.get("phase") == "Healthy" and s.get("epoch") == 1 else None

    st = await wait_for(placed, timeout=25, what="the re-created space Healthy at epoch 1")
    assert await env.write(st["primary"], "orders", 0) == 1  # a new log: sequence 1 again
    view = await env.cluster.space_view(st["primary"], "orders")
    assert view["incarnation"] == "life-2"


async def test_a_node_that_missed_the_deletion_gives_way_to_the_new_space(env: Env) -> None:
    """A node down while its space was deleted still holds the old incarnation (at a higher
    epoch) when the space is re-created: it retires the old one (files kept) and joins the new
    one, and is never elected with the old log."""
    env.operator("operator", "--standalone")
    await env.kube.create_space("orders", {"replicas": 2}, uid="life-1")
    st = await env.healthy("orders")
    primary = st["primary"]
    await env.kube.patch_spec("orders", {"targetPrimary": st["replicas"][0]})  # epoch 2
    st = await wait_for(
        lambda: (
            (s := env.kube.status("orders")).get("epoch") == 2 and s.get("phase") == "Healthy" and s
        ),
        timeout=15,
        what="epoch 2",
    )
    for i in range(4):
        assert await env.write(st["primary"], "orders", i) == i + 1
    await env.cluster.wait_replicated("orders", st["primary"], timeout=10)
    away = primary  # now a replica at epoch 2
    await env.cluster[away].stop()
    env.leases.stop(away)
    await env.kube.delete_space("orders")
    await _gone(env, "orders")  # the down node is not waited for
    await env.cluster.start(away)
    await env.leases.start(away)
    assert (await env.cluster.space_view(away, "orders"))["accepted_epoch"] == 2

    await env.kube.create_space("orders", {"replicas": 2}, uid="life-2")

    def healthy() -> dict[str, Any] | None:
        s = env.kube.status("orders")
        return s if s.get("phase") == "Healthy" and s.get("ready") == "3/3" else None

    st = await wait_for(healthy, timeout=30, what="the re-created space on all three nodes")
    assert st["epoch"] == 1
    view = await env.cluster.space_view(away, "orders")
    assert (view["incarnation"], view["epoch"], view["last_sequence"]) == ("life-2", 1, 0)
    old = env.cluster[away].data_dir / ".retired" / "orders" / "life-1"
    assert (old / "wal").is_dir()  # the old incarnation's files, kept


@pytest.mark.parametrize("env", ["sidecars"], indirect=True)
async def test_a_node_back_after_the_deletion_retires_the_orphaned_space(env: Env) -> None:
    """Sidecars that read the API themselves: a node down while its space was deleted finds,
    at its next read of the MemorySpaces, that the object is gone, and retires the space."""
    env.operator("operator", "--standalone")
    await env.kube.create_space("orders", {"replicas": 2}, uid="life-1")
    st = await env.healthy("orders")
    away = st["replicas"][0]
    assert await env.write(st["primary"], "orders", 1) == 1
    await env.cluster.wait_replicated("orders", st["primary"], timeout=10)
    await env.cluster[away].stop()
    await env.kube.delete_space("orders")
    await _gone(env, "orders")
    assert env.cluster[away].space_dir("orders").is_dir()  # missed the retire round

    await env.cluster.start(away)
    await wait_for(
        lambda: _hosted_not(env, away), timeout=15, what=f"{away} to retire the orphaned space"
    )
    old = env.cluster[away].data_dir / ".retired" / "orders" / "life-1"
    assert (old / "wal").is_dir()


async def _hosted_not(e: Env, node: str) -> bool:
    return not await _hosted(e, node, "orders")


async def _probe(e: Env, op: base.OperatorProcess, path: str) -> int:
    url = f"http://127.0.0.1:{op.metrics_port}{path}"
    async with e.kube.session.get(url) as r:
        return r.status


async def test_a_missing_peering_object_is_loud_and_not_ready(env: Env) -> None:
    op = env.operator("operator", "--peering", base.PEERING)
    await env.kube.create_space("orders", {"replicas": 2})
    await wait_for(
        lambda: "KopfPeering engram/engram-operator is missing" in op.log_text(),
        timeout=15,
        what="an ERROR about the missing KopfPeering",
    )
    assert " ERROR " in next(line for line in op.log_text().splitlines() if "is missing" in line)
    assert await op.metric("engram_replication_operator_peering_missing") == 1
    assert await op.metric("engram_replication_operator_leader") == 0
    assert await _probe(env, op, "/readyz") == 503
    assert await _probe(env, op, "/healthz") == 200  # a restart would not create the object
    assert not env.kube.status("orders")  # paused: nothing reconciled

    await env.kube.create_peering(base.PEERING)

    async def ready() -> bool:
        return await _probe(env, op, "/readyz") == 200

    await wait_for(ready, timeout=20, what="/readyz once the KopfPeering exists")
    await env.healthy("orders")
    assert await op.metric("engram_replication_operator_peering_missing") == 0

    async def leads() -> bool:
        return await op.metric("engram_replication_operator_leader") == 1

    await wait_for(leads, timeout=15, what="operator_leader 1")


async def test_the_leader_metric_names_the_one_active_replica(env: Env) -> None:
    await env.kube.create_peering(base.PEERING)
    first = env.operator("first", "--peering", base.PEERING)
    await env.kube.create_space("orders", {"replicas": 2})
    await env.healthy("orders")
    second = env.operator("second", "--peering", base.PEERING)

    async def settled() -> tuple[float, float] | None:
        got = (
            await first.metric("engram_replication_operator_leader", -1),
            await second.metric("engram_replication_operator_leader", -1),
        )
        return got if got == (1, 0) else None

    await wait_for(settled, timeout=20, what="first active (1), second standing by (0)")
    assert await second.metric(base.ACTIVE) == 0
    for op in (first, second):
        assert await _probe(env, op, "/readyz") == 200
        assert await _probe(env, op, "/healthz") == 200
