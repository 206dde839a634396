"""Two releases in one namespace: which node Leases an operator with `--release` counts as its
nodes, its kopf finalizer, and the sidecar's Lease label (the end-to-end check is
tests/k8s/test_k8s_releases.py)."""

from __future__ import annotations

from typing import Any

from engram_operator.kube.handlers import LEGACY_FINALIZER, finalizer
from engram_operator.kube.nodes import parse_lease
from engram_sidecar.kube.client import lease_object


def _lease(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "engram-node-n0",
            "labels": {"engram.io/node-lease": "true", **labels},
            "annotations": {
                "engram.io/http-address": "10.0.0.1:8080",
                "engram.io/replication-address": "10.0.0.1:7070",
            },
        },
        "spec": {"renewTime": "2026-01-01T00:00:00.000000Z"},
    }


def test_an_operator_with_a_release_ignores_another_releases_nodes() -> None:
    assert parse_lease(_lease({"engram.io/release": "a"}), {}, "a") is not None
    assert parse_lease(_lease({"engram.io/release": "b"}), {}, "a") is None
    # A sidecar from before the label: still a node (an upgrade must not hide it).
    assert parse_lease(_lease({}), {}, "a") is not None
    # No release: every node, as before.
    assert parse_lease(_lease({"engram.io/release": "b"}), {}) is not None


def test_the_sidecar_labels_its_lease_with_its_release() -> None:
    body = lease_object("n0", "ns", http="h:1", replication="h:2", renew_ns=0, release="a")
    assert body["metadata"]["labels"]["engram.io/release"] == "a"
    assert parse_lease(body, {}, "a") is not None and parse_lease(body, {}, "b") is None
    plain = lease_object("n0", "ns", http="h:1", replication="h:2", renew_ns=0)
    assert "engram.io/release" not in plain["metadata"]["labels"]


def test_each_release_has_a_finalizer_of_its_own() -> None:
    assert finalizer("") == LEGACY_FINALIZER == "engram.io/operator"
    assert finalizer("alpha") != finalizer("beta")
    # The longest release name helm allows (53) still gives a valid finalizer name part (<= 63).
    assert len(finalizer("r" * 53).partition("/")[2]) <= 63
