"""The operator and the sidecars as local processes against a real kube-apiserver, each
authenticated as the chart's ServiceAccount for its part, so the chart's RBAC, the CRD's schema
and the server's resourceVersion semantics apply to every request they make.

Three sidecars (tests.integration.cluster nodes) renew real node Leases and patch real status;
`engram-replication operator` watches through kopf and writes placement, conditions and Events.
There is no kubelet: the processes run on this machine, not in the chart's pods.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

import kopf
import pytest
from tests.k8s.harness import ACTIVE, PEERING, Release, until

from engram_operator.kube.api import KubeApi, KubeApiError
from engram_sidecar.kube.client import KubeApiError as SidecarApiError
from engram_sidecar.kube.client import KubeClient, KubeSettings

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

# The design's target is 5 s from a primary's failure to a new primary (docs/operator.md); the
# bound adds slack for a loaded, shared 2-core machine and a real API server's write latency.
FAILOVER_BOUND: Final = 10.0
PROMOTIONS: Final = 'engram_replication_promotions_total{space="orders"}'
MEMBER_KEYS: Final = {"node", "role", "appliedSequence", "lagEntries", "lagSeconds", "state"}


def _columns(text: str) -> dict[str, str]:
    """The one row of `kubectl get ... -o wide`, by column name."""
    header, row = text.splitlines()[:2]
    names = [c.strip() for c in header.split("  ") if c.strip()]
    starts = [header.index(n) for n in names]
    ends = [*starts[1:], len(row)]
    return {n: row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}


async def _write(rel: Release, node: str, ids: range) -> int:
    r = await rel.cluster.write_json(
        node, "orders", [{"payload": {"id": i}} for i in ids], timeout=5.0
    )
    assert r.status == 200, r
    return int(r.body["last_sequence"])


async def test_space_is_placed_reported_and_shown_by_kubectl(release: Release) -> None:
    await release.start_nodes(3)
    op = release.operator("operator", "--standalone")
    release.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    st = await release.healthy("orders")
    primary, replicas = st["primary"], st["replicas"]
    assert st["epoch"] == 1 and sorted([primary, *replicas]) == ["n0", "n1", "n2"]
    assert st["observedGeneration"] == 1

    assert await _write(release, primary, range(5)) == 5
    await release.cluster.wait_replicated("orders", primary, timeout=10)

    # The primary's sidecar reports the members (its fields), beside the operator's.
    def reported() -> dict[str, Any] | None:
        s = release.status("orders")
        members = s.get("members") or []
        done = len(members) == 3 and all(m.get("appliedSequence") == 5 for m in members)
        return s if done and s.get("maxLagEntries") == 0 else None

    st = await until(reported, "members at sequence 5 in status", timeout=10)
    assert [m["node"] for m in st["members"]] == [primary, *replicas]
    assert all(set(m) == MEMBER_KEYS for m in st["members"]), st["members"]
    assert st["membersEpoch"] == 1 and st["phase"] == "Healthy"
    for c in ("Ready", "Replicating"):
        assert release.condition("orders", c)["status"] == "True", c

    # kubectl shows the printer columns with the values the two writers put there.
    cells = _columns(
        release.cp.kubectl("get", "msp", "orders", "-n", release.namespace, "-o", "wide").stdout
    )
    assert (cells["PRIMARY"], cells["READY"], cells["EPOCH"], cells["PHASE"]) == (
        primary,
        "3/3",
        "1",
        "Healthy",
    )
    assert (cells["MAX LAG"], cells["LAG ENTRIES"]) == ("0", "0")
    assert (cells["REPLICAS"], cells["ACK"]) == ("2", "quorum")
    assert cells["MESSAGE"].startswith(f"primary {primary} at epoch 1")

    placed = await until(lambda: release.events("orders", "Placed"), "a Placed event", 5)
    assert placed[0]["type"] == "Normal" and placed[0]["source"]["component"] == "engram-operator"
    # Every node registered itself: a Lease each, renewed, with its addresses.
    leases = release.cp.rest().get(
        f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases",
        labelSelector="engram.io/node-lease=true",
    )["items"]
    assert sorted(le["spec"]["holderIdentity"] for le in leases) == ["n0", "n1", "n2"]
    assert op.running()


async def test_sigkill_of_the_primary_sidecar_promotes_through_the_api(release: Release) -> None:
    await release.start_nodes(3)
    release.operator("operator", "--standalone")
    release.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    old = (await release.healthy("orders"))["primary"]
    assert await _write(release, old, range(10)) == 10  # quorum: each on a majority
    await release.cluster.wait_replicated("orders", old, timeout=10)

    t0 = time.monotonic()
    release.cluster[old].kill()  # SIGKILL: its Lease stops being renewed

    def promoted() -> dict[str, Any] | None:
        st = release.status("orders")
        return st if st.get("epoch") == 2 and st.get("primary") not in (None, old) else None

    st = await until(promoted, "a promotion at epoch 2", FAILOVER_BOUND)
    new = st["primary"]
    got = await until(
        lambda: _write_or_none(release, new, range(10, 11)), f"a write on {new}", FAILOVER_BOUND
    )
    assert got == 11, "no acknowledged entry lost: the new primary continues at 11"
    print(f"failover through the API server: first write on {new} {time.monotonic() - t0:.2f} s")

    record = st["lastPromotion"]
    assert (record["winner"], record["oldPrimary"], record["newEpoch"]) == (new, old, 2)
    assert record["entriesPossiblyLost"] == 0
    ready = await until(
        lambda: (
            (c := release.condition("orders", "Ready")).get("message", "").startswith(new) and c
        ),
        "condition Ready naming the new primary",
        5,
    )
    assert (ready["status"], ready["reason"]) == ("True", "PrimaryServing")
    degraded = release.condition("orders", "Degraded")
    assert degraded["status"] == "True" and old in degraded["message"]
    assert release.condition("orders", "FailingOver")["status"] == "False"

    events = await until(lambda: release.events("orders", "Promoted"), "a Promoted event", 5)
    assert events[0]["type"] == "Warning"
    summary, _, doc = events[0]["message"].partition(" | ")
    assert summary == record["summary"]
    assert json.loads(doc)["winner"] == new

    # Writes go on with one member down (a majority of 3), then the old primary comes back:
    # it takes its role from the MemorySpace status, catches up more than a batch behind, and
    # the new primary's sidecar posts the ReplicaCaughtUp Event.
    last = 11
    for start in range(11, 311, 100):
        last = await _write(release, new, range(start, start + 100))
    assert last == 311
    await release.cluster.start(old)

    def rejoined() -> dict[str, Any] | None:
        s = release.status("orders")
        rows = {m["node"]: m for m in s.get("members") or []}
        ok = s.get("membersEpoch") == 2 and rows.get(old, {}).get("appliedSequence") == last
        return s if ok and s.get("phase") == "Healthy" else None

    st = await until(rejoined, f"{old} back as a caught-up replica, space Healthy", 20)
    assert st["ready"] == "3/3" and st["primary"] == new
    # Under quorum nothing acknowledged was lost, and the operator measures it: the old primary's
    # log proved identical to the new one's (engram_operator.losses).
    lost = await until(
        lambda: (release.status("orders").get("lastPromotion") or {}).get("entriesLost") == 0,
        "lastPromotion.entriesLost 0",
        10,
    )
    assert lost
    caught = await until(
        lambda: release.events("orders", "ReplicaCaughtUp"), "a ReplicaCaughtUp event", 10
    )
    assert old in caught[0]["message"]
    assert caught[0]["source"]["component"] == "engram-sidecar"


async def test_writes_go_on_while_the_operator_is_down(release: Release) -> None:
    """A primary's write lease outlives the operator: each Lease renewal the real API server
    accepts extends it (design-notes "write lease"), once the sidecar has read its placement
    from the MemorySpace. So an operator restart or upgrade doesn't stop writes."""
    await release.start_nodes(3)
    op = release.operator("operator", "--standalone")
    release.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    primary = (await release.healthy("orders"))["primary"]
    assert await _write(release, primary, range(1)) == 1
    op.kill()
    deadline = time.monotonic() + 5.0  # several write-lease lifetimes (1.5 s)
    n = 1
    while time.monotonic() < deadline:
        n = await _write(release, primary, range(n, n + 1))
        await asyncio.sleep(0.2)
    assert n > 10


