"""The Grafana dashboard and the alert rules only ask for what the code exports.

Checks deploy/grafana/engram-replication.json: it loads, every panel has a data source and a
query, every template variable used is defined (before the variables that use it), every PromQL
expression parses (promtool, when installed), and every metric name in it — and in
deploy/prometheus/rules.yaml — is one the sidecar's or the operator's registry exports.

The helpers here are shared with tests/integration/test_promql.py, which checks the same names
against the /metrics of running sidecars.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engram_operator.kube.metrics import OperatorMetrics
from engram_sidecar.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "engram-replication.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
PROMTOOL = shutil.which("promtool")

METRIC_RE = re.compile(r"\bengram_replication_[a-z0-9_]+\b")
# $name, ${name}, ${name:format} and the legacy [[name]]; Grafana's own start with "__".
VARIABLE_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
# What Grafana substitutes for its built-in interval variables, for parsing only.
BUILTIN_SUBSTITUTES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


# ---- shared helpers -------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and variable query."""
    out: list[tuple[str, str]] = []
    for panel in query_panels(dashboard):
        for t in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {t.get('refId')}", t.get("expr", "")))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            out.append((f"variable {var['name']!r}", label_values_selector(var["definition"])))
    return out


def label_values_selector(query: str) -> str:
    """The series selector inside Grafana's `label_values(selector, label)`."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert m is not None, f"variable query {query!r} is not label_values(selector, label)"
    return m.group(1)


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [
        (f"alert {r['alert']}", r["expr"])
        for g in doc["groups"]
        for r in g["rules"]
        if "alert" in r
    ]


def substitute_variables(expr: str) -> str:
    """A parseable stand-in for a dashboard expression: every variable replaced."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return BUILTIN_SUBSTITUTES.get(name, ".*")

    return VARIABLE_RE.sub(repl, expr)


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for e in exprs for name in METRIC_RE.findall(e)}


