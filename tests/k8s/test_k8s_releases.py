"""Two releases of the chart in one namespace, each with its own operator and nodes, against a
real API server: each operator reconciles only the MemorySpaces labelled with its release
(`engram.io/release`) and places them only on its own nodes (their Leases carry the label too);
an unlabelled space is claimed by the release that claims unlabelled spaces (the default), and
left alone by one started with `--no-claim-unlabelled`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.k8s.harness import ACTIVE, Release, until

from engram_contract.kubernetes import LABEL_RELEASE

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]


def _touched(rel: Release, space: str) -> set[str]:
    """The verbs `rel`'s operator used on MemorySpace `space` (and its status), per audit log."""
    out = set()
    for ev in rel.audit([rel.operator_sa.username]):
        ref = ev.get("objectRef") or {}
        if ref.get("resource") == "memoryspaces" and ref.get("name") == space:
            out.add(f"{ev['verb']} {ref.get('subresource') or ''}".strip())
    return out


async def test_two_releases_in_one_namespace_each_reconcile_only_their_own_spaces(
    release: Release,
) -> None:
    alpha = release
    beta = Release.install(
        alpha.cp,
        alpha.namespace,
        _mkdir(alpha.root / "beta"),
        name="beta",
        values={"nodes.name": "beta-engram"},  # the pod (node) names must differ
    )
    try:
        for rel, names in ((alpha, ("a0", "a1")), (beta, ("b0", "b1"))):
            for n in names:
                rel.cluster.add_node(n, **rel.kube_flags(), kube_release=rel.name)
            await rel.cluster.start(*names)
        op_a = alpha.operator("op-alpha", "--standalone", "--release", alpha.name)
        op_b = beta.operator(
            "op-beta", "--standalone", "--release", beta.name, "--no-claim-unlabelled"
        )
        alpha.apply_space("orders", {"replicas": 1}, labels={LABEL_RELEASE: beta.name})
        # Unlabelled, with the one finalizer of operators before releases (as an upgraded
        # install has it): alpha claims it, and swaps that finalizer for its own.
        alpha.apply_space("users", {"replicas": 1}, finalizers=["engram.io/operator"])

        orders = await beta.healthy("orders", ready="2/2", timeout=30)
        users = await alpha.healthy("users", ready="2/2", timeout=30)
        assert {orders["primary"], *orders["replicas"]} == {"b0", "b1"}
        assert {users["primary"], *users["replicas"]} == {"a0", "a1"}
        labels: dict[str, Any] = alpha.space("users")["metadata"]["labels"]
        assert labels[LABEL_RELEASE] == alpha.name
        assert alpha.space("orders")["metadata"]["labels"][LABEL_RELEASE] == beta.name

        await until(lambda: op_a.metric(ACTIVE) == 1, "alpha's operator reconciles 1 space")
        await until(lambda: op_b.metric(ACTIVE) == 1, "beta's operator reconciles 1 space")
        # The audit log: neither operator wrote to the other's space (alpha's only request on
        # `orders` could be none at all: kopf's watch is a list of the whole namespace).
        assert _touched(alpha, "orders") == set(), [
            (ev.get("requestURI"), ev.get("requestObject"))
            for ev in alpha.audit([alpha.operator_sa.username])
            if (ev.get("objectRef") or {}).get("name") == "orders"
        ]
        assert "patch status" in _touched(beta, "orders")
        assert _touched(beta, "users") == set()
        assert {"patch", "patch status"} <= _touched(alpha, "users")  # its claim, then status
        await until(
            lambda: (
                alpha.space("users")["metadata"]["finalizers"]
                == ["engram.io/operator-engram-replication"]
            ),
            "alpha's finalizer in place of the old one",
        )
        assert alpha.space("orders")["metadata"]["finalizers"] == ["engram.io/operator-beta"]
        # Each node Lease names its release.
        by_node = {
            lease["metadata"]["name"]: lease["metadata"]["labels"].get(LABEL_RELEASE)
            for lease in alpha.leases()
        }
        assert by_node == {
            "engram-node-a0": alpha.name,
            "engram-node-a1": alpha.name,
            "engram-node-b0": beta.name,
            "engram-node-b1": beta.name,
        }
    finally:
        codes = [op.stop() for op in beta.operators]
        await beta.cluster.close()
        beta.kill_all()
    assert all(c in (0, None) for c in codes), codes
    assert "Traceback" not in "\n".join(op.log_text() for op in beta.operators)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