async def test_a_restarted_primary_sidecar_leads_again_only_at_a_newer_epoch(
    release: Release,
) -> None:
    """Entries ship before the primary's fsync, so a restarted primary must not write at its
    old epoch again (design-notes): it fences itself, and the operator re-asserts it at a newer
    epoch through the API server. Automatic failover is off, so the re-assertion is the only
    way back to writes."""
    await release.start_nodes(3)
    release.operator("operator", "--standalone")
    release.apply_space(
        "orders", {"replicas": 2, "ackPolicy": "quorum", "failover": {"automatic": False}}
    )
    old = (await release.healthy("orders"))["primary"]
    assert await _write(release, old, range(10)) == 10
    await release.cluster.wait_replicated("orders", old, timeout=10)

    release.cluster[old].kill()
    await release.cluster.start(old)

    def reasserted() -> dict[str, Any] | None:
        # Epoch 3: the node accepted epoch 2 itself at start-up, and the operator picks one
        # above every epoch any member accepted.
        st = release.status("orders")
        return st if st.get("epoch") == 3 and st.get("primary") == old else None

    await until(reasserted, "the restarted primary re-asserted at epoch 3", FAILOVER_BOUND)
    got = await until(
        lambda: _write_or_none(release, old, range(10, 11)), f"a write on {old}", FAILOVER_BOUND
    )
    assert got == 11, "nothing acknowledged was lost, and the log goes on at 11"
    view = (await release.cluster.request("GET", old, "/v1/spaces/orders")).body
    assert view["epoch"] == 3 and view["fenced"] is None


