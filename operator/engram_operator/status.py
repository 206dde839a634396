"""Status aggregation: phase, conditions, member table and lag of one space (MemorySpace.status).

Owns how observations become what a person reads in `kubectl get msp` and `kubectl describe`:
a phase, Kubernetes-shaped conditions (Ready, Replicating, Degraded, FailingOver, SplitBrain)
whose lastTransitionTime only moves when their status flips, a per-member table with lag in
entries and seconds, and split-brain detection. Pure: the caller passes `now` as an ISO string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypedDict

from engram_contract.ids import Epoch, NodeName, SpaceId
from engram_contract.kubernetes import OPERATOR_STATUS_FIELDS
from engram_operator.model import MemberReport, MemberState, Placement, Role, SpaceSpec
from engram_operator.verdict import Verdict

Phase = Literal[
    "Pending", "Placing", "Healthy", "Degraded", "FailingOver", "SwitchingOver", "Paused", "Failed"
]
Operation = Literal["Idle", "FailingOver", "SwitchingOver"]
ConditionType = Literal["Ready", "Replicating", "Degraded", "FailingOver", "SplitBrain"]
ConditionStatus = Literal["True", "False", "Unknown"]
# The design's replica states, plus two the control plane adds: no report yet, or not reachable.
RowState = MemberState | Literal["Unknown", "Unreachable"]

# Lag thresholds of design §7, unless spec.lag sets them (the sidecars' defaults too): a
# replica whose oldest missing entry is older than the warning is Lagging, than the critical
# one Degraded.
LAG_WARNING_SECONDS: Final = 1.0
LAG_CRITICAL_SECONDS: Final = 5.0


def lag_thresholds(spec: SpaceSpec) -> tuple[float, float]:
    """(warning, critical) seconds of lag for `spec`'s space."""
    t = spec.tuning
    warning = LAG_WARNING_SECONDS if t.lag_warning_seconds is None else t.lag_warning_seconds
    critical = LAG_CRITICAL_SECONDS if t.lag_critical_seconds is None else t.lag_critical_seconds
    return warning, critical


# Replica states that still receive the stream, so replication is happening.
_STREAMING: Final[frozenset[str]] = frozenset({"Healthy", "Lagging", "CatchingUp"})


class ConditionDict(TypedDict):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """One entry of status.conditions, in the Kubernetes shape."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str

    def to_dict(self) -> ConditionDict:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Condition:
        """Read a condition back from status; an unrecognised status reads as "Unknown"."""
        status = data.get("status")
        return cls(
            type=str(data.get("type", "")),
            status="True" if status == "True" else "False" if status == "False" else "Unknown",
            reason=str(data.get("reason", "")),
            message=str(data.get("message", "")),
            last_transition_time=str(data.get("lastTransitionTime", "")),
        )


class MemberRowDict(TypedDict):
    node: str
    role: str
    appliedSequence: int | None
    lagEntries: int | None
    lagSeconds: float | None
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberRow:
    """One line of the member table. None means not reported yet."""

    node: NodeName
    role: Role
    applied_sequence: int | None
    lag_entries: int | None
    lag_seconds: float | None
    state: RowState

    def to_dict(self) -> MemberRowDict:
        return {
            "node": self.node,
            "role": self.role,
            "appliedSequence": self.applied_sequence,
            "lagEntries": self.lag_entries,
            "lagSeconds": self.lag_seconds,
            "state": self.state,
        }


class SpaceStatusDict(TypedDict):
    phase: str
    primary: str | None
    replicas: list[str]
    epoch: int | None
    members: list[MemberRowDict]
    maxLagEntries: int
    maxLagSeconds: float
    conditions: list[ConditionDict]
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpaceStatus:
    """Everything the control plane writes to one space's status, plus a one-line message."""

    phase: Phase
    placement: Placement | None
    members: tuple[MemberRow, ...]
    max_lag_entries: int
    max_lag_seconds: float
    conditions: tuple[Condition, ...]
    message: str

    def to_dict(self) -> SpaceStatusDict:
        p = self.placement
        return {
            "phase": self.phase,
            "primary": p.primary if p else None,
            "replicas": list(p.replicas) if p else [],
            "epoch": p.epoch if p else None,
            "members": [m.to_dict() for m in self.members],
            "maxLagEntries": self.max_lag_entries,
            "maxLagSeconds": self.max_lag_seconds,
            "conditions": [c.to_dict() for c in self.conditions],
            "message": self.message,
        }

    def to_operator_dict(self) -> dict[str, object]:
        """Only the fields the control plane writes (contract.OPERATOR_STATUS_FIELDS).

        `members` and the lag totals belong to the space's primary sidecar (design §3: no field
        has two writers), so a Kubernetes status patch from the operator must leave them out.
        """
        return {k: v for k, v in self.to_dict().items() if k in OPERATOR_STATUS_FIELDS}


