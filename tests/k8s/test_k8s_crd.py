"""The MemorySpace CRD on a real kube-apiserver: structural schema, defaults, CEL rules (within the
cost budget), pruning, printer columns and the examples.

tests/unit/test_crd.py emulates the API server with jsonschema and cel-python; its tables of
valid, invalid and updated MemorySpaces are sent here to the real thing, so the emulation and the
server are held to the same cases (and the unit suite can't drift from what a cluster does).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from tests.k8s.apiserver import ControlPlane
from tests.unit.test_crd import INVALID, UPDATES, VALID, admit

from engram_contract import kubernetes as contract

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]

ROOT: Final = Path(__file__).resolve().parents[2]
CRD: Final = ROOT / "deploy" / "crds" / "memoryspaces.engram.io.yaml"
PEERING_CRD: Final = ROOT / "deploy" / "helm" / "engram-replication" / "crds"
EXAMPLES: Final = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
API: Final = f"/apis/{contract.API_GROUP}/{contract.API_VERSION}"

# What the real server answers to each refused manifest of tests/unit/test_crd.py's INVALID
# table (a fragment of the Status message). Every row there has one here.
SERVER_REFUSALS: Final = {
    "too-many-replicas": "spec.replicas in body should be less than or equal to 8",
    "negative-replicas": "spec.replicas in body should be greater than or equal to 0",
    "replicas-not-integer": "spec.replicas in body must be of type integer",
    "unknown-ack-policy": 'spec.ackPolicy: Unsupported value: "all"',
    "quorum-one-replica": "spec.ackPolicy: Invalid value: ackPolicy quorum needs replicas >= 2",
    "quorum-no-replicas": "spec.ackPolicy: Invalid value: ackPolicy quorum needs replicas >= 2",
    "one-no-replicas": "spec.ackPolicy: Invalid value: ackPolicy one and quorum wait for",
    "max-delay-over-one-second": 'spec.batch.maxDelay: Invalid value: "1500ms": maxDelay must',
    "max-delay-without-unit": "spec.batch.maxDelay in body should match",
    "max-delay-minutes": "spec.batch.maxDelay in body should match",
    "max-delay-integer": "spec.batch.maxDelay in body must be of type string",
    "max-entries-zero": "spec.batch.maxEntries in body should be greater than or equal to 1",
    "max-entries-too-many": "spec.batch.maxEntries in body should be less than or equal to 10000",
    "unknown-compression": 'spec.compression: Unsupported value: "gzip"',
    "critical-below-warning": "spec.lag.criticalSeconds: Invalid value: lag.criticalSeconds must",
    "warning-zero": "spec.lag.warningSeconds in body should be greater than or equal to 1",
    "negative-max-lag-on-failover": "spec.maxLagOnFailover in body should be greater than or",
    "catchup-threshold-zero": "spec.catchupThreshold in body should be greater than or equal",
    "paused-not-boolean": "spec.paused in body must be of type boolean",
    "target-not-a-node-name": "spec.targetPrimary in body should match '^[a-z0-9.-]+$'",
    "target-empty": "spec.targetPrimary in body should be at least 1 chars long",
    "misspelt-field": 'strict decoding error: unknown field "spec.replica"',
    "name-too-short": "metadata.name: Invalid value: metadata.name is the memory space id",
    "name-too-long": "metadata.name: Invalid value: metadata.name is the memory space id",
    "name-with-underscore": "metadata.name in body should match",
    "name-with-dot": "metadata.name in body should match",
    "name-ends-with-dash": "metadata.name in body should match",
    "status-unknown-phase": 'status.phase: Unsupported value: "Running"',
    "status-condition-status": 'status.conditions[0].status: Unsupported value: "yes"',
    "status-condition-without-type": "status.conditions[0].type: Required value",
    "status-duplicate-member": 'status.members[1]: Duplicate value: {"node":"engram-0"}',
    "status-member-state": 'status.members[0].state: Unsupported value: "Syncing"',
    "status-time-not-rfc3339": 'status.placedAt: Invalid value: "yesterday"',
}


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> ControlPlane:
    """Both CRDs, applied as docs/install.md says (server-side), and Established."""
    control_plane.kubectl(
        "apply",
        "--server-side",
        "-f",
        str(CRD),
        "-f",
        str(PEERING_CRD / "kopfpeerings.kopf.dev.yaml"),
    )
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/memoryspaces.engram.io",
        "crd/kopfpeerings.kopf.dev",
    )
    control_plane.wait_discovered("memoryspaces.engram.io")
    return control_plane


def _space(name: str = "orders", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


def _into(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    obj = copy.deepcopy(manifest)
    obj["metadata"]["namespace"] = namespace
    return obj


def _create(cp: ControlPlane, namespace: str, manifest: dict[str, Any]) -> tuple[int, Any]:
    """POST as kubectl does (server-side field validation Strict); a status in the manifest is
    then written through the status subresource, the only way a status gets stored."""
    obj = _into(manifest, namespace)
    status = obj.pop("status", None)
    path = f"{API}/namespaces/{namespace}/memoryspaces"
    code, doc = cp.rest().call("POST", path, obj, params={"fieldValidation": "Strict"})
    if code >= 300 or status is None:
        return code, doc
    return cp.rest().call(
        "PATCH",
        f"{path}/{obj['metadata']['name']}/status",
        {"status": status},
        content_type="application/merge-patch+json",
    )


def test_crd_is_structural_established_and_explained(crds: ControlPlane) -> None:
    crd = crds.rest().get(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/memoryspaces.engram.io"
    )
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == ["msp"]

    # The schema is published (OpenAPI v3): kubectl explain reads the field descriptions.
    def explained() -> bool:  # the OpenAPI document follows the CRD a moment later
        out = crds.kubectl("explain", "msp.spec.batch.maxDelay", check=False).stdout
        return "Longest a partial batch waits for more entries" in out

    deadline = time.monotonic() + 30
    while not explained():
        assert time.monotonic() < deadline, "kubectl explain msp: no field descriptions"
        time.sleep(0.5)
    # The categories work: `kubectl get engram` lists MemorySpaces, `kubectl get all` doesn't
    # (so `kubectl delete all --all` spares them and their data).
    assert (
        "memoryspaces" in crds.kubectl("api-resources", "--categories=engram", "-o", "name").stdout
    )
    assert (
        "memoryspaces" not in crds.kubectl("api-resources", "--categories=all", "-o", "name").stdout
    )


def test_crd_unit_tables_cover_every_refusal() -> None:
    assert set(SERVER_REFUSALS) == set(INVALID)


@pytest.mark.parametrize(("manifest", "_why"), INVALID.values(), ids=INVALID.keys())
def test_invalid_memoryspace_is_refused_by_the_server(
    crds: ControlPlane,
    namespace: str,
    manifest: dict[str, Any],
    _why: str,
    request: pytest.FixtureRequest,
) -> None:
    case = request.node.callspec.id
    code, doc = _create(crds, namespace, manifest)
    assert code in (400, 422), f"admitted (HTTP {code}), but should have been refused: {doc}"
    assert SERVER_REFUSALS[case] in doc["message"], doc["message"]


@pytest.mark.parametrize("manifest", VALID.values(), ids=VALID.keys())
def test_valid_memoryspace_is_admitted_with_the_emulated_defaults(
    crds: ControlPlane, namespace: str, manifest: dict[str, Any]
) -> None:
    code, doc = _create(crds, namespace, manifest)
    assert code == 201, doc
    emulated, errors = admit(manifest)
    assert errors == []
    # The API server's defaulting and pruning give exactly the unit suite's spec.
    assert doc["spec"] == emulated["spec"]


@pytest.mark.parametrize(("before", "after", "why"), UPDATES.values(), ids=UPDATES.keys())
def test_update_transition_rules(
    crds: ControlPlane,
    namespace: str,
    before: dict[str, Any],
    after: dict[str, Any],
    why: str | None,
) -> None:
    rest = crds.rest()
    path = f"{API}/namespaces/{namespace}/memoryspaces"
    obj = {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": "orders", "namespace": namespace},
        "spec": before,
    }
    stored = rest.create(path, obj)
    replaced = {**stored, "spec": after}  # a PUT: the new spec replaces the stored one
    code, doc = rest.call("PUT", f"{path}/orders", replaced)
    if why is None:
        assert code == 200, doc
    else:
        assert code == 422, doc
        assert why in doc["message"], doc["message"]


def test_status_write_leaves_a_paused_target_alone(crds: ControlPlane, namespace: str) -> None:
    """A status patch re-validates the object; the transition rule passes an unchanged spec."""
    rest = crds.rest()
    path = f"{API}/namespaces/{namespace}/memoryspaces"
    rest.create(path, _space(targetPrimary="engram-1"))
    rest.merge_patch(f"{path}/orders", {"spec": {"paused": True}})
    done = rest.merge_patch(f"{path}/orders/status", {"status": {"phase": "Paused"}})
    assert done["status"]["phase"] == "Paused"


def test_unknown_fields_are_refused_by_kubectl_and_pruned_by_a_lenient_client(
    crds: ControlPlane, namespace: str
) -> None:
    doc = {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": "orders", "namespace": namespace},
        "spec": {"replica": 3},
    }
    refused = crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert refused.returncode != 0
    assert 'unknown field "spec.replica"' in refused.stderr
    # A client that doesn't ask for strict validation gets the field dropped, not stored.
    stored = crds.rest().create(f"{API}/namespaces/{namespace}/memoryspaces", doc)
    assert "replica" not in stored["spec"] and stored["spec"]["replicas"] == 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_applies_as_written(crds: ControlPlane, path: Path) -> None:
    """Each file of deploy/examples, with `kubectl -n engram-system apply` as docs/install.md
    shows (the files name no namespace: `-n` puts them in the release's); the stored spec is the
    file's, plus the defaults."""
    rest = crds.rest()
    if rest.get_or_none("/api/v1/namespaces/engram-system") is None:
        crds.create_namespace("engram-system")
    crds.kubectl("-n", "engram-system", "apply", "-f", str(path))
    for doc in yaml.safe_load_all(path.read_text()):
        meta = doc["metadata"]
        assert "namespace" not in meta
        stored = rest.get(f"{API}/namespaces/engram-system/memoryspaces/{meta['name']}")
        assert stored["spec"] == admit(doc)[0]["spec"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_applies_alone_in_a_fresh_namespace(
    crds: ControlPlane, namespace: str, path: Path
) -> None:
    docs = [_into(d, namespace) for d in yaml.safe_load_all(path.read_text())]
    out = crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs)).stdout
    assert out.count("created") == len(docs), out


