"""The operator's part of MemorySpace.status, assembled from one tick (pure).

Owns which fields the operator writes — `engram_contract.kubernetes.OPERATOR_STATUS_FIELDS` only,
never `members` or the lag totals, which the space's primary sidecar writes (design §3) — and
what goes in them:
`status.build_status`'s phase, placement, conditions and message, plus `ready`, the SpecValid
condition, `switchover`, `placedAt` and `observedGeneration`. Also the fingerprint that decides
whether a patch is worth sending. No I/O, no clocks read here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from engram_contract.ids import NodeName, SpaceId
from engram_contract.kubernetes import OPERATOR_STATUS_FIELDS
from engram_operator.model import MemberReport, Placement, SpaceSpec, SwitchoverProgress
from engram_operator.reconcile import gist
from engram_operator.status import Condition, Operation, SpaceStatus, build_status
from engram_operator.verdict import Verdict

_STREAMING: Final = frozenset({"Healthy", "Lagging", "CatchingUp"})


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusUpdate:
    """What one tick writes: the patch, the conditions in it, a standing under-replication."""

    patch: dict[str, object]
    conditions: tuple[Condition, ...]
    under_replicated: str | None


def status_update(
    *,
    space: SpaceId,
    spec: SpaceSpec,
    placement: Placement | None,
    placement_problem: str | None,
    switchover: SwitchoverProgress | None,
    placed_at: str | None,
    previous: Sequence[Condition],
    operation: Operation,
    sentence: str,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    generation: object,
    problem: str | None,
    now: float,
    wall: float,
    now_iso: str,
) -> StatusUpdate:
    """The operator's status patch for one tick. `sentence` is the tick's; `problem` an invalid
    spec's; `now` (monotonic) and `wall` (Unix) are the same instant."""
    built = build_status(
        space=space,
        spec=spec,
        placement=placement,
        verdicts=verdicts,
        reports=reports,
        previous_conditions=previous,
        now_iso=now_iso,
        operation=operation,
        operation_message=sentence,
        placement_problem=sentence if placement is None else placement_problem,
    )
    refused = None
    if switchover is not None and switchover.abort_reason.startswith("cannot"):
        refused = f"{switchover.abort_reason}; set spec.targetPrimary to a live replica"
    earlier = {c.type: c for c in previous}
    valid = spec_condition(problem, refused, earlier.get("SpecValid"), now_iso)
    rows = {r.node: r.state for r in built.members}
    fields: dict[str, object] = {
        "ready": ready_text(spec, placement, verdicts, reports, rows),
        "switchover": switchover_to_status(switchover, now=now, wall=wall, waiting=sentence),
    }
    if isinstance(generation, int):
        fields["observedGeneration"] = generation
    if placed_at:
        fields["placedAt"] = placed_at
    if problem:
        fields["message"] = f"{problem}; {built.message}"
    degraded = next((c for c in built.conditions if c.type == "Degraded"), None)
    short = degraded is not None and degraded.reason == "TooFewNodes" and placement is not None
    return StatusUpdate(
        patch=operator_status(built, extra_conditions=(valid,), fields=fields),
        conditions=(*built.conditions, valid),
        under_replicated=degraded.message if short and degraded is not None else None,
    )


def switchover_to_status(
    progress: SwitchoverProgress | None, *, now: float, wall: float, waiting: str
) -> dict[str, object] | None:
    """status.switchover for `progress` (None clears it). Times are stored as Unix seconds."""
    if progress is None:
        return None
    doc: dict[str, object] = {
        "target": progress.target,
        "state": "Aborted" if progress.aborted_at is not None else "InProgress",
        "startedAtUnix": round(wall - (now - progress.started_at), 3),
    }
    if progress.aborted_at is not None:
        doc["abortedAtUnix"] = round(wall - (now - progress.aborted_at), 3)
        doc["abortReason"] = progress.abort_reason
    elif waiting:
        doc["reason"] = waiting
    return doc


def ready_text(
    spec: SpaceSpec,
    placement: Placement | None,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    rows_state: Mapping[NodeName, str],
) -> str:
    """status.ready: members serving (the confirmed primary) or streaming / 1 + spec.replicas."""
    ready = 0
    if placement is not None:
        for node in placement.members:
            verdict = verdicts.get(node)
            if verdict is None or verdict.state != "Alive":
                continue
            report = reports.get(node)
            if node == placement.primary:
                ready += report is not None and (report.role, report.epoch) == (
                    "primary",
                    placement.epoch,
                )
            else:
                ready += rows_state.get(node) in _STREAMING
    return f"{ready}/{spec.replicas + 1}"


def spec_condition(
    problem: str | None, refused: str | None, previous: Condition | None, now_iso: str
) -> Condition:
    """The SpecValid condition: False while the spec is invalid or asks for the impossible."""
    if problem:
        status, reason, message = "False", "InvalidSpec", problem
    elif refused:
        status, reason, message = "False", "TargetPrimaryRefused", refused
    else:
        status, reason, message = "True", "AsRequested", ""
    since = now_iso
    if previous is not None and previous.status == status and previous.last_transition_time:
        since = previous.last_transition_time
    return Condition(
        type="SpecValid",
        status="True" if status == "True" else "False",
        reason=reason,
        message=message,
        last_transition_time=since,
    )


def operator_status(
    built: SpaceStatus, *, extra_conditions: Sequence[Condition], fields: Mapping[str, object]
) -> dict[str, object]:
    """The operator's status patch: `built`'s operator fields, conditions and `fields`."""
    patch: dict[str, object] = dict(built.to_operator_dict())
    patch["conditions"] = [c.to_dict() for c in (*built.conditions, *extra_conditions)]
    patch.update(fields)
    unknown = set(patch) - OPERATOR_STATUS_FIELDS
    if unknown:
        raise ValueError(f"not operator status fields: {sorted(unknown)}")
    return patch


def fingerprint(patch: Mapping[str, object]) -> str:
    """The patch with the numbers in its prose masked: a change of numbers in a message alone
    (a lease age, a lag) is not worth a write on every tick; any other change is."""

    def mask(value: object, key: str = "") -> object:
        if isinstance(value, str) and key in ("message", "reason"):
            return gist(value)
        if isinstance(value, Mapping):
            return {k: mask(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        return value

    return json.dumps(mask(patch), sort_keys=True)


def holds(body: Mapping[str, object], patch: Mapping[str, object]) -> dict[str, object]:
    """What the object's status holds now for each field of `patch` (None where it has none), to
    compare with `patch` by `fingerprint`."""
    status = body.get("status")
    current = status if isinstance(status, Mapping) else {}
    return {k: current.get(k) for k in patch}


def newest_version(*versions: str | None) -> str | None:
    """The newest of some resourceVersions of one object. They are opaque strings to clients,
    but the API server's are etcd revisions, integers that only grow: compare as integers when
    all are, else trust the first."""
    known = [v for v in versions if v]
    if not known:
        return None
    if all(v.isdigit() for v in known):
        return max(known, key=int)
    return known[0]