def detect_split_brain(placement: Placement, reports: Iterable[MemberReport]) -> str | None:
    """Why more than one node may be accepting writes, or None.

    Split brain is two nodes reporting primary at the same epoch, or a node other than the
    placement's primary reporting primary at the current epoch or later. A deposed primary that
    still reports an older epoch is not split brain: any frame it sends is rejected by epoch.
    """
    claims = sorted((r for r in reports if r.role == "primary"), key=lambda r: (r.epoch, r.node))
    by_epoch: dict[Epoch, list[NodeName]] = {}
    for report in claims:
        by_epoch.setdefault(report.epoch, []).append(report.node)
    for epoch, nodes in by_epoch.items():
        if len(nodes) > 1:
            both = "both" if len(nodes) == 2 else "all"
            return f"{' and '.join(nodes)} {both} report primary at epoch {epoch}"
    for report in claims:
        if report.node != placement.primary and report.epoch >= placement.epoch:
            return (
                f"{report.node} reports primary at epoch {report.epoch}, but the primary is"
                f" {placement.primary} at epoch {placement.epoch}"
            )
    return None


def member_table(
    placement: Placement,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
) -> tuple[MemberRow, ...]:
    """One row per member, primary first. Lag entries = primary's last sequence − applied."""
    primary_report = reports.get(placement.primary)
    rows = []
    for node in placement.members:
        role: Role = "primary" if node == placement.primary else "replica"
        report = reports.get(node)
        verdict = verdicts.get(node)
        state: RowState = report.state if report else "Unknown"
        if verdict is not None and verdict.state == "Dead":
            state = "Failed"
        elif verdict is not None and verdict.state == "Suspect":
            state = "Unreachable"
        lag_entries = lag_seconds = None
        if report is not None and role == "primary":
            lag_entries, lag_seconds = 0, 0.0
        elif report is not None:
            lag_seconds = report.lag_seconds
            if primary_report is not None:
                lag_entries = max(0, primary_report.applied_sequence - report.applied_sequence)
        rows.append(
            MemberRow(
                node=node,
                role=role,
                applied_sequence=report.applied_sequence if report else None,
                lag_entries=lag_entries,
                lag_seconds=lag_seconds,
                state=state,
            )
        )
    return tuple(rows)


