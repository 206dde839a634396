"""Everything under deploy/ is a valid Kubernetes object, and the RBAC is least privilege.

Built-in kinds (the CRD itself, ServiceAccounts, roles, bindings) are checked by
`kubernetes-validate` against the official schemas, strictly (no unknown fields), for the oldest
Kubernetes the CRD supports and the newest the package ships. MemorySpaces are custom resources
that it has no schema for: tests/unit/test_crd.py checks them against the CRD's own schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engram_contract import kubernetes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FILES = sorted(
    [
        *(DEPLOY / "crds").glob("*.yaml"),
        *(DEPLOY / "examples").glob("*.yaml"),
        *(DEPLOY / "rbac").glob("*.yaml"),
    ]
)
RBAC_DOC = ROOT / "docs" / "rbac.md"
NAMESPACE = "engram-system"
# The oldest Kubernetes the CRD supports (CEL rules with reason and fieldPath), and the newest
# that kubernetes-validate ships schemas for.
VERSIONS = ("1.30", kubernetes_validate.latest_version())

Obj = dict[str, Any]


def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects() -> list[tuple[str, Obj]]:
    return [
        (f"{path.relative_to(DEPLOY)}:{obj['kind']}/{obj['metadata']['name']}", obj)
        for path in FILES
        for obj in _load(path)
    ]


def _builtin() -> list[Any]:
    return [
        pytest.param(obj, id=name)
        for name, obj in _objects()
        if obj["apiVersion"] != f"{kubernetes.API_GROUP}/{kubernetes.API_VERSION}"
    ]


def _rbac(name: str) -> list[Obj]:
    return _load(DEPLOY / "rbac" / name)


def _roles(name: str) -> list[Obj]:
    return [o for o in _rbac(name) if o["kind"] in ("Role", "ClusterRole")]


def _grants(name: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every permission the roles in deploy/rbac/`name` grant."""
    return {
        (group, resource, verb)
        for role in _roles(name)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


def test_manifests_found_and_parse() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in FILES}
    assert {"crds/memoryspaces.engram.io.yaml", "rbac/operator.yaml", "rbac/node.yaml"} <= names
    for path in FILES:
        for obj in _load(path):
            assert {"apiVersion", "kind", "metadata"} <= set(obj), path


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("obj", _builtin())
def test_manifests_builtin_kind_validates_against_kubernetes_schema(obj: Obj, version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def test_manifests_memoryspace_is_left_to_the_crd_schema() -> None:
    """kubernetes-validate can't check custom resources: make sure it says so, not passes them."""
    spaces = [obj for _, obj in _objects() if obj["kind"] == kubernetes.KIND]
    assert spaces
    for obj in spaces:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(obj, VERSIONS[0], strict=True)


def test_manifests_namespaced_objects_use_the_placeholder_namespace() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for name, obj in _objects():
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert namespace is None, name
        elif obj["kind"] == kubernetes.KIND:
            # The examples name none: `kubectl -n <release namespace> apply -f` places them.
            assert namespace is None, name
        else:
            assert namespace == NAMESPACE, name


# ---- RBAC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["operator.yaml", "node.yaml"])
def test_rbac_has_no_wildcards_or_dangerous_verbs(name: str) -> None:
    for role in _roles(name):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(key, [])), (role, rule)
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "deletecollection"}
            assert "secrets" not in rule.get("resources", [])
            assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("name", ["operator.yaml", "node.yaml"])