def exposed_names(exposition: str) -> set[str]:
    """Every series name a /metrics text can hold, from its TYPE lines (so a labelled family
    with no children yet still counts): gauge x; counter x_total (+ x_created); histogram
    x_bucket, x_sum, x_count (+ x_created); summary x, x_sum, x_count."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        if fam.type == "counter":
            out |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            out |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif fam.type == "summary":
            out |= {fam.name, fam.name + "_sum", fam.name + "_count", fam.name + "_created"}
        else:
            out.add(fam.name)
        out |= {s.name for s in fam.samples}
    return out


def sidecar_registry_names() -> set[str]:
    return exposed_names(generate_latest(Metrics(CollectorRegistry()).registry).decode())


def operator_registry_names() -> set[str]:
    return exposed_names(generate_latest(OperatorMetrics(CollectorRegistry()).registry).decode())


# ---- the dashboard --------------------------------------------------------------------------


def test_dashboard_loads_with_identity_and_panels() -> None:
    d = load_dashboard()
    assert d["uid"] == "engram-replication"
    assert d["title"]
    assert isinstance(d["schemaVersion"], int)
    panels = query_panels(d)
    assert len(panels) >= 15
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_every_panel_has_a_datasource_and_a_query() -> None:
    for panel in query_panels(load_dashboard()):
        title = panel["title"]
        assert panel.get("datasource", {}).get("uid") == "${datasource}", title
        targets = panel.get("targets", [])
        assert targets, f"panel {title!r} has no query"
        for t in targets:
            assert t.get("expr", "").strip(), f"panel {title!r} target {t.get('refId')} is empty"
            assert t.get("datasource", {}).get("uid") == "${datasource}", title
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"panel {title!r} repeats a refId"


def test_dashboard_panels_fit_the_grid_without_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(load_dashboard()):
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def test_dashboard_template_variables_resolve() -> None:
    d = load_dashboard()
    variables = d["templating"]["list"]
    names = [v["name"] for v in variables]
    assert {"datasource", "namespace", "space", "replica"} <= set(names)
    assert next(v for v in variables if v["name"] == "datasource")["query"] == "prometheus"

    used: set[str] = set()
    for s in _strings({k: v for k, v in d.items() if k != "templating"}):
        for m in VARIABLE_RE.finditer(s):
            name = m.group(1) or m.group(2) or m.group(3)
            if not name.startswith("__"):
                used.add(name)
    assert used <= set(names), f"undefined variables: {sorted(used - set(names))}"
    assert set(names) <= used | {"datasource"}, f"unused variables: {set(names) - used}"

    # A variable's own query may only use variables defined before it (Grafana resolves in order).
    for i, var in enumerate(variables):
        for m in VARIABLE_RE.finditer(json.dumps(var.get("query", ""))):
            name = m.group(1) or m.group(2) or m.group(3)
            if not name.startswith("__"):
                assert name in names[:i], f"variable {var['name']} uses ${name} before it exists"


def test_dashboard_lag_panel_draws_the_warning_and_critical_thresholds() -> None:
    lag = next(
        p for p in query_panels(load_dashboard()) if p["title"] == "Lag (seconds) per replica"
    )
    defaults = lag["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] in ("line", "line+area", "dashed")
    assert [s["value"] for s in defaults["thresholds"]["steps"]] == [None, 1, 5]
    assert defaults["unit"] == "s"


def test_dashboard_and_rules_use_only_exported_metric_names() -> None:
    exported = sidecar_registry_names() | operator_registry_names()
    for where, expr in dashboard_exprs(load_dashboard()) + rule_exprs():
        unknown = metric_names([expr]) - exported
        assert not unknown, f"{where}: no registry exports {sorted(unknown)}"
    # The dashboard draws the metrics the issue asks for.
    used = metric_names(e for _, e in dashboard_exprs(load_dashboard()))
    for name in (
        "engram_replication_lag_seconds",
        "engram_replication_lag_entries",
        "engram_replication_replica_state",
        "engram_replication_write_latency_seconds_bucket",
        "engram_replication_entries_written_total",
        "engram_replication_entries_applied_total",
        "engram_replication_bytes_total",
        "engram_replication_circuit_open",
        "engram_replication_epoch",
    ):
        assert name in used, f"the dashboard does not show {name}"


def test_exposed_names_handles_counter_histogram_and_gauge_suffixes() -> None:
    names = sidecar_registry_names()
    assert "engram_replication_write_latency_seconds_bucket" in names
    assert "engram_replication_write_latency_seconds" not in names  # a histogram has no bare series
    assert "engram_replication_bytes_total" in names
    assert "engram_replication_bytes" not in names
    assert "engram_replication_lag_seconds" in names
    assert "engram_replication_promotions_total" in operator_registry_names()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_dashboard_every_promql_expression_parses(tmp_path: Path) -> None:
    # promtool has no offline "parse this expression"; a rule file does it: `check rules` parses
    # every recording rule's expression and names the one that fails.
    exprs = dashboard_exprs(load_dashboard())
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": substitute_variables(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    index = "\n".join(f"dashboard:expr_{i} = {where}" for i, (where, _) in enumerate(exprs))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{index}"
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_substitute_variables_replaces_every_kind() -> None:
    got = substitute_variables('rate(x{a=~"$ns", b=~"${sp}", c=~"[[r]]"}[$__rate_interval])')
    assert got == 'rate(x{a=~".*", b=~".*", c=~".*"}[5m])'


# ---- the alert rules --------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_rules_pass_promtool_check() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_rules_pass_promtool_unit_tests() -> None:
    proc = _promtool("test", "rules", str(RULES.with_name("rules.test.yaml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_rules_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULES.with_name("rules.test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for alert in _alerts():
        mine = [c for c in cases if c["alertname"] == alert["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{alert['alert']}: no firing case"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert['alert']}: no silent case"


def test_rules_every_alert_has_severity_summary_and_a_runbook() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} >= {
        "EngramReplicationLagWarning",
        "EngramReplicationLagCritical",
        "EngramReplicationReplicaFailed",
        "EngramReplicationSpaceWithoutPrimary",
        "EngramReplicationSplitBrain",
        "EngramReplicationPromotionFlapping",
        "EngramReplicationChecksumFailures",
        "EngramReplicationCircuitOpen",
    }
    for a in alerts:
        name = a["alert"]
        assert a["labels"]["severity"] in ("warning", "critical"), name
        assert a["annotations"]["summary"] and a["annotations"]["description"], name
        assert a["annotations"]["runbook_url"] == f"docs/runbooks/{name}.md", name
        runbook = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert runbook.exists(), f"{name}: {runbook} is missing"
        text = runbook.read_text()
        assert text.startswith(f"# {name}\n"), f"{runbook.name}: title must be the alert's name"
        for section in ("## What it means", "## How to confirm", "## What to do"):
            assert section in text, f"{runbook.name}: no {section!r} section"
        # Confirming uses the alert's own metrics, kubectl and the node's API.
        assert "kubectl" in text and "curl" in text, f"{runbook.name}: no kubectl/curl steps"
        assert metric_names([a["expr"]]) & metric_names([text]), f"{runbook.name}: no PromQL"
