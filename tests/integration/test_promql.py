"""Every metric the alert rules and the dashboard query is one that running sidecars export,
and a real Prometheus evaluates every one of those queries.

Two real sidecar processes replicate a quorum space with compression; after some writes the test
scrapes both nodes' /metrics and checks every `engram_replication_*` name in
deploy/prometheus/rules.yaml and deploy/grafana/engram-replication.json against what they serve.

Suffixes are matched exactly, from the exposition's TYPE lines (tests/unit/test_dashboard.py,
`exposed_names`): a counter `x` is queryable as `x_total`, a histogram as `x_bucket`, `x_sum` and
`x_count`, never as bare `x`. A labelled family without children yet (checksum failures on a
healthy link) still counts: its HELP and TYPE lines are served.

Operator metrics (`engram_replication_promotions_total`) can't come from a sidecar, and the
operator only runs against Kubernetes; they are accepted when the operator's own registry
(`engram_operator.kube.metrics.OperatorMetrics`) exports them and no sidecar does.

The second test runs Debian's `prometheus` (the package that ships promtool) against three
sidecars, with the alert rules loaded: every dashboard query must evaluate (a parse is not
enough: vector matching errors only show at evaluation), the panels that a replicating cluster
feeds must show data, the template variables must find their labels, every rule must evaluate
without error, and no alert may be pending or firing on the healthy cluster.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.integration.cluster import Cluster, IntegrationError, _die_with_parent, free_port
from tests.unit.test_dashboard import (
    RULES,
    dashboard_exprs,
    exposed_names,
    label_values_selector,
    load_dashboard,
    metric_names,
    operator_registry_names,
    query_panels,
    rule_exprs,
    substitute_variables,
)

pytestmark = pytest.mark.integration

SPACE = "promql"

# Names the scrape must hold real samples for after the traffic below (not just TYPE lines).
WITH_SAMPLES = {
    "engram_replication_lag_seconds",
    "engram_replication_lag_entries",
    "engram_replication_replica_state",
    "engram_replication_role",
    "engram_replication_epoch",
    "engram_replication_last_sequence",
    "engram_replication_wal_bytes",
    "engram_replication_write_lease_valid",
    "engram_replication_write_latency_seconds_bucket",
    "engram_replication_entries_written_total",
    "engram_replication_entries_applied_total",
    "engram_replication_entries_shipped_total",
    "engram_replication_batches_sent_total",
    "engram_replication_bytes_total",
    "engram_replication_circuit_open",
}


async def _scrape(cluster: Cluster, node: str) -> str:
    r = await cluster.request("GET", node, "/metrics", timeout=5.0)
    if r.status != 200 or not isinstance(r.body, str):
        raise IntegrationError(f"GET /metrics on {node}: {r}")
    return r.body


@pytest.mark.timeout(60)
async def test_promql_every_queried_metric_is_exported_by_live_sidecars(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    await cluster.assign(SPACE, "n0", ["n1"], ack_policy="quorum", compression=True)
    for batch in range(5):
        r = await cluster.write_json(
            "n0", SPACE, [{"payload": {"batch": batch, "i": i}} for i in range(20)]
        )
        assert r.status == 200, r
    await cluster.wait_replicated(SPACE, "n0")

    async def ticked() -> bool:  # the lag monitor has run since: the per-replica series exist
        return "engram_replication_lag_seconds{" in await _scrape(cluster, "n0")

    await cluster.wait_until(ticked, timeout=10.0, what="the lag monitor's first tick")

    texts = {n: await _scrape(cluster, n) for n in ("n0", "n1")}
    live = set().union(*(exposed_names(t) for t in texts.values()))
    sampled = {
        line.split("{", 1)[0].split(" ", 1)[0]
        for t in texts.values()
        for line in t.splitlines()
        if line and not line.startswith("#")
    }

    operator_only = operator_registry_names() - live
    queries = dashboard_exprs(load_dashboard()) + rule_exprs()
    referenced = metric_names(e for _, e in queries)
    assert len(referenced) >= 15  # the parse found the real set, not an empty one

    for where, expr in queries:
        missing = metric_names([expr]) - live - operator_only
        assert not missing, f"{where}: not exported by the sidecars or the operator: {missing}"

    # Which names were accepted only as operator metrics: listed, so a typo can't hide there.
    assert referenced & operator_only == {"engram_replication_promotions_total"}

    no_samples = WITH_SAMPLES - sampled
    assert not no_samples, f"exported but without samples after replicated writes: {no_samples}"
    assert referenced >= WITH_SAMPLES


# ---- a real Prometheus evaluates every query ------------------------------------------------

PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "engram-system"
# Panels that must show data on a replicating, written-to cluster (the others may be empty:
# no failover, no corruption, no catch-up happened).
PANELS_WITH_DATA = {
    "Spaces",
    "Replicas not Healthy",
    "Max lag",
    "Spaces without primary",
    "Open circuits",
    "Checksum failures (1h)",
    "Lag (seconds) per replica",
    "Lag (entries) per replica",
    "Replica states",
    "Write latency P50 / P99",
    "Throughput (entries/s)",
    "Shipped to replicas (entries/s)",
    "Batch size (entries per batch)",
    "Bytes on the wire",
    "Wire bytes per shipped entry",
    "Open circuit breakers",
    "Epoch per space",
    "Current primaries",
    "WAL retained on disk",
    "Last sequence",
}


def _prometheus_config(targets: dict[str, str], rules: Path) -> str:
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "engram-nodes",
                    # The labels prometheus-operator would add from the pod.
                    "static_configs": [
                        {"targets": [addr], "labels": {"namespace": NAMESPACE, "pod": node}}
                        for node, addr in targets.items()
                    ],
                }
            ],
        }
    )


def _start_prometheus(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    with (tmp_path / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call (see cluster.py)
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)


async def _api(cluster: Cluster, base: str, path: str, **params: str) -> Any:
    async with cluster.session.get(
        base + path, params=params, timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        doc = await r.json(content_type=None)
    assert doc.get("status") == "success", f"{path} {params}: {doc}"
    return doc["data"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
@pytest.mark.timeout(90)
async def test_promql_prometheus_evaluates_every_query_and_no_alert_fires(
    cluster: Cluster, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    await cluster.start_nodes(3)
    await cluster.assign(SPACE, "n0", ["n1", "n2"], ack_policy="quorum", compression=True)
    await cluster.assign("other", "n1", ["n2", "n0"], ack_policy="async")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "prometheus.yml").write_text(
        _prometheus_config({n.name: n.http for n in cluster.nodes.values()}, RULES)
    )
    proc = _start_prometheus(tmp_path, port)
    try:
        # Write for a while, so that every rate() window holds traffic.
        deadline = time.monotonic() + 8.0
        n = 0
        while time.monotonic() < deadline:
            for space, primary in ((SPACE, "n0"), ("other", "n1")):
                r = await cluster.write_json(primary, space, [{"payload": {"n": n}}])
                assert r.status == 200, r
            n += 1
            await asyncio.sleep(0.05)

        async def scraped() -> bool:
            up = await _api(cluster, base, "/api/v1/query", query="sum(up)")
            return bool(up["result"]) and float(up["result"][0]["value"][1]) == 3

        await cluster.wait_until(scraped, timeout=20, what="Prometheus to scrape all 3 nodes")

        dashboard = load_dashboard()
        empty = []
        for panel in query_panels(dashboard):
            series = 0
            for t in panel["targets"]:
                expr = substitute_variables(t["expr"]).replace("[5m]", "[10s]")
                data = await _api(cluster, base, "/api/v1/query", query=expr)
                series += len(data["result"])
            if panel["title"] in PANELS_WITH_DATA and series == 0:
                empty.append(panel["title"])
        assert not empty, f"panels without data on a replicating cluster: {empty}"

        # The variables' label_values() find the labels the panels filter on.
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector = substitute_variables(label_values_selector(var["definition"]))
            label = var["definition"].rsplit(",", 1)[1].strip(" )")
            found = await _api(
                cluster, base, f"/api/v1/label/{label}/values", **{"match[]": selector}
            )
            assert found, f"variable {var['name']}: no values for {var['definition']}"

        # Every alert rule evaluates without error, and none fires on this healthy cluster.
        async def evaluated() -> list[Any] | None:
            groups = (await _api(cluster, base, "/api/v1/rules"))["groups"]
            rules = [r for g in groups for r in g["rules"]]
            # A rule not evaluated yet reports Go's zero time.
            done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
            return rules if done else None

        rules = await cluster.wait_until(evaluated, timeout=10, what="rule evaluation")
        assert len(rules) == len(rule_exprs())
        bad = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok"}
        assert not bad, f"rules failing to evaluate: {bad}"
        # A transient condition on a loaded machine (a lag blip, a peer dialled before its
        # assignment) may make an alert pending for a moment; on a healthy cluster none stays.
        seen: list[Any] = []

        async def quiet() -> bool:
            active = (await _api(cluster, base, "/api/v1/alerts"))["alerts"]  # pending or firing
            seen[:] = active
            return not active

        try:
            await cluster.wait_until(quiet, timeout=15, what="no active alerts", interval=0.5)
        except AssertionError:
            raise AssertionError(f"alerts on a healthy cluster: {seen}") from None
    finally:
        _stop(proc)
