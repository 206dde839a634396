"""The Helm chart against a real API server: every rendered object is accepted (server-side dry
run, with the default values and ci/full-values.yaml), and a release installs, upgrades and
uninstalls as docs/install.md says.

There is no kubelet and no scheduler, so Pods never run; where kube-controller-manager was built
the StatefulSet and the Deployment do get their Pods (and the Pods their admission: PodSecurity
`restricted` is enforced on the namespace) and the StatefulSet its PersistentVolumeClaims.
`helm lint` and `helm template` themselves run in tests/unit/test_chart.py, with this helm.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from tests.k8s.apiserver import ControlPlane, docs_of
from tests.k8s.harness import CHART, NODE_SA, OPERATOR_SA, RELEASE

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

FULL_VALUES: Final = CHART / "ci" / "full-values.yaml"
RESTRICTED: Final = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
}
SECRET: Final = f"{RELEASE}-secret"

# prometheus-operator's kinds, which ci/full-values.yaml switches on. Stand-ins that accept any
# content: they prove the objects are well-formed and land where they should, not that
# prometheus-operator would take them (its schemas aren't available here).
MONITORING_KINDS: Final = {
    "servicemonitors": "ServiceMonitor",
    "podmonitors": "PodMonitor",
    "prometheusrules": "PrometheusRule",
}


def _monitoring_crd(plural: str, kind: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The server with what ci/full-values.yaml expects to find: prometheus-operator's kinds and
    a `monitoring` namespace (for the Grafana dashboard's ConfigMap)."""
    cp = control_plane
    crds = [_monitoring_crd(p, k) for p, k in MONITORING_KINDS.items()]
    cp.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(crds))
    names = [f"crd/{p}.monitoring.coreos.com" for p in MONITORING_KINDS]
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    for plural in MONITORING_KINDS:
        cp.wait_discovered(f"{plural}.monitoring.coreos.com")
    if cp.rest().get_or_none("/api/v1/namespaces/monitoring") is None:
        cp.create_namespace("monitoring")
    yield cp


def _restricted(cp: ControlPlane, namespace: str) -> None:
    cp.rest().merge_patch(f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": RESTRICTED}})


def _render(cp: ControlPlane, namespace: str, *extra: str) -> str:
    return cp.helm("template", RELEASE, str(CHART), "--namespace", namespace, *extra).stdout


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full-values"])
def test_every_rendered_object_is_accepted(
    cluster: ControlPlane, namespace: str, values: Path | None
) -> None:
    """`kubectl apply --dry-run=server`: validation, defaulting and admission of every object,
    with PodSecurity `restricted` warning about any pod template that breaks it."""
    _restricted(cluster, namespace)
    # `helm template` has no cluster to ask which APIs exist: say prometheus-operator's is there.
    extra = ["-f", str(values), "--api-versions", "monitoring.coreos.com/v1"] if values else []
    # The CRDs of crds/ first (helm installs them before the templates).
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    cluster.wait_discovered("kopfpeerings.kopf.dev")
    rendered = _render(cluster, namespace, *extra)
    objs = docs_of(rendered)
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
    assert out.stderr.strip() == "", f"warnings from the API server:\n{out.stderr}"
    applied = [line for line in out.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objs), out.stdout
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Deployment", "Service", "Role", "RoleBinding", "KopfPeering"} <= kinds
    if values:
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds


def _pods(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return list(cp.rest().get(f"/api/v1/namespaces/{namespace}/pods").get("items", []))


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def _secret_value(cp: ControlPlane, namespace: str) -> str:
    doc = cp.rest().get(f"/api/v1/namespaces/{namespace}/secrets/{SECRET}")
    return base64.b64decode(doc["data"]["shared-secret"]).decode()


def test_install_upgrade_uninstall(cluster: ControlPlane, namespace: str) -> None:
    cp = cluster
    _restricted(cp, namespace)
    out = cp.helm("install", RELEASE, str(CHART), "--namespace", namespace).stdout
    assert "STATUS: deployed" in out
    rest = cp.rest()
    ns = f"/api/v1/namespaces/{namespace}"
    apps = f"/apis/apps/v1/namespaces/{namespace}"
    sts = rest.get(f"{apps}/statefulsets/engram")
    assert sts["spec"]["replicas"] == 3
    assert rest.get(f"{apps}/deployments/{OPERATOR_SA}")["spec"]["replicas"] == 2
    for sa in (OPERATOR_SA, NODE_SA):
        rest.get(f"{ns}/serviceaccounts/{sa}")
    rest.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{RELEASE}")
    secret = _secret_value(cp, namespace)
    assert len(secret) == 48 and secret.isalnum()
    for crd in ("memoryspaces.engram.io", "kopfpeerings.kopf.dev"):
        rest.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")

    if cp.controller_manager:
        # The pods the controllers made passed admission, PodSecurity `restricted` included.
        def pods() -> list[str] | None:
            names = sorted(p["metadata"]["name"] for p in _pods(cp, namespace))
            return names if len(names) == 5 else None

        names = _wait(pods, "3 node pods and 2 operator pods")
        assert names[:3] == ["engram-0", "engram-1", "engram-2"]
        assert all(n.startswith(f"{OPERATOR_SA}-") for n in names[3:])
        failed = [
            e["message"]
            for e in rest.get(f"{ns}/events").get("items", [])
            if e["reason"] in ("FailedCreate", "FailedCreatePodSandBox")
        ]
        assert failed == []

    # A MemorySpace, to see that it outlives the release.
    cp.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "engram.io/v1alpha1",
                "kind": "MemorySpace",
                "metadata": {"name": "orders"},
                "spec": {},
            }
        ),
    )

    # docs/install.md's upgrade: --reuse-values plus a change. `lookup` reads the Secret from
    # the cluster, so the nodes keep their shared secret.
    cp.helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--reuse-values",
        "--set",
        "nodes.replicas=4",
    )
    assert rest.get(f"{apps}/statefulsets/engram")["spec"]["replicas"] == 4
    assert _secret_value(cp, namespace) == secret
    history = cp.helm("history", RELEASE, "--namespace", namespace, "-o", "yaml").stdout
    assert [h["status"] for h in yaml.safe_load(history)] == ["superseded", "deployed"]

    if cp.controller_manager:
        _wait(lambda: len(_pods(cp, namespace)) == 6, "a 4th node pod after the upgrade")

    cp.helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s")
    assert rest.get_or_none(f"{apps}/statefulsets/engram") is None
    assert rest.get_or_none(f"{ns}/secrets/{SECRET}") is None
    assert rest.get_or_none(f"{ns}/serviceaccounts/{OPERATOR_SA}") is None
    # Kept, as docs/install.md says: the CRDs, so every MemorySpace, and the nodes' volumes.
    assert rest.get_or_none(f"/apis/engram.io/v1alpha1/namespaces/{namespace}/memoryspaces/orders")
    if cp.controller_manager:
        claims = rest.get(f"{ns}/persistentvolumeclaims")["items"]
        assert sorted(c["metadata"]["name"] for c in claims) == [
            f"data-engram-{i}" for i in range(4)
        ]
        _wait(lambda: _pods(cp, namespace) == [], "the pods to be garbage-collected")


