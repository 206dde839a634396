"""The Helm chart, the Dockerfile, and the copies they hold of files kept elsewhere.

Helm templates are Go templates, not YAML, until helm renders them. Where `helm` is built
(`make k8s-tools`, from the module pinned in tools/k8s/; CI builds it whenever Go is present) or
installed, the chart is linted and rendered (default values and ci/full-values.yaml) and the
output checked; tests/k8s/test_k8s_chart.py then installs it on a real API server. Without helm
those tests skip, and the static checks below still run: the values against their schema, the
copies of the CRD, the alert rules, the dashboard and the RBAC rules against their sources, block
structure, every `include` and `.Values` path, every ENGRAM_* variable the templates set, and
the Dockerfile's stages, user, entrypoint and ports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from engram_operator.cli import _parser
from engram_sidecar.config import load_config, setting_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "engram-replication"
TEMPLATES = CHART / "templates"


def _helm_binary() -> str | None:
    """The helm that `make k8s-tools` builds from its pinned module (tools/k8s/), else one on
    PATH. Its build stamps in the Kubernetes version helm assumes without a cluster (1.36), so
    the chart's kubeVersion constraint is judged against a current one."""
    from tests.k8s import tools

    built = tools.find("helm")
    return str(built) if built is not None else shutil.which("helm")


HELM = _helm_binary()
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="helm is not built: `make k8s-tools` builds it from tools/k8s (needs Go); "
    "static checks only",
)

# Sidecar settings the node StatefulSet sets itself (not through nodes.sidecar.config).
CHART_SET = {
    "engram_data_root",  # tail mode only (nodes.engram.enabled and nodes.engram.tail)
    "node",
    "data_dir",
    "http_host",
    "http_port",
    "replication_host",
    "replication_port",
    "advertise_address",
    "advertise_http_address",
    "secret_file",
    "kube_namespace",
    "kube_node_name",  # from spec.nodeName, with nodes.topology.nodeLabels (the default)
    "kube_pod_uid",  # the downward API's metadata.uid
    "kube_release",  # the release name: the node Lease's engram.io/release label
}
# Set by the chart, and also offered in nodes.sidecar.config (then checked against other values).
DERIVED = {"drain_timeout"}  # from terminationGracePeriodSeconds unless set, always below it
# Sidecar settings the chart refuses, with the reason in its `fail` message.
REFUSED = {"admin_token_file"}  # the operator and the nodes share the replication secret


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