def test_rbac_bindings_tie_defined_roles_to_defined_accounts(name: str) -> None:
    objs = _rbac(name)
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in objs
        if o["kind"] == "ServiceAccount"
    }
    roles = {
        (o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in ("Role", "ClusterRole")
    }
    bindings = [o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert len(accounts) == 1
    assert len(bindings) == len(roles)
    bound = set()
    for binding in bindings:
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        assert (ref["kind"], ref["name"]) in roles, binding
        # A RoleBinding may only grant a Role of its own namespace here (no ClusterRole reuse).
        assert ref["kind"] == binding["kind"].removesuffix("Binding"), binding
        bound.add((ref["kind"], ref["name"]))
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert (subject["namespace"], subject["name"]) in accounts
    assert bound == roles


# Every resource a rule may name: (apiGroup, resource) -> scope. A typo ("lease", "memoryspace")
# would silently grant nothing, so an unknown pair fails here.
_KNOWN = {
    ("", "pods"): "Namespaced",
    ("", "nodes"): "Cluster",
    ("", "events"): "Namespaced",
    ("events.k8s.io", "events"): "Namespaced",
    ("coordination.k8s.io", "leases"): "Namespaced",
    ("apiextensions.k8s.io", "customresourcedefinitions"): "Cluster",
    ("kopf.dev", "kopfpeerings"): "Namespaced",
    (kubernetes.API_GROUP, kubernetes.PLURAL): "Namespaced",
    (kubernetes.API_GROUP, f"{kubernetes.PLURAL}/status"): "Namespaced",
}


@pytest.mark.parametrize("name", ["operator.yaml", "node.yaml"])
def test_rbac_rules_name_known_resources_in_the_right_role_kind(name: str) -> None:
    for role in _roles(name):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    scope = _KNOWN.get((group, resource))
                    assert scope is not None, f"unknown resource {group}/{resource}"
                    # A ClusterRole holds only cluster-scoped resources: the rest is namespaced.
                    assert (role["kind"] == "ClusterRole") == (scope == "Cluster"), (
                        group,
                        resource,
                    )


def test_rbac_operator_grants_exactly_what_it_needs() -> None:
    """Each verb is one the code uses: tests/k8s/test_k8s_rbac.py reads a real API server's audit
    log to show it (and drops each rule to show what breaks). No ClusterRole: the operator runs
    namespace-scoped with kopf's CRD scanning off."""
    group, plural = kubernetes.API_GROUP, kubernetes.PLURAL
    assert _grants("operator.yaml") == {
        *((group, plural, v) for v in ("get", "list", "watch", "patch")),
        (group, f"{plural}/status", "patch"),
        ("coordination.k8s.io", "leases", "list"),
        ("coordination.k8s.io", "leases", "watch"),
        *(("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")),
        ("", "events", "create"),
    }
    assert {o["kind"] for o in _rbac("operator.yaml")} == {"ServiceAccount", "Role", "RoleBinding"}


def test_rbac_node_grants_exactly_what_it_needs() -> None:
    group, plural = kubernetes.API_GROUP, kubernetes.PLURAL
    assert _grants("node.yaml") == {
        *(("coordination.k8s.io", "leases", v) for v in ("list", "create", "patch")),
        (group, plural, "list"),
        (group, f"{plural}/status", "patch"),
        ("", "events", "create"),
        # The one cluster-wide grant: its Kubernetes Node's zone and rack (a ClusterRole).
        ("", "nodes", "get"),
    }
    cluster = [o for o in _roles("node.yaml") if o["kind"] == "ClusterRole"]
    assert [r for o in cluster for r in o["rules"]] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    ]


def test_rbac_status_is_only_ever_patched() -> None:
    """Both writers of status send merge patches of their own fields (contract): no update, which
    would replace the other writer's fields, and nobody but the user writes spec."""
    for name in ("operator.yaml", "node.yaml"):
        grants = _grants(name)
        assert (kubernetes.API_GROUP, f"{kubernetes.PLURAL}/status", "update") not in grants
        for verb in ("create", "update", "delete"):
            assert (kubernetes.API_GROUP, kubernetes.PLURAL, verb) not in grants


def test_rbac_docs_explain_every_permission() -> None:
    """docs/rbac.md has a table row `| <account> | <group> | <resource> | <verbs> | why |` for
    each rule, listing exactly the rule's verbs."""
    text = RBAC_DOC.read_text()
    rows: dict[tuple[str, str, str], set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].startswith("`engram-"):
            account, group, resource, verbs = (re.sub(r"`", "", c) for c in cells[:4])
            group = "" if group in ('""', "core") else group
            rows[(account, group, resource)] = {v.strip() for v in verbs.split(",")}
    for name, account in (("operator.yaml", "engram-operator"), ("node.yaml", "engram-node")):
        for role in _roles(name):
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        key = (account, group, resource)
                        assert key in rows, f"docs/rbac.md has no row for {key}"
                        assert rows[key] == set(rule["verbs"]), key
