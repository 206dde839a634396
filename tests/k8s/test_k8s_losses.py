"""What an async failover lost, measured and recorded in status.lastPromotion.entriesLost by the
Kubernetes operator, as local mode records it in its decision list (engram_operator.losses).

Every node's replication address (as its Lease advertises it) is a FaultProxy in front of its
listener. The primary's streams are blackholed, so the entries it acknowledges next (ackPolicy
async: on its own WAL) reach no replica; it is SIGKILLed, a replica is promoted, and when the
old primary comes back it cuts exactly those entries by log matching. The operator then completes
the promotion record with that count and posts a FailoverLossMeasured Event. Every wait is
bounded.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.faultproxy import FaultProxy
from tests.integration.cluster import free_port
from tests.k8s.harness import Release, until

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]

UNSHIPPED = 20


async def test_the_operator_records_what_an_async_failover_lost(release: Release) -> None:
    names = ("n0", "n1", "n2")
    ports = {n: free_port() for n in names}
    for n in names:
        release.cluster.add_node(
            n, **release.kube_flags(), advertise_address=f"127.0.0.1:{ports[n]}"
        )
    await release.cluster.start(*names)
    proxies = {
        n: FaultProxy("127.0.0.1", release.cluster[n].replication_port, listen_port=ports[n])
        for n in names
    }
    for p in proxies.values():
        await p.start()
    try:
        release.operator("operator", "--standalone")
        release.apply_space("orders", {"replicas": 2, "ackPolicy": "async"})
        old = (await release.healthy("orders"))["primary"]
        r = await release.cluster.write_json(
            old, "orders", [{"payload": {"i": i}} for i in range(10)]
        )
        assert r.status == 200, r
        await release.cluster.wait_replicated("orders", old, timeout=10)

        replicas = [n for n in names if n != old]
        for n in replicas:
            proxies[n].blackhole(True)  # nothing the old primary sends arrives any more
        r = await release.cluster.write_json(
            old, "orders", [{"payload": {"i": i}} for i in range(10, 10 + UNSHIPPED)]
        )
        assert r.status == 200 and r.body["last_sequence"] == 10 + UNSHIPPED, r
        release.cluster[old].kill()

        def promoted() -> dict[str, Any] | None:
            st = release.status("orders")
            return st if st.get("epoch") == 2 and st.get("primary") in replicas else None

        st = await until(promoted, "a promotion at epoch 2", 15)
        # Only now: what the killed primary had sent (its socket buffers outlive it) has been
        # swallowed by then, and the new primary needs its own stream to the other replica.
        for n in replicas:
            proxies[n].blackhole(False)
        record = st["lastPromotion"]
        assert record["oldPrimary"] == old and record["winnerSequence"] == 10
        assert "entriesLost" not in record  # not known until the old primary rejoins

        new = st["primary"]
        r = await until(
            lambda: _write_or_none(release, new, 5), f"a write on the new primary {new}", 15
        )
        await release.cluster.start(old)  # it cuts its epoch-1 tail where the new primary's differs

        def measured() -> dict[str, Any] | None:
            rec = release.status("orders").get("lastPromotion") or {}
            return rec if rec.get("entriesLost") is not None else None

        record = await until(measured, "lastPromotion.entriesLost", 30)
        assert record["entriesLost"] == UNSHIPPED
        assert record["newEpoch"] == 2 and record["winner"] == st["primary"]
        events = await until(
            lambda: release.events("orders", "FailoverLossMeasured"), "the loss Event", 10
        )
        assert events[0]["type"] == "Warning"
        assert f"lost {UNSHIPPED} entries" in events[0]["message"]
    finally:
        for p in proxies.values():
            await p.stop()


async def _write_or_none(release: Release, node: str, count: int) -> int | None:
    r = await release.cluster.write_json(
        node, "orders", [{"payload": {"epoch": 2, "i": i}} for i in range(count)], timeout=5.0
    )
    return int(r.body["last_sequence"]) if r.status == 200 else None