async def _write_or_none(rel: Release, node: str, ids: range) -> int | None:
    r = await rel.cluster.write_json(
        node, "orders", [{"payload": {"id": i}} for i in ids], timeout=3.0
    )
    return int(r.body["last_sequence"]) if r.status == 200 else None


async def test_concurrent_status_writers_and_resource_version_conflicts(
    release: Release,
) -> None:
    """Both writers' own clients, as their ServiceAccounts: disjoint merge patches never lose
    each other's fields, and a write guarded by a stale resourceVersion is refused (409), which
    is how the operator's epoch-changing writes notice another writer (kube_driver)."""
    cp, ns = release.cp, release.namespace
    release.apply_space("orders", {"replicas": 2})
    info = kopf.ConnectionInfo(
        server=cp.url, ca_path=str(cp.ca), token=release.operator_sa.token_file.read_text()
    )
    operator_api = KubeApi(lambda: info, user_agent="engram-operator (test)")
    sidecar_api = KubeClient(
        KubeSettings(cp.url, ns, release.node_sa.token_file, cp.ca, timeout=5.0)
    )
    path = release.spaces_path("orders")
    try:
        # A guarded write after someone else wrote: refused, then done on a fresh read.
        seen = await operator_api.get_space(ns, "orders")
        rv = seen["metadata"]["resourceVersion"]
        await sidecar_api.request("PATCH", f"{path}/status", body={"status": {"membersEpoch": 1}})
        with pytest.raises(KubeApiError) as refused:
            await operator_api.patch_space_status(
                ns, "orders", {"epoch": 1, "primary": "n0"}, resource_version=rv
            )
        assert refused.value.conflict, refused.value
        fresh = await operator_api.get_space(ns, "orders")
        await operator_api.patch_space_status(
            ns,
            "orders",
            {"epoch": 1, "primary": "n0"},
            resource_version=fresh["metadata"]["resourceVersion"],
        )

        # Two operators racing on the same read (what peering prevents): exactly one wins.
        base = (await operator_api.get_space(ns, "orders"))["metadata"]["resourceVersion"]
        outcomes = await asyncio.gather(
            *(
                operator_api.patch_space_status(
                    ns, "orders", {"epoch": 2, "primary": who}, resource_version=base
                )
                for who in ("n1", "n2")
            ),
            return_exceptions=True,
        )
        wins = [o for o in outcomes if isinstance(o, dict)]
        losses = [o for o in outcomes if isinstance(o, KubeApiError) and o.conflict]
        assert (len(wins), len(losses)) == (1, 1), outcomes
        winner = wins[0]["status"]["primary"]

        # Unguarded, disjoint merge patches from both writers at once, many rounds: no
        # conflicts (the server applies each against the latest object) and nothing lost.
        async def sidecar_round(i: int) -> None:
            rows = [{"node": "n0", "role": "primary", "appliedSequence": i, "state": "Healthy"}]
            body = {"status": {"members": rows, "maxLagEntries": i}}
            await sidecar_api.request("PATCH", f"{path}/status", body=body)

        async def operator_round(i: int) -> None:
            await operator_api.patch_space_status(
                ns, "orders", {"message": f"round {i}", "observedGeneration": i}
            )

        for i in range(1, 21):
            await asyncio.gather(sidecar_round(i), operator_round(i))
        st = release.status("orders")
        assert st["members"][0]["appliedSequence"] == 20 and st["maxLagEntries"] == 20
        assert (st["message"], st["observedGeneration"]) == ("round 20", 20)
        assert (st["epoch"], st["primary"], st["membersEpoch"]) == (2, winner, 1)

        # Neither may write the other's object part: the node ServiceAccount can't touch spec.
        with pytest.raises(SidecarApiError) as forbidden:
            await sidecar_api.request("PATCH", path, body={"spec": {"paused": True}})
        assert forbidden.value.status == 403
    finally:
        await operator_api.close()
        await sidecar_api.close()