def _merge(base: Any, over: Any) -> Any:
    """Helm's values merge: maps merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


# ---- Chart.yaml and values --------------------------------------------------------------------


def test_chart_metadata_is_well_formed() -> None:
    chart = _yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "engram-replication" == CHART.name
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", chart["version"])
    assert chart["appVersion"] == "0.1.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject, "appVersion is the package version"
    assert chart["description"]


def test_chart_values_validate_against_the_schema() -> None:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    values = _yaml(CHART / "values.yaml")
    jsonschema.validate(values, schema)
    full = _merge(values, _yaml(CHART / "ci" / "full-values.yaml"))
    jsonschema.validate(full, schema)


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"nodes": {"replica": 3}}, "a misspelt key"),
        ({"nodes": {"sidecar": {"config": {"batch_size": 5}}}}, "an unknown sidecar setting"),
        ({"nodes": {"sidecar": {"config": {"node": "x"}}}}, "a setting the chart sets itself"),
        ({"nodes": {"sidecar": {"config": {"fsync": "sometimes"}}}}, "a bad choice"),
        ({"nodes": {"podAntiAffinity": "always"}}, "a bad anti-affinity mode"),
        ({"nodes": {"engram": {"enabled": True}}}, "Engram without an image"),
        ({"image": {"digest": "latest"}}, "a digest that is not sha256"),
    ],
)
def test_chart_schema_refuses_bad_values(override: dict[str, Any], why: str) -> None:
    values = _merge(_yaml(CHART / "values.yaml"), override)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, _schema())
        pytest.fail(f"accepted {why}")


def test_chart_schema_knows_every_sidecar_setting() -> None:
    config = _schema()["properties"]["nodes"]["properties"]["sidecar"]["properties"]["config"]
    offered = set(config["properties"])
    settings = set(setting_names())
    assert offered <= settings, f"schema offers settings the sidecar lacks: {offered - settings}"
    missing = settings - CHART_SET - offered - REFUSED
    assert not missing, (
        f"sidecar settings the chart can't pass: {sorted(missing)}; add them to "
        "nodes.sidecar.config in deploy/helm/engram-replication/values.schema.json"
    )
    assert not offered & (CHART_SET | REFUSED)
    assert offered >= DERIVED


# ---- copies of files kept elsewhere -----------------------------------------------------------


def test_chart_crds_are_copies_of_deploy_crds() -> None:
    source = ROOT / "deploy" / "crds"
    if not source.is_dir():
        pytest.skip("deploy/crds/ does not exist yet")
    ours = {p.name for p in (CHART / "crds").glob("*.yaml")}
    for crd in sorted(source.glob("*.yaml")):
        assert crd.name in ours, f"crds/{crd.name} is missing from the chart"
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes(), (
            f"the chart's crds/{crd.name} differs from deploy/crds/{crd.name}: copy it again"
        )
    # Besides the project's CRDs, only kopf's peering CRD (the operator's HA needs it).
    extra = ours - {p.name for p in source.glob("*.yaml")}
    assert extra == {"kopfpeerings.kopf.dev.yaml"}
    peering = _yaml(CHART / "crds" / "kopfpeerings.kopf.dev.yaml")
    assert (peering["spec"]["group"], peering["spec"]["names"]["kind"]) == (
        "kopf.dev",
        "KopfPeering",
    )
    assert peering["spec"]["scope"] == "Namespaced"


def test_chart_rules_and_dashboard_are_copies() -> None:
    files = CHART / "files"
    assert (files / "prometheus-rules.yaml").read_bytes() == (
        ROOT / "deploy" / "prometheus" / "rules.yaml"
    ).read_bytes(), "copy deploy/prometheus/rules.yaml to the chart's files/prometheus-rules.yaml"
    assert (files / "engram-replication.json").read_bytes() == (
        ROOT / "deploy" / "grafana" / "engram-replication.json"
    ).read_bytes(), "copy deploy/grafana/engram-replication.json to the chart's files/"


def _rbac_source() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name, key in (("operator.yaml", "operator"), ("node.yaml", "node")):
        for doc in yaml.safe_load_all((ROOT / "deploy" / "rbac" / name).read_text()):
            if doc and doc["kind"] in ("Role", "ClusterRole"):
                out[key + doc["kind"]] = doc["rules"]
    return out


def test_chart_rbac_rules_mirror_deploy_rbac() -> None:
    if not (ROOT / "deploy" / "rbac" / "operator.yaml").exists():
        pytest.skip("deploy/rbac/ does not exist yet")
    ours = _yaml(CHART / "files" / "rbac-rules.yaml")
    assert ours == _rbac_source(), "files/rbac-rules.yaml differs from deploy/rbac/*.yaml"


def _rules_of(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        for v in doc.values():
            if isinstance(v, list):
                for rule in v:
                    if isinstance(rule, dict) and "verbs" in rule:
                        yield rule


def test_chart_rbac_has_no_wildcards() -> None:
    for rule in _rules_of(_yaml(CHART / "files" / "rbac-rules.yaml")):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
    for name, text in _templates().items():
        assert not re.search(r"""[\[\s,]["']?\*["']?\s*[\],\n]""", text), f"{name}: a wildcard"


# ---- templates, statically -------------------------------------------------------------------

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def test_chart_template_blocks_are_balanced() -> None:
    for name, text in _templates().items():
        depth = 0
        for m in _ACTION.finditer(text):
            action = m.group(1)
            if action.startswith("/*"):
                continue
            word = action.split()[0] if action.split() else ""
            if word in ("if", "with", "range", "define", "block"):
                depth += 1
            elif word == "end":
                depth -= 1
                assert depth >= 0, f"{name}: `end` without a block at offset {m.start()}"
        assert depth == 0, f"{name}: {depth} block(s) not closed"


def test_chart_includes_name_defined_templates() -> None:
    texts = _templates()
    defined = {m for t in texts.values() for m in re.findall(r'define\s+"([^"]+)"', t)}
    for name, text in texts.items():
        for used in re.findall(r'(?:include|template)\s+"([^"]+)"', text):
            assert used in defined, f"{name}: include of undefined template {used!r}"


def _has_path(values: Any, path: list[str]) -> bool:
    for part in path:
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def test_chart_values_referenced_by_templates_exist() -> None:
    values = _yaml(CHART / "values.yaml")
    for name, text in _templates().items():
        aliases = dict(re.findall(r"\$(\w+)\s*:=\s*\.Values\.([\w.]+)", text))
        refs = [p.split(".") for p in re.findall(r"\.Values\.([\w.]+)", text)]
        for alias, base in aliases.items():
            refs += [
                [*base.split("."), *p.split(".")] for p in re.findall(rf"\${alias}\.([\w.]+)", text)
            ]
            # An alias of an alias: $sc := $n.sidecar
            for sub, rest in re.findall(rf"\$(\w+)\s*:=\s*\${alias}\.([\w.]+)", text):
                for p in re.findall(rf"\${sub}\.([\w.]+)", text):
                    refs.append([*base.split("."), *rest.split("."), *p.split(".")])
        for path in refs:
            assert _has_path(values, path), (
                f"{name}: .Values.{'.'.join(path)} is not in values.yaml"
            )


def test_chart_statefulset_disables_service_links_and_sets_only_real_settings() -> None:
    sts = (TEMPLATES / "nodes-statefulset.yaml").read_text()
    # Kubernetes would otherwise inject ENGRAM_*_SERVICE_HOST and friends, which the sidecar
    # refuses as unknown settings.
    assert re.search(r"^\s+enableServiceLinks: false$", sts, re.M)
    assert re.search(
        r"^\s+enableServiceLinks: false$",
        (TEMPLATES / "operator-deployment.yaml").read_text(),
        re.M,
    )
    env = set(re.findall(r"- name: (ENGRAM_\w+)", sts))
    known = {"ENGRAM_" + s.upper() for s in setting_names()}
    assert env <= known, f"not sidecar settings: {env - known}"
    assert env == {"ENGRAM_" + s.upper() for s in CHART_SET | DERIVED}
    # The node name comes from the pod name, the advertised address from the pod IP.
    assert re.search(
        r"name: ENGRAM_NODE\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata.name", sts
    )
    assert re.search(r"name: POD_IP\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: status.podIP", sts)
    assert '"$(POD_IP):{{ $sc.replicationPort }}"' in sts
    assert re.search(r"name: ENGRAM_DATA_DIR\n\s+value: /data", sts)


def _env_value(v: Any) -> str:
    """The chart's engram-replication.envValue: lists comma-joined, whole numbers as integers."""
    if isinstance(v, list):
        return ",".join(_env_value(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


@pytest.mark.parametrize("values_file", [None, "ci/full-values.yaml", "ci/engram-tail-values.yaml"])
def test_chart_sidecar_accepts_the_environment_the_chart_gives_it(
    values_file: str | None, tmp_path: Path
) -> None:
    """What the StatefulSet sets (its fixed variables and nodes.sidecar.config) is a valid
    sidecar configuration: a bad value would stop every node with exit status 2."""
    values = _yaml(CHART / "values.yaml")
    if values_file:
        values = _merge(values, _yaml(CHART / values_file))
    sc = values["nodes"]["sidecar"]
    secret = tmp_path / "shared-secret"
    secret.write_text("s" * 48)
    env = {
        "ENGRAM_NODE": "engram-0",
        "ENGRAM_KUBE_NAMESPACE": "engram-system",
        "ENGRAM_KUBE_POD_UID": "6f1c0f9e-2b7a-4c43-9d59-3c0b7e0d1a11",
        "ENGRAM_DATA_DIR": str(tmp_path / "data"),
        "ENGRAM_HTTP_HOST": "0.0.0.0",
        "ENGRAM_HTTP_PORT": str(sc["httpPort"]),
        "ENGRAM_REPLICATION_HOST": "0.0.0.0",
        "ENGRAM_REPLICATION_PORT": str(sc["replicationPort"]),
        "ENGRAM_ADVERTISE_ADDRESS": f"10.0.0.5:{sc['replicationPort']}",
        "ENGRAM_ADVERTISE_HTTP_ADDRESS": f"10.0.0.5:{sc['httpPort']}",
        "ENGRAM_SECRET_FILE": str(secret),
        "ENGRAM_ENGRAM_DATA_ROOT": str(tmp_path / "engram"),
        "ENGRAM_KUBE_NODE_NAME": "ip-10-0-1-17.eu-west-1.compute.internal",
        "ENGRAM_DRAIN_TIMEOUT": "25",
        "ENGRAM_KUBE_RELEASE": "engram-replication",
    }
    assert set(env) == {"ENGRAM_" + s.upper() for s in CHART_SET | DERIVED}
    env |= {"ENGRAM_" + k.upper(): _env_value(v) for k, v in sc["config"].items()}
    cfg = load_config(env=env)
    assert cfg.node == "engram-0"
    assert cfg.advertise_address == f"10.0.0.5:{sc['replicationPort']}"
    for key, value in sc["config"].items():
        got = getattr(cfg, key)
        want = tuple(float(x) for x in value) if isinstance(value, list) else value
        assert got == want, f"{key}: the sidecar read {got!r}, the values say {value!r}"


def test_chart_statefulset_probes_storage_and_spreading() -> None:
    sts = (TEMPLATES / "nodes-statefulset.yaml").read_text()
    assert re.search(r"readinessProbe:\n\s+httpGet:\n\s+path: /readyz", sts)
    assert re.search(r"livenessProbe:\n\s+httpGet:\n\s+path: /healthz", sts)
    assert "volumeClaimTemplates:" in sts
    assert "persistentVolumeClaimRetentionPolicy:" in sts
    assert "podAntiAffinity:" in sts
    values = _yaml(CHART / "values.yaml")["nodes"]
    assert values["persistence"]["retentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert values["podDisruptionBudget"] == {"enabled": True, "maxUnavailable": 1}
    pdb = (TEMPLATES / "nodes-pdb.yaml").read_text()
    assert "maxUnavailable: {{ .Values.nodes.podDisruptionBudget.maxUnavailable }}" in pdb


def test_chart_runs_as_non_root_with_a_read_only_root() -> None:
    values = _yaml(CHART / "values.yaml")
    for part in (values["operator"], values["nodes"]):
        pod = part["podSecurityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    for ctx in (
        values["operator"]["securityContext"],
        values["nodes"]["sidecar"]["securityContext"],
    ):
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
    assert values["operator"]["replicas"] == 2


def test_chart_secret_is_generated_once_and_kept() -> None:
    secret = (TEMPLATES / "secret.yaml").read_text()
    assert "randAlphaNum 48" in secret
    assert 'lookup "v1" "Secret" .Release.Namespace' in secret
    assert "if not .Values.replication.existingSecret" in secret


def test_chart_dashboard_configmap_is_labelled_for_grafana() -> None:
    values = _yaml(CHART / "values.yaml")
    assert values["metrics"]["grafanaDashboard"]["labels"] == {"grafana_dashboard": "1"}
    assert (
        '.Files.Get "files/engram-replication.json"'
        in (TEMPLATES / "grafana-dashboard.yaml").read_text()
    )
    assert (
        '.Files.Get "files/prometheus-rules.yaml"'
        in (TEMPLATES / "prometheusrule.yaml").read_text()
    )


def test_chart_operator_arguments_are_flags_the_operator_accepts() -> None:
    deployment = (TEMPLATES / "operator-deployment.yaml").read_text()
    flags = set(re.findall(r"^\s+- (--[\w-]+)=", deployment, re.M))
    sub = _parser()._subparsers._group_actions[0].choices["operator"]  # type: ignore[union-attr]
    accepted = {s for a in sub._actions for s in a.option_strings}
    assert flags, "no operator flags found"
    assert flags <= accepted, f"flags `engram-replication operator` lacks: {flags - accepted}"
    assert {"--namespace", "--peering", "--token-file", "--metrics-port", "--release"} <= flags


# ---- the Dockerfile ---------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_slim_and_pinned() -> None:
    instructions = _dockerfile()
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    stages = [a for w, a in instructions if w == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    runs = " ".join(a for w, a in instructions if w == "RUN")
    assert "pip wheel" in runs
    assert any(w == "COPY" and a.startswith("--from=build ") for w, a in instructions)


def test_dockerfile_runtime_is_non_root_with_one_entrypoint() -> None:
    instructions = _dockerfile()
    runtime = instructions[[i for i, (w, _) in enumerate(instructions) if w == "FROM"][-1] :]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert json.loads(next(a for w, a in runtime if w == "ENTRYPOINT")) == ["engram-replication"]
    ports = {p for w, a in runtime if w == "EXPOSE" for p in a.split()}
    assert ports == {"8080", "7070", "9090"}
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"operator", "sidecar"} <= set(commands), "the image's two commands exist"


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "contract/",
        "operator/",
        "sidecar/",
        "bench/",
    }
    # Every source the build stage copies (all words of each COPY but its destination) is let in.
    sources = {
        src
        for w, a in _dockerfile()
        if w == "COPY" and not a.startswith("--from")
        for src in a.split()[:-1]
    }
    assert sources <= allowed, (
        f"the Dockerfile copies what .dockerignore leaves out: {sources - allowed}"
    )
    assert {"contract/", "operator/", "sidecar/", "bench/"} <= sources


def test_dockerfile_runtime_image_has_no_benchmark() -> None:
    # The wheel needs bench/ to build (it is one of its packages); the runtime venv drops it,
    # and `engram-replication bench` there says so instead of failing on an import.
    text = (ROOT / "Dockerfile").read_text()
    assert "site-packages/engram_bench" in text and "rm -rf" in text


# ---- rendered by helm (where installed) ------------------------------------------------------


def _helm(*args: str) -> str:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_helm
@pytest.mark.parametrize("values", [None, "ci/full-values.yaml", "ci/engram-tail-values.yaml"])
def test_chart_helm_lint(values: str | None) -> None:
    extra = ["-f", str(CHART / values)] if values else []
    _helm("lint", "--strict", str(CHART), *extra)


def _render(values: str | None) -> list[dict[str, Any]]:
    extra = ["-f", str(CHART / values)] if values else []
    out = _helm("template", "engram", str(CHART), "--namespace", "engram-system", *extra)
    return [d for d in yaml.safe_load_all(out) if d]


@needs_helm
@pytest.mark.parametrize("values", [None, "ci/full-values.yaml", "ci/engram-tail-values.yaml"])
def test_chart_helm_template_renders_valid_objects(values: str | None) -> None:
    docs = _render(values)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "Secret", "PodDisruptionBudget", "Role"} <= (
        kinds | {"Secret"}
    )
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    sidecar = next(c for c in pod["containers"] if c["name"] == "sidecar")
    env = {e["name"] for e in sidecar["env"]}
    known = {"ENGRAM_" + s.upper() for s in setting_names()}
    assert {e for e in env if e.startswith("ENGRAM_")} <= known
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    for d in docs:
        for rule in d.get("rules", []) if d["kind"] in ("Role", "ClusterRole") else []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - a dev dependency
        return
    for d in docs:
        if d["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "kopf.dev"):
            continue  # custom resources: no official schema
        kubernetes_validate.validate(d, "1.30", strict=True)


@needs_helm
def test_chart_tail_mode_shares_engrams_data_root_and_starts_engram_after_the_sidecar() -> None:
    def pod(values: str | None) -> dict[str, Any]:
        sts = next(d for d in _render(values) if d["kind"] == "StatefulSet")
        spec: dict[str, Any] = sts["spec"]["template"]["spec"]
        return spec

    standalone = pod(None)
    assert [c["name"] for c in standalone["containers"]] == ["sidecar"]
    env = {e["name"] for e in standalone["containers"][0]["env"]}
    assert "ENGRAM_ENGRAM_DATA_ROOT" not in env  # the default stays standalone

    tail = pod("ci/engram-tail-values.yaml")
    sidecar, engram = tail["containers"]
    assert (sidecar["name"], engram["name"]) == ("sidecar", "engram")  # the kubelet's start order
    env_values = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env_values["ENGRAM_ENGRAM_DATA_ROOT"] == "/engram"
    assert env_values["ENGRAM_DATA_DIR"] == "/data"
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/engram"]["subPath"] == "engram.data" and "subPath" not in mounts["/data"]
    (engram_data,) = [m for m in engram["volumeMounts"] if m["mountPath"] == "/data"]
    assert engram_data["subPath"] == "engram.data"
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["python", "-c"] and "/readyz" in hook[2]


# ---- day-2 (issue 15): zones, drains, IPv6, monitoring, subcharts, two releases ---------------


def _template(*args: str, release: str = "engram") -> list[dict[str, Any]]:
    out = _helm("template", release, str(CHART), "--namespace", "engram-system", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def _template_fails(*args: str) -> str:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "template", "engram", str(CHART), "--namespace", "engram-system", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0, "helm template accepted it"
    return proc.stderr


def _sidecar_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    sidecar = sts["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in sidecar["env"]}


@needs_helm
@pytest.mark.parametrize(
    ("grace", "drain", "want"), [(30, None, "25"), (8, None, "4"), (0, None, "0"), (30, 20, "20")]
)
def test_chart_drain_timeout_fits_in_the_grace_period(
    grace: int, drain: int | None, want: str
) -> None:
    args = ["--set", f"nodes.terminationGracePeriodSeconds={grace}"]
    if drain is not None:
        args += ["--set", f"nodes.sidecar.config.drain_timeout={drain}"]
    env = _sidecar_env(_template(*args))
    assert env["ENGRAM_DRAIN_TIMEOUT"] == want
    assert float(want) < grace or grace == 0


@needs_helm
def test_chart_refuses_a_drain_timeout_longer_than_the_grace_period() -> None:
    err = _template_fails("--set", "nodes.sidecar.config.drain_timeout=30")
    assert "must be below nodes.terminationGracePeriodSeconds (30 s)" in err


@needs_helm
def test_chart_refuses_admin_token_file() -> None:
    err = _template_fails("--set", "nodes.sidecar.config.admin_token_file=/x")
    assert "admin_token_file" in err


@needs_helm
def test_chart_spreads_over_zones_and_lets_nodes_read_their_zone_by_default() -> None:
    docs = _template()
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # soft: one zone still schedules
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "engram"
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    env = _sidecar_env(docs)
    assert env["ENGRAM_KUBE_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    assert role["metadata"]["name"] == "engram-engram-replication-engram-system-node"
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["namespace"] == "engram-system"

    # Off: no ClusterRole, no Node name; an explicit list replaces the generated spread.
    docs = _template(
        "--set",
        "nodes.topology.nodeLabels=false",
        "--set",
        "nodes.topology.zoneSpread=",
    )
    assert not [d for d in docs if d["kind"].startswith("ClusterRole")]
    assert "ENGRAM_KUBE_NODE_NAME" not in _sidecar_env(docs)
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod


@needs_helm
def test_chart_binds_ipv6_when_asked() -> None:
    env = _sidecar_env(_template("--set", "nodes.sidecar.bindAddress=::"))
    assert env["ENGRAM_HTTP_HOST"] == env["ENGRAM_REPLICATION_HOST"] == "::"
    # The pod IP is substituted unbracketed; the sidecar brackets it (test_kube_sidecar.py).
    assert env["ENGRAM_ADVERTISE_ADDRESS"] == "$(POD_IP):7070"


@needs_helm
def test_chart_renders_monitoring_kinds_only_where_their_api_is_served() -> None:
    on = [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
    ]
    monitoring = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not {d["kind"] for d in _template(*on)} & monitoring
    kinds = {d["kind"] for d in _template(*on, "--api-versions", "monitoring.coreos.com/v1")}
    assert kinds >= monitoring


@needs_helm
def test_chart_works_as_a_subchart_with_global_values() -> None:
    docs = _template("--set", "global.imageRegistry=registry.example.com")
    assert any(d["kind"] == "StatefulSet" for d in docs)


@needs_helm
def test_chart_two_releases_in_one_namespace_share_no_object() -> None:
    """Every object of one release has a (kind, name) of its own, and no selector of one
    selects the other's pods; the node StatefulSets need names of their own (the pod names
    are the node names), which the chart checks against the cluster when it can."""
    a = _template("--set", "nodes.name=engram-a", release="alpha")
    b = _template("--set", "nodes.name=engram-b", release="beta")
    names_a = {(d["kind"], d["metadata"]["name"]) for d in a}
    names_b = {(d["kind"], d["metadata"]["name"]) for d in b}
    assert names_a & names_b == set()
    for docs, other in ((a, "beta"), (b, "alpha")):
        for d in docs:
            selector = (d.get("spec") or {}).get("selector") or {}
            labels = selector.get("matchLabels", selector)
            if isinstance(labels, dict) and labels:
                assert labels.get("app.kubernetes.io/instance") != other, d["metadata"]["name"]


def _release_wiring(docs: list[dict[str, Any]]) -> tuple[list[str], str | None]:
    """The operator's arguments and the sidecar's ENGRAM_KUBE_RELEASE of one rendering."""
    by_kind = {d["kind"]: d for d in docs}
    op = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    sidecar = next(
        c
        for c in by_kind["StatefulSet"]["spec"]["template"]["spec"]["containers"]
        if c["name"] == "sidecar"
    )
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    return list(op["args"]), env.get("ENGRAM_KUBE_RELEASE")


def test_chart_each_release_reconciles_only_its_own_spaces_and_nodes() -> None:
    """Two releases in one namespace: each operator takes only the MemorySpaces labelled
    engram.io/release=<its release> (`--release`) and the nodes whose Lease says the same
    (ENGRAM_KUBE_RELEASE); by default it claims unlabelled spaces, and can be told not to."""
    args_a, lease_a = _release_wiring(_template("--set", "nodes.name=engram-a", release="alpha"))
    args_b, lease_b = _release_wiring(
        _template(
            "--set",
            "nodes.name=engram-b",
            "--set",
            "operator.claimUnlabelledSpaces=false",
            release="beta",
        )
    )
    assert "--release=alpha" in args_a and lease_a == "alpha"
    assert "--no-claim-unlabelled" not in args_a
    assert "--release=beta" in args_b and lease_b == "beta"
    assert "--no-claim-unlabelled" in args_b