# Every status field both writers write, with the free-form parts the code fills in today
# (lastPromotion's fence record, a catch-up's progress), plus fields the schema doesn't know.
FULL_STATUS: Final[dict[str, Any]] = {
    "phase": "Degraded",
    "primary": "n0",
    "replicas": ["n2", "n1"],
    "epoch": 2,
    "ready": "2/3",
    "observedGeneration": 1,
    "message": "primary n0 at epoch 2; not streaming: n1 (Failed)",
    "placedAt": "2026-12-06T03:40:39.916582Z",
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "PrimaryServing",
            "message": "n0 accepts writes at epoch 2",
            "lastTransitionTime": "2026-12-06T03:40:39.916582Z",
            "observedGeneration": 1,
        },
        {
            "type": "Degraded",
            "status": "True",
            "reason": "ReplicaUnreachable",
            "message": "",
            "lastTransitionTime": "2026-12-06T03:40:39.419799+00:00",
        },
    ],
    "lastPromotion": {
        "space": "orders",
        "cause": "n1 dead: lease expired 0.3 s ago, probe failed",
        "oldPrimary": "n1",
        "oldPrimaryLastSequence": 0,
        "oldEpoch": 1,
        "newEpoch": 2,
        "candidates": [{"node": "n0", "appliedSequence": 1, "lagEntries": 0, "lastEpoch": 1}],
        "exclusions": [{"node": "n1", "reason": "dead"}],
        "winner": "n0",
        "winnerSequence": 1,
        "winnerLastEpoch": 1,
        "entriesPossiblyLost": 0,
        "reason": "highest last entry",
        "summary": "promote n0",
        "fence": {"answered": 2, "epoch": 2, "quorumNeeds": 2},
    },
    "switchover": {"target": "n2", "state": "Waiting", "startedAt": 12.5},
    "members": [
        {
            "node": "n0",
            "role": "primary",
            "appliedSequence": 7,
            "lagEntries": 0,
            "lagSeconds": 0.0,
            "state": "Healthy",
        },
        {
            "node": "n2",
            "role": "replica",
            "appliedSequence": 3,
            "lagEntries": 4,
            "lagSeconds": 0.25,
            "state": "CatchingUp",
            "catchUp": {
                "phase": "incremental",
                "reason": "behind",
                "entriesDone": 1,
                "entriesTotal": 4,
                "bytesDone": 10,
                "bytesTotal": 40,
                "rateEntriesPerSecond": 2.5,
                "etaSeconds": 1.2,
            },
        },
        {
            "node": "n1",
            "role": "replica",
            "appliedSequence": None,
            "lagEntries": None,
            "lagSeconds": None,
            "state": "Unknown",
        },
    ],
    "maxLagEntries": 4,
    "maxLagSeconds": 0.25,
    "membersReportedAt": "2026-12-06T03:40:40.000001Z",
    "membersEpoch": 2,
    "kopf": {"progress": {}},
}


