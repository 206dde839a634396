"""The MemorySpace CRD: structural, in step with the code, and refusing what it should.

Manifests are checked the way the API server would: nulls of non-nullable fields dropped, defaults
applied, then the CRD's own openAPIV3Schema (turned into JSON Schema and run by `jsonschema`, with
unknown fields refused as `kubectl apply`'s strict field validation does), then every
`x-kubernetes-validations` rule evaluated by cel-python, transition rules only on updates.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from engram_contract import ids, kubernetes
from engram_operator import model, status
from engram_operator.kube import retire

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy" / "crds" / "memoryspaces.engram.io.yaml"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
DOCS = ROOT / "docs" / "crd.md"

Json = Any
_MISSING: Any = object()  # no old value: a create, or a field the old object lacked


# ---- the CRD and a validator built from it -------------------------------------------------------


@cache
def _crd() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(CRD_PATH.read_text()))
    assert len(docs) == 1, "the CRD file holds exactly one document"
    crd: dict[str, Any] = docs[0]
    return crd


def _version() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    return typing.cast(dict[str, Any], version)


def _schema() -> dict[str, Any]:
    return typing.cast(dict[str, Any], _version()["schema"]["openAPIV3Schema"])


_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# RFC 3339 with a required offset: what `format: date-time` should hold (Python's
# datetime.now(UTC).isoformat() produces it).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or _RFC3339.fullmatch(value) is not None


def _to_json_schema(node: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that accepts what the API server accepts at `node`."""
    out: dict[str, Any] = {}
    kind = node.get("type")
    nullable = bool(node.get("nullable"))
    if kind:
        out["type"] = [kind, "null"] if nullable else kind
    for key in ("minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems"):
        if key in node:
            out[key] = node[key]
    if "enum" in node:
        out["enum"] = [*node["enum"], None] if nullable else list(node["enum"])
    if "required" in node:
        out["required"] = list(node["required"])
    fmt = node.get("format")
    if fmt in _INT_RANGE:
        low, high = _INT_RANGE[fmt]
        out["minimum"], out["maximum"] = (
            max(low, out.get("minimum", low)),
            min(high, out.get("maximum", high)),
        )
    elif fmt is not None:
        out["format"] = fmt
    if "properties" in node:
        out["properties"] = {
            k: _to_json_schema(v, (*path, k)) for k, v in node["properties"].items()
        }
    if "items" in node:
        out["items"] = _to_json_schema(node["items"], (*path, "[]"))
    # Unknown fields are refused (strict field validation) except where the schema keeps them, and
    # in metadata, which the API server validates as ObjectMeta, not through this schema.
    if kind == "object" and path != ("metadata",):
        keep = node.get("x-kubernetes-preserve-unknown-fields", False)
        if not keep and "additionalProperties" not in node:
            out["additionalProperties"] = False
    return out


def _apply_defaults(node: dict[str, Any], value: Json, *, root: bool = False) -> None:
    """Default `value` in place as the API server does: drop nulls of non-nullable fields, then
    fill every absent field that has a default, then default inside what is there (so a default
    of {} gets its own fields' defaults)."""
    if isinstance(value, dict) and node.get("type") == "object":
        for name, sub in node.get("properties", {}).items():
            if root and name in ("apiVersion", "kind", "metadata"):
                continue
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        for item in value:
            _apply_defaults(node["items"], item)


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _is_transition(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def _cel(rule: str, new: Json, old: Json) -> bool | str:
    """True when `rule` holds; False when it doesn't; a string when it can't be evaluated."""
    activation = {"self": celpy.json_to_cel(new)}
    if old is not _MISSING:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule).evaluate(activation)
    except celpy.CELEvalError as err:
        return f"evaluation error: {err}"
    if isinstance(result, celpy.CELEvalError):
        return f"evaluation error: {result}"
    return bool(result)


