"""spec.batch, spec.lag and spec.catchupThreshold through the real path, and /readyz.

The settings travel in the assignment document (engram_contract.assignment.Tuning) to real
sidecar processes, whose node settings are the defaults (100-entry batches, a 10,000-entry
catch-up threshold, 1 s / 5 s lag thresholds); each test shows the space's value, not the
node's, deciding what the node does. Every wait is bounded.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.integration.cluster import Cluster, WriteLog, payloads, write_batches

from engram_contract.assignment import Tuning

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _assign(cluster: Cluster, space: str, tuning: Tuning, **kw: Any) -> None:
    doc = {**cluster.assignment_doc("n0", ["n1"], **kw), **tuning.to_json()}
    for n in ("n0", "n1"):
        r = await cluster.put_assignment(n, space, doc)
        assert r.status == 200, r


async def _write(cluster: Cluster, space: str, batches: int, per: int, tag: int = 0) -> None:
    log = WriteLog()
    await write_batches(
        cluster, "n0", space, [payloads(space, tag + b, per) for b in range(batches)], log
    )
    assert not log.refused, [str(r) for r in log.refused[:3]]


async def test_spec_batch_max_entries_and_catchup_threshold_decide_on_the_node(
    cluster: Cluster,
) -> None:
    await cluster.start_nodes(2)
    space = "tuned"
    tuning = Tuning(batch_max_entries=1, catchup_threshold=50)
    await _assign(cluster, space, tuning)
    view = await cluster.space_view("n0", space)
    assert view["tuning"] == {"batch": {"maxEntries": 1}, "catchupThreshold": 50}

    await _write(cluster, space, 1, 40)  # one request of 40 entries
    await cluster.wait_replicated(space, "n0")
    shipped = await cluster.metric(
        "n0", "engram_replication_entries_shipped_total", space=space, replica="n1"
    )
    batches = await cluster.metric(
        "n0", "engram_replication_batches_sent_total", space=space, replica="n1"
    )
    assert shipped >= 40 and batches == shipped, (batches, shipped)  # one entry per batch

    # 200 entries behind: past the space's threshold of 50 (the node's own is 10,000).
    cluster["n1"].kill()
    await _write(cluster, space, 4, 50, tag=10)
    await cluster.restart("n1")
    await cluster.wait_replicated(space, "n0")
    snaps = await cluster.metric(
        "n0", "engram_replication_catchups_total", space=space, path="snapshot"
    )
    assert snaps >= 1, "a replica past catchupThreshold catches up from a snapshot"


async def test_spec_lag_thresholds_decide_the_replica_state(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    space = "strict"
    # Critical at 1 s: a replica 1-5 s behind is Degraded here, where the node's own 5 s
    # threshold would say Lagging.
    await _assign(cluster, space, Tuning(lag_warning_seconds=0.5, lag_critical_seconds=1.0))
    await _write(cluster, space, 1, 10)
    await cluster.wait_replicated(space, "n0")
    cluster["n1"].pause()  # connected but silent: its lag in seconds grows
    try:
        await _write(cluster, space, 1, 10, tag=1)

        async def degraded() -> dict[str, Any] | None:
            rep = (await cluster.space_view("n0", space))["replicas"]["n1"]
            return rep if 1.0 < rep["lag_seconds"] < 4.0 and rep["connected"] else None

        rep = await cluster.wait_until(degraded, timeout=10.0, what="n1 1-4 s behind")
        assert rep["state"] == "Degraded", rep
    finally:
        cluster["n1"].resume()
    await cluster.wait_replicated(space, "n0")
    rep = (await cluster.space_view("n0", space))["replicas"]["n1"]
    assert rep["state"] == "Healthy", rep


async def test_readyz_waits_until_the_replica_has_heard_from_its_primary(
    cluster: Cluster,
) -> None:
    await cluster.start_nodes(2)
    space = "ready"
    await cluster.assign(space, "n0", ["n1"])
    await _write(cluster, space, 1, 10)
    await cluster.wait_replicated(space, "n0")

    async def readyz(node: str) -> tuple[int, Any]:
        r = await cluster.request("GET", node, "/readyz", timeout=2.0)
        return r.status, r.body

    assert await readyz("n1") == (200, {"ok": True, "node": "n1"})
    # n1 restarts while its primary is down: it hosts the space (from disk) but can't know it
    # is caught up, so it is not ready.
    cluster["n0"].kill()
    await cluster.restart("n1")
    status, body = await readyz("n1")
    assert status == 503 and body["error"] == "not_caught_up", body
    assert "space ready: replica has not heard from its primary n0" in body["message"], body
    await cluster.restart("n0")

    async def ready() -> bool:
        return (await readyz("n1"))[0] == 200

    await cluster.wait_until(ready, timeout=15.0, what="n1 ready once n0 is back")
    assert (await readyz("n0"))[0] == 200


async def test_the_primary_exports_the_spaces_lag_thresholds_as_the_spec_sets_them(
    cluster: Cluster,
) -> None:
    """engram_replication_lag_threshold_seconds, which the lag alerts compare each space's lag
    with: the node's own thresholds until the spec sets some, then the spec's, following a
    changed spec (the same epoch, re-sent), and only on the space's primary."""
    await cluster.start_nodes(2)
    space = "thresholds"
    name = "engram_replication_lag_threshold_seconds"

    async def exported(node: str) -> dict[str, float]:
        samples = (await cluster.metrics(node)).items()
        return {
            dict(lab)["severity"]: v
            for (n, lab), v in samples
            if n == name and dict(lab).get("space") == space
        }

    async def until_exported(want: dict[str, float]) -> None:
        async def check() -> bool:
            return await exported("n0") == want

        await cluster.wait_until(check, timeout=10.0, what=f"n0 exports {want}")

    await _assign(cluster, space, Tuning())
    await until_exported({"warning": 1.0, "critical": 5.0})  # the node's defaults
    await _assign(cluster, space, Tuning(lag_warning_seconds=10.0, lag_critical_seconds=30.0))
    await until_exported({"warning": 10.0, "critical": 30.0})
    await _assign(cluster, space, Tuning(lag_warning_seconds=2.0, lag_critical_seconds=3.0))
    await until_exported({"warning": 2.0, "critical": 3.0})
    assert await exported("n1") == {}  # a replica exports no lag series