def test_install_with_full_values(cluster: ControlPlane, namespace: str) -> None:
    """Every optional part on: monitoring objects, the dashboard in another namespace, an
    existing Secret, the Engram container, persistence, a PodDisruptionBudget."""
    cp = cluster
    _restricted(cp, namespace)
    values = yaml.safe_load(FULL_VALUES.read_text())
    rep = values["replication"]
    cp.rest().create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": rep["existingSecret"]},
            "stringData": {rep["existingSecretKey"]: "s" * 48},
        },
    )
    release = "engram"  # not RELEASE: its dashboard ConfigMap lands in the shared `monitoring`
    cp.helm("install", release, str(CHART), "--namespace", namespace, "-f", str(FULL_VALUES))
    rest = cp.rest()
    for plural in MONITORING_KINDS:
        items = rest.get(f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/{plural}")
        assert items["items"], plural
    dashboards = rest.get(
        "/api/v1/namespaces/monitoring/configmaps", labelSelector="grafana_dashboard=1"
    )
    assert any(
        c["metadata"]["name"] == f"{release}-engram-replication-dashboard"
        for c in dashboards["items"]
    )
    sts = rest.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/engram")
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["sidecar", "engram"]
    # Tail mode (nodes.engram.tail, on by default) as the API server stored it, after its
    # defaulting: the sidecar ships Engram's data root, both see it on the same subPath, and
    # Engram starts only after the sidecar's postStart hook saw /readyz (docs/engram.md).
    sidecar, engram = pod["containers"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ENGRAM_ENGRAM_DATA_ROOT"] == "/engram"
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/engram"].get("subPath") == "engram.data"
    assert mounts["/engram"]["name"] == mounts["/data"]["name"]
    assert [m.get("subPath") for m in engram["volumeMounts"] if m["mountPath"] == "/data"] == [
        "engram.data"
    ]
    assert "/readyz" in sidecar["lifecycle"]["postStart"]["exec"]["command"][2]
    if cp.controller_manager:
        _wait(lambda: len(_pods(cp, namespace)) >= 1, "the first node pod (OrderedReady)")
    cp.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
    assert (
        rest.get_or_none(
            f"/api/v1/namespaces/monitoring/configmaps/{release}-engram-replication-dashboard"
        )
        is None
    )


def test_upgrade_refuses_immutable_statefulset_changes_with_a_clear_message(
    cluster: ControlPlane, namespace: str
) -> None:
    """Kubernetes refuses changes to a StatefulSet's volumeClaimTemplates and
    podManagementPolicy half-way through an upgrade; the chart says so before anything is
    applied, and what to do instead. A second release can't take the first one's node names."""
    cp = cluster
    cp.helm("install", RELEASE, str(CHART), "--namespace", namespace)
    upgrade = ["upgrade", RELEASE, str(CHART), "--namespace", namespace, "--reuse-values"]
    for setting, words in (
        ("nodes.persistence.size=20Gi", "nodes.persistence.size can't change from 10Gi to 20Gi"),
        ("nodes.podManagementPolicy=OrderedReady", "nodes.podManagementPolicy can't change"),
    ):
        out = cp.helm(*upgrade, "--set", setting, check=False)
        assert out.returncode != 0 and words in out.stderr, out.stderr
        assert "--cascade=orphan" in out.stderr
    history = cp.helm("history", RELEASE, "--namespace", namespace, "-o", "yaml").stdout
    assert [h["status"] for h in yaml.safe_load(history)] == ["deployed"]  # nothing was tried
    cp.helm(*upgrade, "--set", "nodes.replicas=4")  # a mutable change still goes through

    out = cp.helm("install", "second", str(CHART), "--namespace", namespace, check=False)
    assert out.returncode != 0
    assert f"StatefulSet engram in namespace {namespace} belongs to release {RELEASE}" in (
        out.stderr
    )
    # With node names of its own, a second release installs beside the first.
    cp.helm("install", "second", str(CHART), "--namespace", namespace, "--set", "nodes.name=other")
    rest = cp.rest()
    for name in ("engram", "other"):
        assert rest.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}")
    for release in ("second", RELEASE):
        cp.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
