"""Zones reach placement through the real path: each sidecar reads the Kubernetes Node its pod
runs on (`kube_node_name`, as the chart sets it from spec.nodeName), as the chart's node
ServiceAccount (its ClusterRole: `get` on nodes), copies the Node's zone onto its node Lease, and
the operator spreads every space's members over the zones it finds there.
"""

from __future__ import annotations

from typing import Any, Final

import pytest
from tests.k8s.harness import Release, until

from engram_contract.ids import NodeName, SpaceId
from engram_operator.model import NodeInfo
from engram_operator.placement import choose_members

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

ZONES: Final = ["zone-a", "zone-b", "zone-c"] * 2  # n0..n5: two nodes in each of three zones
SPACES: Final = ["orders", "payments", "carts", "search"]


def _zones(leases: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for le in leases:
        zone = (le["metadata"].get("labels") or {}).get("topology.kubernetes.io/zone")
        if zone:
            out[le["spec"]["holderIdentity"]] = zone
    return out


def test_these_spaces_would_share_a_zone_without_zone_labels() -> None:
    """The test below means something: placement blind to zones (pure rendezvous hashing)
    would put two members of at least one of these spaces in one zone."""
    blind = [NodeInfo(name=NodeName(f"n{i}"), address="x:1") for i in range(len(ZONES))]
    crowded = [
        s
        for s in SPACES
        if len({ZONES[int(m.name[1:])] for m in choose_members(SpaceId(s), blind, 3)}) < 3
    ]
    assert crowded, "every space spreads by chance: pick other space names"


async def test_three_members_land_in_three_zones(release: Release) -> None:
    await release.start_nodes(len(ZONES), zones=ZONES)
    want = {f"n{i}": z for i, z in enumerate(ZONES)}
    # Every sidecar read its Node and labelled its Lease (rack too).
    await until(lambda: _zones(release.leases()) == want, "every Lease labelled with its zone", 15)
    for le in release.leases():
        assert le["metadata"]["labels"]["engram.io/rack"] == "r1"

    release.operator("operator", "--standalone")
    for space in SPACES:
        release.apply_space(space, {"replicas": 2})

    def placed(space: str) -> list[str] | None:
        st = release.status(space)
        members = [st.get("primary"), *(st.get("replicas") or [])]
        return members if None not in members and len(members) == 3 else None

    for space in SPACES:
        members = await until(lambda s=space: placed(s), f"{space} placed", 30)
        zones = sorted(want[m] for m in members)
        assert zones == ["zone-a", "zone-b", "zone-c"], (space, members, zones)