def _cel_errors(node: dict[str, Any], new: Json, old: Json, path: str) -> list[str]:
    """Messages of the rules that refuse `new`, walking the schema like the API server."""
    errors = []
    for validation in node.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if _is_transition(rule) and old is _MISSING:
            continue  # transition rules run on updates only, where the old value exists
        verdict = _cel(rule, new, old)
        if verdict is not True:
            where = path + validation.get("fieldPath", "")
            errors.append(f"{where or '<root>'}: {validation['message']} [{verdict}]")
    if isinstance(new, dict):
        for name, sub in node.get("properties", {}).items():
            if name in new:
                before = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                errors += _cel_errors(sub, new[name], before, f"{path}.{name}")
    elif isinstance(new, list) and "items" in node:
        for i, item in enumerate(new):
            errors += _cel_errors(node["items"], item, _MISSING, f"{path}[{i}]")
    return errors


def _list_map_errors(node: dict[str, Any], value: Json, path: str) -> list[str]:
    """x-kubernetes-list-type: map refuses two items with the same keys."""
    errors = []
    if isinstance(value, list) and node.get("x-kubernetes-list-type") == "map":
        keys = node["x-kubernetes-list-map-keys"]
        seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
        if len(seen) != len(set(seen)):
            errors.append(f"{path}: duplicate entries for keys {keys}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                errors += _list_map_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            errors += _list_map_errors(node["items"], item, f"{path}[{i}]")
    return errors


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = _to_json_schema(_schema())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)


def admit(obj: Json, old: Json = _MISSING) -> tuple[Json, list[str]]:
    """The object as stored after defaulting, and every error the API server would report.

    `old` is the stored object of an update (already defaulted), or absent for a create.
    """
    obj = copy.deepcopy(obj)
    _apply_defaults(_schema(), obj, root=True)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in _validator().iter_errors(obj)
    ]
    errors += _list_map_errors(_schema(), obj, "")
    if not errors:  # CEL rules see well-typed values only
        errors += _cel_errors(_schema(), obj, old, "")
    return obj, errors


def _space(name: str = "orders", spec: Json = _MISSING, status: Json = _MISSING) -> Json:
    obj: dict[str, Any] = {
        "apiVersion": f"{kubernetes.API_GROUP}/{kubernetes.API_VERSION}",
        "kind": kubernetes.KIND,
        "metadata": {"name": name, "namespace": "engram-system"},
    }
    if spec is not _MISSING:
        obj["spec"] = spec
    if status is not _MISSING:
        obj["status"] = status
    return obj


# ---- structural ----------------------------------------------------------------------------------

_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


def test_crd_schema_is_structural() -> None:
    problems = []
    for path, node in _nodes(_schema()):
        exempt = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        if node.get("type") not in _TYPES and not (exempt and "type" not in node):
            problems.append(f"{path}: no valid type")
        if "$ref" in node or any(j in node for j in _JUNCTORS):
            problems.append(f"{path}: $ref or a logical junctor")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if node.get("type") != "object" and ("properties" in node or "required" in node):
            problems.append(f"{path}: properties on a non-object")
        if (node.get("type") == "array") != ("items" in node):
            problems.append(f"{path}: an array needs items, and only an array has them")
        for key in node.get("required", []):
            if key not in node.get("properties", {}):
                problems.append(f"{path}: required field {key} is not a property")
    assert problems == []


