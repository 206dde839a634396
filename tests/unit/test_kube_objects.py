"""Every object the operator sends is valid: its Events per the Kubernetes schema, its status
patches (merged onto a MemorySpace) per the CRD's own schema, and only operator-owned fields.
And the modules that build them from the decisions are pure: no I/O, no clock."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_contract.kubernetes import OPERATOR_STATUS_FIELDS
from engram_operator.kube.api import KubeApi, ObjectRef
from engram_operator.kube.status_patch import status_update
from engram_operator.model import MemberReport, Placement, SpaceSpec, SwitchoverProgress
from engram_operator.verdict import Verdict

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "engram_operator"
# The pure core and the Kubernetes converters: what they may import (stdlib helpers, the shared
# shapes, each other). No asyncio, aiohttp, kopf, clocks or files: they only compute.
PURE = (
    "model",
    "verdict",
    "placement",
    "election",
    "switchover",
    "status",
    "reconcile",
    "kube/convert",
    "kube/status_patch",
)
PURE_MAY_IMPORT = {
    "__future__",
    "collections.abc",
    "dataclasses",
    "typing",
    "hashlib",
    "math",
    "re",
    "json",
    "engram_contract.ids",
    "engram_contract.kubernetes",
    "engram_contract.assignment",
    *(f"engram_operator.{m.replace('/', '.')}" for m in PURE),
}
A, B, C = NodeName("node-a"), NodeName("node-b"), NodeName("node-c")


def _schema() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deploy/crds/memoryspaces.engram.io.yaml").read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _space(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "engram.io/v1alpha1",
        "kind": "MemorySpace",
        "metadata": {"name": "orders", "namespace": "engram-system"},
        "spec": {"replicas": 2, "ackPolicy": "quorum"},
        "status": status,
    }


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _update(**kw: Any) -> dict[str, object]:
    alive = {n: Verdict(node=n, state="Alive", reason="lease renewed") for n in (A, B, C)}
    reports = {
        A: MemberReport(node=A, role="primary", epoch=Epoch(3), applied_sequence=Sequence(90)),
        B: MemberReport(node=B, role="replica", epoch=Epoch(3), applied_sequence=Sequence(88)),
    }
    args: dict[str, Any] = {
        "space": SpaceId("orders"),
        "spec": SpaceSpec(replicas=2, ack_policy="quorum"),
        "placement": Placement(primary=A, replicas=(B, C), epoch=Epoch(3)),
        "placement_problem": None,
        "switchover": None,
        "placed_at": "2026-11-26T14:00:00.000000Z",
        "previous": (),
        "operation": "Idle",
        "sentence": "space orders is steady",
        "verdicts": alive,
        "reports": reports,
        "generation": 4,
        "problem": None,
        "now": 100.0,
        "wall": 1_795_000_000.0,
        "now_iso": "2026-11-26T14:01:00.000000Z",
    }
    args.update(kw)
    return status_update(**args).patch


@pytest.mark.parametrize(
    "case",
    ["steady", "unplaced", "switching", "invalid"],
)
def test_kube_operator_status_patch_fits_the_crd_and_owns_only_its_fields(case: str) -> None:
    import jsonschema  # type: ignore[import-untyped]

    kw: dict[str, Any] = {}
    if case == "unplaced":
        kw = {"placement": None, "placed_at": None, "reports": {}}
    elif case == "switching":
        kw = {
            "spec": SpaceSpec(replicas=2, ack_policy="quorum", target_primary=B),
            "switchover": SwitchoverProgress(target=B, started_at=98.0),
            "operation": "SwitchingOver",
        }
    elif case == "invalid":
        kw = {"problem": "spec.replicas 9 is more than the 2 other nodes"}
    patch = _update(**kw)
    assert set(patch) <= OPERATOR_STATUS_FIELDS, set(patch) - OPERATOR_STATUS_FIELDS
    # The sidecar's fields already there must survive the operator's merge patch untouched.
    before = _space(
        {
            "members": [
                {
                    "node": "node-a",
                    "role": "primary",
                    "appliedSequence": 90,
                    "lagEntries": 0,
                    "lagSeconds": 0.0,
                    "state": "Healthy",
                }
            ],
            "maxLagSeconds": 0.0,
            "maxLagEntries": 0,
        }
    )
    after = _merge(before, {"status": patch})
    assert after["status"]["members"] == before["status"]["members"]
    jsonschema.validate(after, _schema())


async def test_kube_operator_event_is_a_valid_kubernetes_event() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    api = KubeApi(lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"), user_agent="t/1")
    sent: list[dict[str, Any]] = []

    async def capture(method: str, path: str, **kw: Any) -> dict[str, Any]:
        sent.append(kw["body"])
        return {}

    api.request = capture  # type: ignore[method-assign]
    ref = ObjectRef(
        kind="MemorySpace",
        api_version="engram.io/v1alpha1",
        namespace="engram-system",
        name="orders",
        uid="u-1",
    )
    await api.post_event(ref, type_="Normal", reason="Promoted", message="x" * 5000)
    (event,) = sent
    assert len(event["message"]) <= 1024
    kubernetes_validate.validate(event, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("module", PURE)
def test_kube_pure_modules_import_nothing_that_does_io(module: str) -> None:
    tree = ast.parse((OPERATOR / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "engram_operator":
            imported.update(f"engram_operator.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported - PURE_MAY_IMPORT == set()
