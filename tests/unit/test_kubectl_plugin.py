"""`kubectl engram`'s pure parts: what each command writes (intents) and the status text (view).
The commands themselves run against a real API server in tests/k8s/test_k8s_plugin.py."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from engram_operator.plugin import intents, view

NOW = datetime.datetime(2026, 12, 6, 12, 0, 0, tzinfo=datetime.UTC)


def _space(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "orders", "namespace": "engram-system"},
        "spec": {"replicas": 2, "ackPolicy": "quorum"},
        "status": status,
    }


def _row(node: str, state: str, lag: int, role: str = "replica") -> dict[str, Any]:
    return {"node": node, "role": role, "state": state, "lagEntries": lag, "lagSeconds": 0.25}


def _lease(node: str, **notes: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"engram-node-{node}",
            "labels": {"engram.io/node-lease": "true", "topology.kubernetes.io/zone": "z1"},
            "annotations": {"engram.io/http-address": f"{node}:8080", **notes},
        },
        "spec": {"renewTime": "2026-12-06T11:59:59.500000Z"},
    }


SPACE = _space(
    phase="Healthy",
    primary="e0",
    replicas=["e1", "e2"],
    epoch=3,
    ready="3/3",
    members=[
        _row("e0", "Healthy", 0, "primary"),
        _row("e1", "Lagging", 40),
        _row("e2", "Healthy", 7),
    ],
)


def test_switchover_picks_the_healthy_replica_least_behind() -> None:
    node, why = intents.switchover_target(SPACE, {})
    assert (node, why) == ("e2", "Healthy, 7 entries behind")


def test_switchover_skips_fenced_and_draining_replicas() -> None:
    flags = intents.node_flags([_lease("e2", **{"engram.io/fenced": "true"}), _lease("e1")])
    assert flags["e2"].fenced and not flags["e1"].fenced
    assert intents.switchover_target(SPACE, flags)[0] == "e1"
    flags["e1"] = intents.NodeFlags(draining=True, fenced=False)
    with pytest.raises(intents.IntentError, match="no replica to switch over to"):
        intents.switchover_target(SPACE, flags)


def test_promote_writes_target_primary_and_refuses_what_the_operator_would() -> None:
    assert intents.promote_patch(SPACE, "e1") == {"spec": {"targetPrimary": "e1"}}
    with pytest.raises(intents.IntentError, match="already leads"):
        intents.promote_patch(SPACE, "e0")
    with pytest.raises(intents.IntentError, match="not a replica"):
        intents.promote_patch(SPACE, "e9")
    paused = {**SPACE, "spec": {"paused": True}}
    with pytest.raises(intents.IntentError, match="resume orders"):
        intents.promote_patch(paused, "e1")


def test_fence_sets_and_removes_the_lease_annotation() -> None:
    assert intents.fence_patch(True) == {"metadata": {"annotations": {"engram.io/fenced": "true"}}}
    assert intents.fence_patch(False) == {"metadata": {"annotations": {"engram.io/fenced": None}}}
    assert intents.clear_target_patch() == {"spec": {"targetPrimary": None}}
    assert intents.pause_patch(True) == {"spec": {"paused": True}}


def test_overview_shows_each_replicas_lag_and_every_node() -> None:
    text = view.overview(
        "engram-system",
        [SPACE],
        [_lease("e0"), _lease("e1", **{"engram.io/draining": "true"})],
        NOW,
    )
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("SPACE"))
    row = next(line for line in lines if line.startswith("orders"))
    assert header.index("PRIMARY") == row.index("e0")  # columns line up
    assert "e1 40/0.250s Lagging, e2 7/0.250s" in row
    nodes = {line.split()[0]: line for line in lines if line.startswith("e")}
    assert "0.5s ago" in nodes["e0"] and "draining" in nodes["e1"]
    assert "no Lease" in nodes["e2"]  # a member without a Lease is shown, not hidden


def test_detail_lists_members_primary_first() -> None:
    text = view.detail(SPACE, [_lease("e0")], NOW)
    assert "Primary:" in text and "Epoch:" in text
    members = [line.split()[0] for line in text.splitlines() if line.startswith("e")]
    assert members == ["e0", "e1", "e2"]


def test_ago_reads_kubernetes_times() -> None:
    assert view.ago("2026-12-06T11:59:59.5Z", NOW) == "0.5s ago"
    assert view.ago("2026-12-06T11:57:48Z", NOW) == "2m12s ago"
    assert view.ago("2026-12-06T09:55:00Z", NOW) == "2h5m ago"
    assert view.ago(None, NOW) == view.ago("garbage", NOW) == "-"


def test_empty_namespace() -> None:
    assert view.overview("x", [], [], NOW).startswith("No MemorySpaces in namespace x.")


def test_the_operator_treats_a_fenced_node_as_draining_and_reads_its_zone() -> None:
    """The other end of `fence`: the operator's Lease reader (the sidecar never writes the
    annotation, so it stays until `fence --off`)."""
    from engram_operator.kube.nodes import parse_lease

    lease = _lease("e0", **{"engram.io/replication-address": "e0:7070"})
    rec = parse_lease(lease, {})
    assert rec is not None and not rec.draining and rec.zone == "z1"
    lease["metadata"]["annotations"]["engram.io/fenced"] = "true"
    rec = parse_lease(lease, {})
    assert rec is not None and rec.draining