def test_crd_metadata_schema_restricts_only_name() -> None:
    metadata = _schema()["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}
    assert set(metadata) <= {"type", "properties"}
    for field in ("apiVersion", "kind", "metadata"):
        assert "default" not in _schema()["properties"][field]


def test_crd_list_maps_have_required_scalar_keys() -> None:
    maps = [(p, n) for p, n in _nodes(_schema()) if n.get("x-kubernetes-list-type") == "map"]
    assert {p for p, _ in maps} == {".status.conditions", ".status.members"}
    for path, node in maps:
        item = node["items"]
        assert item["type"] == "object", path
        for key in node["x-kubernetes-list-map-keys"]:
            assert key in item.get("required", []), f"{path}: key {key} must be required"
            assert item["properties"][key]["type"] in {"string", "integer", "boolean"}, path


def test_crd_defaults_validate_against_their_own_schema() -> None:
    checked = 0
    for path, node in _nodes(_schema()):
        if "default" not in node:
            continue
        value = copy.deepcopy(node["default"])
        _apply_defaults(node, value)
        errors = [
            e.message
            for e in jsonschema.Draft202012Validator(_to_json_schema(node)).iter_errors(value)
        ]
        # The API server runs the rules on each default as it stands, *without* the defaults of
        # the fields inside it: kube-apiserver 1.36 refused this CRD when `spec`'s `default: {}`
        # met an unguarded `self.ackPolicy` ("no such key"), which the defaulted value hid here.
        errors += _cel_errors(node, copy.deepcopy(node["default"]), _MISSING, path)
        assert errors == [], f"{path}: default {node['default']!r}: {errors}"
        checked += 1
    assert checked >= 10


def test_crd_every_cel_rule_compiles_with_a_message() -> None:
    rules = [v for _, n in _nodes(_schema()) for v in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 6
    for validation in rules:
        assert validation.get("message"), validation["rule"]
        assert validation.get("reason", "FieldValueInvalid") in {
            "FieldValueInvalid",
            "FieldValueForbidden",
            "FieldValueRequired",
            "FieldValueDuplicate",
        }
        _program(validation["rule"])  # raises on anything cel-python can't parse


# ---- names, subresources, printer columns --------------------------------------------------------


def test_crd_names_match_the_contract() -> None:
    crd = _crd()
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{kubernetes.PLURAL}.{kubernetes.API_GROUP}"
    assert spec["group"] == kubernetes.API_GROUP
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == kubernetes.KIND
    assert names["listKind"] == f"{kubernetes.KIND}List"
    assert names["plural"] == kubernetes.PLURAL
    assert names["singular"] == kubernetes.KIND.lower()


def test_crd_short_name_and_categories() -> None:
    names = _crd()["spec"]["names"]
    assert names["shortNames"] == ["msp"]
    assert "engram" in names["categories"]
    assert "all" not in names["categories"]  # `kubectl delete all --all` spares them


def test_crd_serves_one_stored_version_with_status_subresource() -> None:
    version = _version()
    assert version["name"] == kubernetes.API_VERSION
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def _field(path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = _schema()
    for part in path.strip(".").split("."):
        node = (node or {}).get("properties", {}).get(part)
    return node


_COLUMN_TYPES = {"integer": {"integer"}, "number": {"number", "integer"}, "string": {"string"}}


def test_crd_printer_columns_point_at_fields_of_their_type() -> None:
    columns = _version()["additionalPrinterColumns"]
    default = [(c["name"], c["jsonPath"]) for c in columns if c.get("priority", 0) == 0]
    assert default == [
        ("Primary", ".status.primary"),
        ("Ready", ".status.ready"),
        ("Epoch", ".status.epoch"),
        ("Max Lag", ".status.maxLagSeconds"),
        ("Phase", ".status.phase"),
        ("Age", ".metadata.creationTimestamp"),
    ]
    for column in columns:
        path = column["jsonPath"]
        if path == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        field = _field(path)
        assert field is not None, f"column {column['name']}: {path} is not in the schema"
        assert field["type"] in _COLUMN_TYPES[column["type"]], column["name"]


def test_crd_max_lag_column_is_written_by_the_sidecar() -> None:
    assert "maxLagSeconds" in kubernetes.SIDECAR_STATUS_FIELDS
    assert {"primary", "ready", "epoch", "phase"} <= kubernetes.OPERATOR_STATUS_FIELDS


# ---- in step with the code -----------------------------------------------------------------------


def test_crd_status_fields_are_exactly_the_contract_writers() -> None:
    fields = set(_schema()["properties"]["status"]["properties"])
    owned = kubernetes.OPERATOR_STATUS_FIELDS | kubernetes.SIDECAR_STATUS_FIELDS
    assert not kubernetes.OPERATOR_STATUS_FIELDS & kubernetes.SIDECAR_STATUS_FIELDS
    # `kopf` is the framework's own bookkeeping (handler progress), written by the operator.
    assert fields == owned | {"kopf"}


def test_crd_spec_defaults_match_space_spec() -> None:
    stored, errors = admit(_space())
    assert errors == []
    spec = stored["spec"]
    default = model.SpaceSpec()
    assert spec["replicas"] == default.replicas
    assert spec["ackPolicy"] == default.ack_policy
    assert spec["maxLagOnFailover"] == default.max_lag_on_failover
    assert spec["allowLaggingFailover"] is default.allow_lagging_failover
    assert spec["failover"]["automatic"] is default.failover_automatic
    assert spec["paused"] is default.paused
    assert "targetPrimary" not in spec


def test_crd_spec_defaults_are_the_design_seed_constants() -> None:
    stored, _ = admit(_space(spec={}))
    assert stored["spec"] == {
        "replicas": 2,
        "ackPolicy": "async",
        "batch": {"maxEntries": 1000, "maxDelay": "10ms"},
        "compression": "none",
        "lag": {"warningSeconds": 1, "criticalSeconds": 5},
        "maxLagOnFailover": 10000,
        "allowLaggingFailover": False,
        "catchupThreshold": 10000,
        "failover": {"automatic": True},
        "paused": False,
        "deletionPolicy": "Retain",
    }
    assert stored["spec"]["lag"]["warningSeconds"] == status.LAG_WARNING_SECONDS


def _enum(path: str) -> set[str]:
    field = _field(path)
    assert field is not None, path
    return set(field["enum"])


def test_crd_enums_match_the_code() -> None:
    assert _enum(".spec.ackPolicy") == set(typing.get_args(model.AckPolicy))
    assert _enum(".spec.deletionPolicy") == set(retire.DELETION_POLICIES)
    assert _enum(".status.phase") == set(typing.get_args(status.Phase))
    member = _schema()["properties"]["status"]["properties"]["members"]["items"]["properties"]
    states = {a for part in typing.get_args(status.RowState) for a in typing.get_args(part)}
    assert set(member["state"]["enum"]) == states
    assert set(member["role"]["enum"]) == set(typing.get_args(model.Role))
    conditions = _field(".status.conditions")
    assert conditions is not None
    condition_status = conditions["items"]["properties"]["status"]["enum"]
    assert set(condition_status) == set(typing.get_args(status.ConditionStatus))


def test_crd_status_holds_what_the_code_writes() -> None:
    """A status the operator's own builders produce (plus the sidecar's fields) is accepted."""
    from engram_operator.election import DecisionRecord

    rows = [
        status.MemberRow(
            node=ids.NodeName("engram-0"),
            role="primary",
            applied_sequence=120,
            lag_entries=0,
            lag_seconds=0.0,
            state="Healthy",
        ),
        status.MemberRow(
            node=ids.NodeName("engram-1"),
            role="replica",
            applied_sequence=None,
            lag_entries=None,
            lag_seconds=None,
            state="Unknown",
        ),
    ]
    condition = status.Condition(
        type="Ready",
        status="True",
        reason="PrimaryServing",
        message="engram-0 accepts writes at epoch 3",
        last_transition_time="2026-01-02T03:04:05.123456+00:00",
    )
    record = DecisionRecord(
        space=ids.SpaceId("orders"),
        cause="engram-2 dead: lease expired",
        old_primary=ids.NodeName("engram-2"),
        old_primary_last_sequence=None,
        old_epoch=ids.Epoch(2),
        new_epoch=ids.Epoch(3),
        candidates=(),
        exclusions=(),
        winner=ids.NodeName("engram-0"),
        winner_sequence=ids.Sequence(120),
        entries_possibly_lost=None,
        reason="highest applied sequence",
        summary="promoted engram-0",
    )
    doc = {
        "phase": "Healthy",
        "primary": "engram-0",
        "replicas": ["engram-1"],
        "epoch": 3,
        "ready": "2/2",
        "observedGeneration": 4,
        "message": "primary engram-0 at epoch 3",
        "placedAt": "2026-01-02T03:04:05Z",
        "conditions": [condition.to_dict()],
        "lastPromotion": dict(record.to_dict()),
        "switchover": {"target": "engram-1", "state": "Waiting", "startedAt": 12.5},
        "members": [
            {**row.to_dict(), "catchUp": {"phase": "snapshot", "done": 1, "total": 9}}
            for row in rows
        ],
        "maxLagEntries": 0,
        "maxLagSeconds": 0.0,
        "membersReportedAt": "2026-01-02T03:04:06Z",
        "membersEpoch": 3,
    }
    assert set(doc) == kubernetes.OPERATOR_STATUS_FIELDS | kubernetes.SIDECAR_STATUS_FIELDS
    _, errors = admit(_space(spec={}, status=doc))
    assert errors == []


# ---- valid and invalid MemorySpaces --------------------------------------------------------------

_NAME_63 = "a" + "b" * 61 + "c"

VALID: dict[str, Json] = {
    "no-spec": _space(),
    "empty-spec": _space(spec={}),
    "no-replicas": _space(spec={"replicas": 0}),
    "one-with-one-replica": _space(spec={"replicas": 1, "ackPolicy": "one"}),
    "quorum-with-two-replicas": _space(spec={"replicas": 2, "ackPolicy": "quorum"}),
    "quorum-max-replicas-zstd": _space(
        spec={"replicas": 8, "ackPolicy": "quorum", "compression": "zstd"}
    ),
    "max-delay-zero": _space(spec={"batch": {"maxDelay": "0s"}}),
    "max-delay-microseconds": _space(spec={"batch": {"maxDelay": "500us", "maxEntries": 1}}),
    "max-delay-one-second": _space(spec={"batch": {"maxDelay": "1s", "maxEntries": 10000}}),
    "max-delay-fraction": _space(spec={"batch": {"maxDelay": "0.25s"}}),
    "lag-thresholds-equal": _space(spec={"lag": {"warningSeconds": 3, "criticalSeconds": 3}}),
    "lag-critical-only": _space(spec={"lag": {"criticalSeconds": 60}}),
    "manual-failover-target": _space(
        spec={"failover": {"automatic": False}, "targetPrimary": "engram-1"}
    ),
    "lagging-failover-allowed": _space(
        spec={"maxLagOnFailover": 0, "allowLaggingFailover": True, "catchupThreshold": 1}
    ),
    "paused": _space(spec={"paused": True}),
    "name-three-characters": _space(name="abc"),
    "name-sixty-three-characters": _space(name=_NAME_63),
    "null-target-is-dropped": _space(spec={"targetPrimary": None}),
}

INVALID: dict[str, tuple[Json, str]] = {
    "too-many-replicas": (_space(spec={"replicas": 9}), "greater than the maximum of 8"),
    "negative-replicas": (_space(spec={"replicas": -1}), "less than the minimum of 0"),
    "replicas-not-integer": (_space(spec={"replicas": "2"}), "is not of type 'integer'"),
    "unknown-ack-policy": (_space(spec={"ackPolicy": "all"}), "'all' is not one of"),
    "quorum-one-replica": (
        _space(spec={"replicas": 1, "ackPolicy": "quorum"}),
        "ackPolicy quorum needs replicas >= 2",
    ),
    "quorum-no-replicas": (
        _space(spec={"replicas": 0, "ackPolicy": "quorum"}),
        "ackPolicy quorum needs replicas >= 2",
    ),
    "one-no-replicas": (
        _space(spec={"replicas": 0, "ackPolicy": "one"}),
        "need replicas >= 1",
    ),
    "max-delay-over-one-second": (
        _space(spec={"batch": {"maxDelay": "1500ms"}}),
        "maxDelay must be at most 1s",
    ),
    "max-delay-without-unit": (_space(spec={"batch": {"maxDelay": "10"}}), "does not match"),
    "max-delay-minutes": (_space(spec={"batch": {"maxDelay": "1m"}}), "does not match"),
    "max-delay-integer": (_space(spec={"batch": {"maxDelay": 10}}), "is not of type 'string'"),
    "max-entries-zero": (_space(spec={"batch": {"maxEntries": 0}}), "less than the minimum"),
    "max-entries-too-many": (
        _space(spec={"batch": {"maxEntries": 10001}}),
        "greater than the maximum of 10000",
    ),
    "unknown-compression": (_space(spec={"compression": "gzip"}), "'gzip' is not one of"),
    "critical-below-warning": (
        _space(spec={"lag": {"warningSeconds": 10}}),
        "criticalSeconds must be at least lag.warningSeconds",
    ),
    "warning-zero": (_space(spec={"lag": {"warningSeconds": 0}}), "less than the minimum of 1"),
    "negative-max-lag-on-failover": (
        _space(spec={"maxLagOnFailover": -1}),
        "less than the minimum of 0",
    ),
    "catchup-threshold-zero": (_space(spec={"catchupThreshold": 0}), "less than the minimum"),
    "paused-not-boolean": (_space(spec={"paused": "yes"}), "is not of type 'boolean'"),
    "target-not-a-node-name": (_space(spec={"targetPrimary": "Engram_1"}), "does not match"),
    "target-empty": (_space(spec={"targetPrimary": ""}), "should be non-empty"),
    "misspelt-field": (_space(spec={"replica": 3}), "'replica' was unexpected"),
    "name-too-short": (_space(name="ab"), "must be 3 to 63 characters long"),
    "name-too-long": (_space(name=_NAME_63 + "d"), "must be 3 to 63 characters long"),
    "name-with-underscore": (_space(name="my_space"), "does not match"),
    "name-with-dot": (_space(name="my.space"), "does not match"),
    "name-ends-with-dash": (_space(name="space-"), "does not match"),
    "status-unknown-phase": (_space(status={"phase": "Running"}), "'Running' is not one of"),
    "status-condition-status": (
        _space(status={"conditions": [{"type": "Ready", "status": "yes"}]}),
        "'yes' is not one of",
    ),
    "status-condition-without-type": (
        _space(status={"conditions": [{"status": "True"}]}),
        "'type' is a required property",
    ),
    "status-duplicate-member": (
        _space(status={"members": [{"node": "engram-0"}, {"node": "engram-0"}]}),
        "duplicate entries for keys ['node']",
    ),
    "status-member-state": (
        _space(status={"members": [{"node": "engram-0", "state": "Syncing"}]}),
        "'Syncing' is not one of",
    ),
    "status-time-not-rfc3339": (
        _space(status={"placedAt": "yesterday"}),
        "is not a 'date-time'",
    ),
}


@pytest.mark.parametrize("manifest", VALID.values(), ids=VALID.keys())
def test_memoryspace_valid_manifest_is_admitted(manifest: Json) -> None:
    _, errors = admit(manifest)
    assert errors == []


@pytest.mark.parametrize(("manifest", "why"), INVALID.values(), ids=INVALID.keys())
def test_memoryspace_invalid_manifest_is_refused(manifest: Json, why: str) -> None:
    _, errors = admit(manifest)
    assert errors, "admitted, but should have been refused"
    assert any(why in e for e in errors), errors


# Updates: (stored spec, new spec, refusal or None). Transition rules see both.
UPDATES: dict[str, tuple[Json, Json, str | None]] = {
    "pause-keeping-target": (
        {"targetPrimary": "engram-1"},
        {"targetPrimary": "engram-1", "paused": True},
        None,
    ),
    "unpause-and-set-target": ({"paused": True}, {"targetPrimary": "engram-1"}, None),
    "clear-target-while-paused": (
        {"paused": True, "targetPrimary": "engram-1"},
        {"paused": True},
        None,
    ),
    "pause-and-set-target": ({}, {"paused": True, "targetPrimary": "engram-1"}, "while paused"),
    "set-target-while-paused": (
        {"paused": True},
        {"paused": True, "targetPrimary": "engram-1"},
        "while paused",
    ),
    "change-target-while-paused": (
        {"paused": True, "targetPrimary": "engram-1"},
        {"paused": True, "targetPrimary": "engram-2"},
        "while paused",
    ),
    "drop-replicas-under-quorum": (
        {"replicas": 2, "ackPolicy": "quorum"},
        {"replicas": 1, "ackPolicy": "quorum"},
        "ackPolicy quorum needs replicas >= 2",
    ),
    "drop-replicas-and-quorum-together": (
        {"replicas": 2, "ackPolicy": "quorum"},
        {"replicas": 1, "ackPolicy": "one"},
        None,
    ),
}


@pytest.mark.parametrize(("before", "after", "why"), UPDATES.values(), ids=UPDATES.keys())
def test_memoryspace_update_transition_rules(before: Json, after: Json, why: str | None) -> None:
    stored, errors = admit(_space(spec=before))
    assert errors == []
    _, errors = admit(_space(spec=after), old=stored)
    if why is None:
        assert errors == []
    else:
        assert any(why in e for e in errors), errors


def test_memoryspace_every_cel_rule_refuses_some_case() -> None:
    """No rule is dead weight or untested: each one's message shows up in some refusal above."""
    errors = [e for manifest, _ in INVALID.values() for e in admit(manifest)[1]]
    for before, after, _ in UPDATES.values():
        errors += admit(_space(spec=after), old=admit(_space(spec=before))[0])[1]
    rules = [v for _, n in _nodes(_schema()) for v in n.get("x-kubernetes-validations", [])]
    for validation in rules:
        assert any(validation["message"] in e for e in errors), validation["rule"]


def test_memoryspace_status_update_leaves_paused_target_alone() -> None:
    """A status write re-validates the object; the transition rule passes an unchanged spec."""
    stored, errors = admit(_space(spec={"targetPrimary": "engram-1"}))
    assert errors == []
    stored["spec"]["paused"] = True  # stored before the rule existed, say
    _, errors = admit({**stored, "status": {"phase": "Paused"}}, old=stored)
    assert errors == []


def test_memoryspace_create_skips_transition_rules() -> None:
    _, errors = admit(_space(spec={"paused": True, "targetPrimary": "engram-1"}))
    assert errors == []


# ---- the examples --------------------------------------------------------------------------------


def _examples() -> list[Any]:
    return [
        pytest.param(doc, id=f"{path.stem}-{i}")
        for path in EXAMPLES
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
    ]


def test_examples_cover_the_documented_cases() -> None:
    assert {p.stem for p in EXAMPLES} >= {"minimal", "quorum-zstd", "switchover", "paused"}


@pytest.mark.parametrize("manifest", _examples())
def test_examples_validate_against_crd(manifest: Json) -> None:
    assert manifest["apiVersion"] == f"{kubernetes.API_GROUP}/{kubernetes.API_VERSION}"
    assert manifest["kind"] == kubernetes.KIND
    ids.validate_space_id(manifest["metadata"]["name"])
    _, errors = admit(manifest)
    assert errors == []


def test_examples_carry_no_namespace() -> None:
    """`kubectl apply -n <release namespace> -f` puts them where the release is."""
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert "namespace" not in doc["metadata"], path.name


def test_examples_switchover_and_quorum_say_what_they_show() -> None:
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES}
    assert docs["switchover"]["spec"]["targetPrimary"]
    assert docs["paused"]["spec"]["paused"] is True
    quorum = docs["quorum-zstd"]["spec"]
    assert (quorum["ackPolicy"], quorum["compression"]) == ("quorum", "zstd")
    assert set(quorum["lag"]) == {"warningSeconds", "criticalSeconds"}


# ---- the docs ------------------------------------------------------------------------------------


def _leaf_paths(node: dict[str, Any], prefix: str) -> Iterator[str]:
    for name, sub in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path
        if sub.get("type") == "object" and not sub.get("x-kubernetes-preserve-unknown-fields"):
            yield from _leaf_paths(sub, path)


def test_crd_docs_describe_every_field_column_and_rule() -> None:
    text = DOCS.read_text()
    spec = _schema()["properties"]["spec"]
    status_schema = _schema()["properties"]["status"]
    missing = [f"spec.{p}" for p in _leaf_paths(spec, "") if f"`{p}`" not in text]
    missing += [f"status.{p}" for p in status_schema["properties"] if f"`{p}`" not in text]
    missing += [
        f"column {c['name']}"
        for c in _version()["additionalPrinterColumns"]
        if f"| {c['name']} |" not in text
    ]
    rules = [v for _, n in _nodes(_schema()) for v in n.get("x-kubernetes-validations", [])]
    missing += [
        f"rule {v['rule']}" for v in rules if f"`{' '.join(v['rule'].split())}`" not in text
    ]
    assert missing == []