async def test_two_operators_with_peering_exactly_one_acts_and_hands_over(
    release: Release,
) -> None:
    await release.start_nodes(3)
    args = ("--peering", PEERING, "--peering-lifetime", "3")
    a = release.operator("operator-a", *args)
    await until(lambda: a.metric(ACTIVE) >= 0, "operator-a serving metrics", 20)
    b = release.operator("operator-b", *args)  # started later: lower priority, stands by
    await until(lambda: b.metric(ACTIVE) >= 0, "operator-b serving metrics", 20)
    release.apply_space("orders", {"replicas": 2})
    old = (await release.healthy("orders"))["primary"]

    # Both announce themselves in the chart's KopfPeering object; only a reconciles.
    peering = release.cp.rest().get(
        f"/apis/kopf.dev/v1/namespaces/{release.namespace}/kopfpeerings/{PEERING}"
    )
    assert {"operator-a", "operator-b"} <= set(peering.get("status") or {})
    for _ in range(10):
        assert (a.metric(ACTIVE), b.metric(ACTIVE)) == (1, 0)
        await asyncio.sleep(0.2)
    writers = {
        ev["userAgent"]
        for ev in release.audit([release.operator_sa.username])
        if ev.get("objectRef", {}).get("subresource") == "status"
    }
    assert writers == {"engram-operator (operator-a)"}, writers

    a.kill()  # the active one dies without a word: b takes over once a's entry expires
    await until(lambda: b.metric(ACTIVE) == 1, "operator-b to take over", 15)
    release.cluster[old].kill()

    def promoted() -> bool:
        st = release.status("orders")
        return st.get("epoch") == 2 and st.get("primary") not in (None, old)

    await until(promoted, "a promotion by operator-b", FAILOVER_BOUND)
    assert b.metric(PROMOTIONS) == 1