def build_status(
    *,
    space: SpaceId,
    spec: SpaceSpec,
    placement: Placement | None,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    previous_conditions: Iterable[Condition],
    now_iso: str,
    operation: Operation = "Idle",
    operation_message: str = "",
    placement_problem: str | None = None,
) -> SpaceStatus:
    """The status of `space`. `operation` comes from the reconcile decision of the same tick."""
    if placement is None:
        problem = placement_problem or f"space {space} is waiting for nodes"
        rows: tuple[MemberRow, ...] = ()
        split = None
        problems: list[tuple[str, str]] = [("NotPlaced", problem)]
    else:
        rows = member_table(placement, verdicts, reports)
        split = detect_split_brain(placement, reports.values())
        problems = _problems(
            spec,
            placement=placement,
            rows=rows,
            verdicts=verdicts,
            split=split,
            placement_problem=placement_problem,
        )
    replicas = [r for r in rows if r.role == "replica"]
    max_entries = max((r.lag_entries or 0 for r in replicas), default=0)
    max_seconds = max((r.lag_seconds or 0.0 for r in replicas), default=0.0)
    wanted: dict[ConditionType, tuple[ConditionStatus, str, str]] = {
        "Ready": _ready(placement, verdicts, reports, problems),
        "Replicating": _replicating(spec, replicas),
        "Degraded": ("True", *problems[0]) if problems else ("False", "AsDesired", ""),
        "FailingOver": _failing_over(operation, operation_message),
        "SplitBrain": ("True", "MultiplePrimaries", split) if split else _NO_SPLIT,
    }
    previous = {c.type: c for c in previous_conditions}
    conditions = tuple(
        _condition(type_, *value, previous=previous.get(type_), now_iso=now_iso)
        for type_, value in wanted.items()
    )
    phase = _phase(
        spec,
        placement=placement,
        verdicts=verdicts,
        reports=reports,
        operation=operation,
        problems=problems,
    )
    message = "; ".join(m for _, m in problems) or _healthy_message(placement, rows)
    return SpaceStatus(
        phase=phase,
        placement=placement,
        members=rows,
        max_lag_entries=max_entries,
        max_lag_seconds=max_seconds,
        conditions=conditions,
        message=message,
    )


_NO_SPLIT: Final[tuple[ConditionStatus, str, str]] = ("False", "SinglePrimary", "")


def _condition(
    type_: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    previous: Condition | None,
    now_iso: str,
) -> Condition:
    # Kubernetes convention: the transition time moves only when the status itself changes.
    since = now_iso
    if previous is not None and previous.status == status and previous.last_transition_time:
        since = previous.last_transition_time
    return Condition(
        type=type_, status=status, reason=reason, message=message, last_transition_time=since
    )


def _primary_confirmed(placement: Placement, reports: Mapping[NodeName, MemberReport]) -> bool:
    report = reports.get(placement.primary)
    return report is not None and report.role == "primary" and report.epoch == placement.epoch


def _problems(
    spec: SpaceSpec,
    *,
    placement: Placement,
    rows: tuple[MemberRow, ...],
    verdicts: Mapping[NodeName, Verdict],
    split: str | None,
    placement_problem: str | None,
) -> list[tuple[str, str]]:
    """(Reason, message) for every way the space falls short, most serious first."""
    found: list[tuple[str, str]] = []
    warning, critical = lag_thresholds(spec)
    if split:
        found.append(("SplitBrain", split))
    blind = next((v for v in verdicts.values() if v.state == "Unknown"), None)
    if blind is not None:
        # The control plane can't tell who is alive; one line says so, not one per member.
        found.append(("LivenessUnknown", blind.reason))
    for row in rows:
        verdict = verdicts.get(row.node)
        if verdict is not None and verdict.state in ("Suspect", "Dead"):
            who = "primary" if row.role == "primary" else "replica"
            reason = "PrimaryUnreachable" if who == "primary" else "ReplicaUnreachable"
            found.append((reason, f"{who} {row.node} {verdict.state.lower()}: {verdict.reason}"))
    if len(placement.replicas) < spec.replicas:
        found.append(
            (
                "TooFewNodes",
                placement_problem
                or f"{len(placement.replicas)} of {spec.replicas} replicas placed",
            )
        )
    for row in rows:
        verdict = verdicts.get(row.node)
        if row.role != "replica" or (verdict is not None and verdict.state != "Alive"):
            continue  # the primary's problems and unreachable replicas are listed above
        seconds = row.lag_seconds or 0.0
        if row.state in ("Degraded", "Failed"):
            found.append(("ReplicaDegraded", f"replica {row.node} is {row.state}"))
        elif row.state == "Unknown":
            found.append(("ReplicaNotReporting", f"replica {row.node} has not reported"))
        elif seconds > critical:
            found.append(
                (
                    "ReplicaDegraded",
                    f"replica {row.node} is {seconds:.1f} s behind,"
                    f" past the {critical:g} s critical lag (spec.lag.criticalSeconds)",
                )
            )
        elif row.state != "Healthy" or seconds >= warning:
            lag = f"{row.lag_entries} entries / {row.lag_seconds or 0.0:.1f} s behind"
            found.append(("ReplicaLagging", f"replica {row.node} is {row.state}, {lag}"))
    found.sort(key=lambda p: _SEVERITY.index(p[0]))
    return found


