"""Least privilege, shown by the real authorizer: the chart's RBAC (files/rbac-rules.yaml, mirrored
in deploy/rbac/) is exactly what the operator and the sidecars use, and each rule is needed.

* Under the chart's rules, a whole life cycle (placement, writes, the primary SIGKILLed, a
  promotion, the old primary back and caught up, two operators peering) is run, and the API
  server's audit log is read: neither ServiceAccount was refused anything, and every
  (group, resource, verb) the Roles grant was used at least once.
* Then each rule is dropped in turn, and what breaks is seen: the server refuses the requests
  the rule covered (403 in the audit log) and the product shows the failure the rule prevents.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import pytest
import yaml
from tests.k8s.harness import CHART, NODE_SA, OPERATOR_SA, PEERING, RELEASE, Release, until

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

RULES: Final = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
ROLES: Final = {
    "operator": ("operatorRole", OPERATOR_SA),
    "node": ("nodeRole", NODE_SA),
    # The one cluster-wide grant: `get` on nodes, for the zone of each sidecar's Node.
    "node-cluster": ("nodeClusterRole", NODE_SA),
}
ZONES: Final = ["zone-a", "zone-b", "zone-c"]
Perm = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


def _granted(rules: list[dict[str, Any]]) -> set[Perm]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _perm(ev: dict[str, Any]) -> Perm | None:
    ref = ev.get("objectRef") or {}
    if not ref.get("resource"):
        return None  # discovery (/api, /apis, /version): allowed to every authenticated user
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return ref.get("apiGroup", ""), resource, ev["verb"]


def _code(ev: dict[str, Any]) -> int:
    return int((ev.get("responseStatus") or {}).get("code", 0))


async def _failover_and_catch_up(rel: Release, *, peering: bool = True) -> None:
    """The life cycle: every request the two accounts make in normal operation."""
    await rel.start_nodes(3, zones=ZONES)
    args = ("--peering", PEERING, "--peering-lifetime", "3") if peering else ("--standalone",)
    rel.operator("operator-a", *args)
    if peering:
        rel.operator("operator-b", *args)
    rel.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    old = (await rel.healthy("orders"))["primary"]
    await _write(rel, old, 10)
    await rel.cluster.wait_replicated("orders", old, timeout=10)
    rel.cluster[old].kill()

    def promoted() -> str | None:
        st = rel.status("orders")
        return st["primary"] if st.get("epoch") == 2 and st.get("primary") != old else None

    new = await until(promoted, "a promotion", 15)
    await until(lambda: _write_or_none(rel, new, 1), f"a write on {new}", 10)
    for _ in range(3):
        await _write(rel, new, 100)  # more than a batch behind: the old primary catches up
    await rel.cluster.start(old)
    await until(lambda: rel.events("orders", "ReplicaCaughtUp"), "ReplicaCaughtUp", 20)


async def _write(rel: Release, node: str, n: int) -> int:
    got = await _write_or_none(rel, node, n)
    assert got is not None, f"a write of {n} entries on {node} was refused"
    return got


async def _write_or_none(rel: Release, node: str, n: int) -> int | None:
    r = await rel.cluster.write_json(
        node, "orders", [{"payload": {"i": i}} for i in range(n)], timeout=3.0
    )
    return int(r.body["last_sequence"]) if r.status == 200 else None


async def test_chart_rbac_is_exactly_what_the_life_cycle_uses(release: Release) -> None:
    await _failover_and_catch_up(release)
    for sa in sorted({sa for _, sa in ROLES.values()}):
        username = f"system:serviceaccount:{release.namespace}:{sa}"
        events = release.audit([username])
        denied = sorted({(_perm(ev), _code(ev)) for ev in events if _code(ev) == 403}, key=str)
        assert denied == [], f"{sa}: refused {denied}"
        used = {p for ev in events if (p := _perm(ev)) is not None}
        granted = set().union(*(_granted(RULES[k]) for k, s in ROLES.values() if s == sa))
        assert used - granted == set(), f"{sa} used what no rule grants: {used - granted}"
        assert granted - used == set(), f"{sa} never used: {sorted(granted - used)}"
    # Cluster-wide, only the nodes' `get` on nodes (its ClusterRole).
    assert set(RULES) == {"operatorRole", "nodeRole", "nodeClusterRole"}
    assert RULES["nodeClusterRole"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    ]


def _drop_cases() -> list[Any]:
    return [
        pytest.param(who, i, id=f"{who}-{'/'.join(r['resources'])}-{r['apiGroups'][0] or 'core'}")
        for who, (key, _) in ROLES.items()
        for i, r in enumerate(RULES[key])
    ]


async def _not_placed(rel: Release) -> None:
    """Nodes are up and the space exists, but it gets no primary."""
    await asyncio.sleep(3)
    assert not rel.status("orders").get("primary"), rel.status("orders")


async def _no_placed_event(rel: Release) -> None:
    await rel.healthy("orders")
    await asyncio.sleep(1)
    assert rel.events("orders", "Placed") == []


async def _no_member_rows(rel: Release) -> None:
    await rel.healthy("orders")
    await asyncio.sleep(2)
    assert "members" not in rel.status("orders")


async def _writes_stop(rel: Release) -> None:
    """With the operator gone, a primary's write lease lives on the node's own Lease renewals,
    which vouch for it only after the sidecar has read MemorySpace status (engram_sidecar.kube;
    test_k8s_operator.py shows writes going on under the chart's rules). Without the read, the grant
    the operator gave lapses: writes are refused."""
    primary = (await rel.healthy("orders"))["primary"]
    assert await _write_or_none(rel, primary, 1) is not None  # the operator's grant
    for op in rel.operators:
        op.kill()
    await until(
        lambda: _refused(rel, primary), "writes on the primary refused (no write lease)", 10
    )


async def _refused(rel: Release, node: str) -> bool:
    return await _write_or_none(rel, node, 1) is None


async def _no_caught_up_event(rel: Release) -> None:
    """The catch-up happens; its Event can't be posted."""
    old = (await rel.healthy("orders"))["primary"]
    rel.cluster[old].kill()

    def promoted() -> str | None:
        st = rel.status("orders")
        return st["primary"] if st.get("epoch") == 2 and st.get("primary") != old else None

    new = await until(promoted, "a promotion", 15)
    await until(lambda: _write_or_none(rel, new, 1), f"a write on {new}", 10)
    for _ in range(3):
        await _write(rel, new, 100)
    await rel.cluster.start(old)

    async def caught_up() -> bool:
        view = await rel.cluster.space_view(new, "orders")
        return bool(view.get("caught_up"))

    await until(caught_up, "the old primary caught up", 20)
    await asyncio.sleep(1)
    assert rel.events("orders", "ReplicaCaughtUp") == []


async def _no_zones(rel: Release) -> None:
    """The nodes register, but their Leases carry no zone: placement can't spread by zone."""
    await until(lambda: len(rel.leases()) == 3, "three node Leases", 10)
    await asyncio.sleep(2)
    for le in rel.leases():
        assert "topology.kubernetes.io/zone" not in (le["metadata"].get("labels") or {}), le


# What dropping each rule breaks, by (account, resource of the rule's first entry).
BREAKS: Final[dict[tuple[str, str], Callable[[Release], Awaitable[None]]]] = {
    ("operator", "memoryspaces"): _not_placed,  # kopf can't list or watch them
    ("operator", "memoryspaces/status"): _not_placed,  # the placement can't be recorded
    ("operator", "leases"): _not_placed,  # no node is seen alive
    ("operator", "kopfpeerings"): _not_placed,  # kopf can't find its peers: it never resumes
    ("operator", "events"): _no_placed_event,
    ("node", "leases"): _not_placed,  # no node registers
    ("node", "memoryspaces"): _writes_stop,  # with the operator down
    ("node", "memoryspaces/status"): _no_member_rows,
    ("node", "events"): _no_caught_up_event,
    ("node-cluster", "nodes"): _no_zones,
}


def test_every_rule_has_its_breakage() -> None:
    keys = {
        (who, RULES[key][i]["resources"][0])
        for who, (key, _) in ROLES.items()
        for i in range(len(RULES[key]))
    }
    assert keys == set(BREAKS)


@pytest.mark.parametrize(("who", "index"), _drop_cases())
async def test_dropping_a_rule_breaks_something(release: Release, who: str, index: int) -> None:
    release.errors_expected = True  # refused requests make kopf and the sidecars log errors
    key, sa = ROLES[who]
    rule = RULES[key][index]
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    if key == "nodeClusterRole":
        # The chart's name for it: <full name>-<namespace>-node, cut to 63 characters.
        name = f"{RELEASE}-{release.namespace}-node"[:63].rstrip("-")
        role_path = f"{rbac}/clusterroles/{name}"
    else:
        role_path = f"{rbac}/namespaces/{release.namespace}/roles/{sa}"
    rest = release.cp.rest()
    role = rest.get(role_path)
    assert role["rules"] == RULES[key]
    role["rules"] = [r for i, r in enumerate(RULES[key]) if i != index]
    rest.request("PUT", role_path, role)

    await release.start_nodes(3, zones=ZONES)
    release.operator("operator", "--peering", PEERING, "--peering-lifetime", "3")
    release.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    started = time.monotonic()
    await BREAKS[who, rule["resources"][0]](release)

    covered = _granted([rule])
    username = f"system:serviceaccount:{release.namespace}:{sa}"

    def denied() -> set[Perm]:
        return {
            p
            for ev in release.audit([username])
            if _code(ev) == 403 and (p := _perm(ev)) is not None
        }

    refused = await until(denied, f"a 403 for {who} on {rule['resources']}", 10)
    assert refused <= covered, f"refused beyond the dropped rule: {refused - covered}"
    print(f"{who} without {rule}: refused {sorted(refused)} ({time.monotonic() - started:.1f} s)")