def test_status_fields_of_both_writers_survive_pruning(crds: ControlPlane, namespace: str) -> None:
    assert set(FULL_STATUS) - {"kopf"} == (
        contract.OPERATOR_STATUS_FIELDS | contract.SIDECAR_STATUS_FIELDS
    )
    rest = crds.rest()
    path = f"{API}/namespaces/{namespace}/memoryspaces"
    rest.create(path, _space())
    sent = copy.deepcopy(FULL_STATUS)
    sent["bogus"] = "pruned"  # unknown to the schema: dropped, not stored
    sent["members"][0]["extra"] = 1
    rest.merge_patch(f"{path}/orders/status", {"status": sent})
    stored = rest.get(f"{path}/orders")["status"]
    # Everything the writers send is kept, except nulls inside the member rows: the API
    # server's JSON merge patch drops null members of objects even inside a list it replaces
    # whole (so readers must take an absent appliedSequence as unknown, as they do).
    expected = copy.deepcopy(FULL_STATUS)
    expected["members"] = [
        {k: v for k, v in row.items() if v is not None} for row in expected["members"]
    ]
    assert stored == expected, json.dumps(stored, indent=1)


def test_printer_columns_show_the_status(crds: ControlPlane, namespace: str) -> None:
    rest = crds.rest()
    path = f"{API}/namespaces/{namespace}/memoryspaces"
    rest.create(path, _space(ackPolicy="quorum"))
    rest.merge_patch(f"{path}/orders/status", {"status": FULL_STATUS})
    wide = crds.kubectl("get", "msp", "-n", namespace, "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    cells = dict(zip(_columns(header), _cells(header, row), strict=True))
    assert cells == {
        "NAME": "orders",
        "PRIMARY": "n0",
        "READY": "2/3",
        "EPOCH": "2",
        "MAX LAG": "0.25",
        "PHASE": "Degraded",
        "AGE": cells["AGE"],
        "REPLICAS": "2",
        "ACK": "quorum",
        "LAG ENTRIES": "4",
        "MESSAGE": FULL_STATUS["message"],
    }
    narrow = crds.kubectl("get", "msp", "-n", namespace).stdout.splitlines()[0]
    assert _columns(narrow) == ["NAME", "PRIMARY", "READY", "EPOCH", "MAX LAG", "PHASE", "AGE"]
    # The category: `kubectl get engram` lists them too.
    assert "orders" in crds.kubectl("get", "engram", "-n", namespace).stdout


def _columns(header: str) -> list[str]:
    """kubectl's column names (two or more spaces apart; a name may hold one space)."""
    return [c.strip() for c in header.split("  ") if c.strip()]


def _cells(header: str, row: str) -> list[str]:
    """A row cut at the header's column starts (cells may hold spaces: MESSAGE)."""
    starts = [header.index(name) for name in _columns(header)]
    ends = [*starts[1:], len(row)]
    return [row[a:b].strip() for a, b in zip(starts, ends, strict=True)]


def test_kubectl_refusal_reads_well(crds: ControlPlane, namespace: str) -> None:
    """What a user sees for a rule's refusal: the field and the CRD's message, nothing else."""
    doc = {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": "orders", "namespace": namespace},
        "spec": {"batch": {"maxDelay": "10"}},
    }
    out = crds.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0
    assert "spec.batch.maxDelay in body should match" in out.stderr
    # No misleading second error from the duration rule on a value the pattern refused.
    assert "type conversion error" not in out.stderr and "at most 1s" not in out.stderr
