"""Retiring a space on a node, and incarnations (issue 15 item 4), through the sidecar's HTTP API:
`POST /v1/spaces/{space}/retire`, and assignments and fences that carry the MemorySpace uid.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration


def _auth(cluster: Cluster, node: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster[node].token}"}


async def _retire(cluster: Cluster, node: str, space: str, **body: Any) -> tuple[int, Any]:
    r = await cluster.request(
        "POST", node, f"/v1/spaces/{space}/retire", json_body=body, headers=_auth(cluster, node)
    )
    return r.status, r.body


def _doc(cluster: Cluster, epoch: int, incarnation: str | None) -> dict[str, Any]:
    doc = cluster.assignment_doc("n0", ["n1"], epoch=epoch)
    if incarnation is not None:
        doc["incarnation"] = incarnation
    return doc


async def test_retire_stops_the_space_and_refuses_its_incarnation(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    for n in ("n0", "n1"):
        assert (await cluster.put_assignment(n, "orders", _doc(cluster, 3, "a"))).status == 200
    await cluster.wait_healthy("orders", "n0")
    r = await cluster.write_json("n0", "orders", [{"payload": {"i": 1}}])
    assert r.status == 200

    # Another incarnation's retire is refused: that space is not the one being deleted.
    assert (await _retire(cluster, "n0", "orders", incarnation="b"))[0] == 409
    status, body = await _retire(cluster, "n0", "orders", incarnation="a", delete=False)
    assert status == 200 and body["hosted"] is True and body["kept"] is True
    assert (await cluster.write_json("n0", "orders", [{"payload": {"i": 2}}])).status == 404
    kept = cluster["n0"].data_dir / ".retired" / "orders" / "a"
    assert (kept / "wal").is_dir() and not cluster["n0"].space_dir("orders").exists()
    # Idempotent, and the retired incarnation never comes back, at any epoch.
    status, body = await _retire(cluster, "n0", "orders", incarnation="a")
    assert status == 200 and body["hosted"] is False
    r = await cluster.put_assignment("n0", "orders", _doc(cluster, 9, "a"))
    assert r.status == 409 and "retired" in str(r.body)

    # Delete: the files go, the record of the incarnation stays.
    status, body = await _retire(cluster, "n1", "orders", incarnation="a", delete=True)
    assert status == 200 and body["hosted"] is True and body["kept"] is False
    tomb = cluster["n1"].data_dir / ".retired" / "orders" / "a"
    assert tomb.is_dir() and not any(tomb.iterdir())

    # A new incarnation starts at epoch 1 on an empty log.
    for n in ("n0", "n1"):
        assert (await cluster.put_assignment(n, "orders", _doc(cluster, 1, "b"))).status == 200
    await cluster.wait_healthy("orders", "n0")
    r = await cluster.write_json("n0", "orders", [{"payload": {"i": 1}}])
    assert r.status == 200 and r.body["last_sequence"] == 1


async def test_a_new_incarnation_replaces_an_old_one_and_fences_tell_them_apart(
    cluster: Cluster,
) -> None:
    await cluster.start_nodes(2)
    for n in ("n0", "n1"):
        assert (await cluster.put_assignment(n, "orders", _doc(cluster, 5, "a"))).status == 200
    await cluster.wait_healthy("orders", "n0")
    assert (await cluster.write_json("n0", "orders", [{"payload": 1}])).status == 200
    await cluster.wait_replicated("orders", "n0", timeout=10)

    # A fence of another incarnation is refused: this log is not that space's.
    r = await cluster.request(
        "POST",
        "n1",
        "/v1/spaces/orders/fence",
        json_body={"epoch": 6, "incarnation": "b"},
        headers=_auth(cluster, "n1"),
    )
    assert r.status == 409 and r.body["error"] == "other_incarnation"

    # Incarnation b at epoch 1, below a's 5: the old one is retired (files kept), b taken.
    r = await cluster.put_assignment("n1", "orders", _doc(cluster, 1, "b"))
    assert r.status == 200 and r.body["epoch"] == 1 and r.body["last_sequence"] == 0
    assert r.body["incarnation"] == "b"
    assert (cluster["n1"].data_dir / ".retired" / "orders" / "a" / "wal").is_dir()
    # ...and a late assignment of a can't take the node back.
    assert (await cluster.put_assignment("n1", "orders", _doc(cluster, 7, "a"))).status == 409