_SEVERITY: Final = (
    "SplitBrain",
    "LivenessUnknown",
    "PrimaryUnreachable",
    "ReplicaUnreachable",
    "TooFewNodes",
    "ReplicaDegraded",
    "ReplicaNotReporting",
    "ReplicaLagging",
)


def _ready(
    placement: Placement | None,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    problems: list[tuple[str, str]],
) -> tuple[ConditionStatus, str, str]:
    if placement is None:
        return "False", "NotPlaced", problems[0][1]
    primary = placement.primary
    verdict = verdicts.get(primary)
    if verdict is not None and verdict.state == "Unknown":
        return "Unknown", "LivenessUnknown", verdict.reason
    if verdict is None or verdict.state != "Alive":
        detail = f"{verdict.state.lower()}: {verdict.reason}" if verdict else "no verdict yet"
        return "False", "PrimaryUnreachable", f"primary {primary} {detail}"
    if not _primary_confirmed(placement, reports):
        return (
            "False",
            "PrimaryNotConfirmed",
            f"waiting for {primary} to report primary at epoch {placement.epoch}",
        )
    return "True", "PrimaryServing", f"{primary} accepts writes at epoch {placement.epoch}"


def _replicating(spec: SpaceSpec, replicas: list[MemberRow]) -> tuple[ConditionStatus, str, str]:
    if spec.replicas == 0:
        return "False", "NoReplicasRequested", "spec.replicas is 0"
    if not replicas:
        return "False", "NoReplicas", "no replica is placed"
    stopped = [f"{r.node} ({r.state})" for r in replicas if r.state not in _STREAMING]
    if stopped:
        return "False", "ReplicaNotStreaming", "not streaming: " + ", ".join(stopped)
    return "True", "AllReplicasStreaming", f"{len(replicas)} of {len(replicas)} replicas streaming"


# What holds a failover up, as the tick's sentence says it (election and reconcile write these
# words): the FailingOver condition's reason names it, so `kubectl get` shows why nobody leads.
_FAILOVER_HOLDS: Final = (
    ("quorum needs", "QuorumUnreachable"),
    ("waiting out the old primary's write lease", "WaitingForWriteLease"),
    ("fencing every member", "Fencing"),
)


def _failing_over(operation: Operation, message: str) -> tuple[ConditionStatus, str, str]:
    if operation == "FailingOver":
        reason = next((r for words, r in _FAILOVER_HOLDS if words in message), "PrimaryFailed")
        return "True", reason, message
    return "False", "NoFailover", ""


def _phase(
    spec: SpaceSpec,
    *,
    placement: Placement | None,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    operation: Operation,
    problems: list[tuple[str, str]],
) -> Phase:
    if spec.paused:
        return "Paused"
    if placement is None:
        return "Pending"
    if operation != "Idle":
        return operation
    primary = verdicts.get(placement.primary)
    if primary is not None and primary.state == "Dead":
        return "Failed"
    if not _primary_confirmed(placement, reports):
        return "Placing"
    return "Degraded" if problems else "Healthy"


def _healthy_message(placement: Placement | None, rows: tuple[MemberRow, ...]) -> str:
    if placement is None:
        return ""
    replicas = [r for r in rows if r.role == "replica"]
    entries = max((r.lag_entries or 0 for r in replicas), default=0)
    seconds = max((r.lag_seconds or 0.0 for r in replicas), default=0.0)
    return (
        f"primary {placement.primary} at epoch {placement.epoch};"
        f" {len(replicas)} replicas streaming; max lag {entries} entries / {seconds:.1f} s"
    )
