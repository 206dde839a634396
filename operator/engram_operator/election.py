"""Election: which replica to promote when a primary fails, and the record that explains it.

Owns the promotion rule of design §4: the eligible replica with the highest applied sequence wins,
ties go to the lowest node name. A replica is ineligible when it is not Alive, has not reported,
is still at an older epoch (its log may hold a deposed primary's divergent tail), or is more than
`max_lag_on_failover` entries behind — unless the user allows lagging failover. The decision is
returned as a `DecisionRecord` (candidates, exclusions with reasons, winner, entries possibly
lost) for status, an Event and the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

from engram_operator.model import MemberReport, Placement, SpaceSpec
from engram_operator.verdict import Verdict
from engram_sidecar.contract import Epoch, NodeName, Sequence, SpaceId


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """An eligible replica and how far behind the most data known to exist it is."""

    node: NodeName
    applied_sequence: Sequence
    lag_entries: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Exclusion:
    """A replica that may not be promoted, and why."""

    node: NodeName
    reason: str


class CandidateDict(TypedDict):
    node: str
    appliedSequence: int
    lagEntries: int


class ExclusionDict(TypedDict):
    node: str
    reason: str


class DecisionRecordDict(TypedDict):
    space: str
    cause: str
    oldPrimary: str
    oldPrimaryLastSequence: int | None
    oldEpoch: int
    newEpoch: int
    candidates: list[CandidateDict]
    exclusions: list[ExclusionDict]
    winner: str | None
    winnerSequence: int | None
    entriesPossiblyLost: int | None
    reason: str
    summary: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRecord:
    """One promotion decision, complete enough to explain it later (status.lastPromotion).

    `entries_possibly_lost` is the most data known to exist (the old primary's last sequence, or
    a replica's if higher) minus the winner's applied sequence, floored at 0; None when the old
    primary never reported, since then nobody knows what it had.
    """

    space: SpaceId
    cause: str
    old_primary: NodeName
    old_primary_last_sequence: Sequence | None
    old_epoch: Epoch
    new_epoch: Epoch
    candidates: tuple[Candidate, ...]
    exclusions: tuple[Exclusion, ...]
    winner: NodeName | None
    winner_sequence: Sequence | None
    entries_possibly_lost: int | None
    reason: str
    summary: str

    def to_dict(self) -> DecisionRecordDict:
        """The record as JSON-ready data with Kubernetes-style camelCase keys."""
        return {
            "space": self.space,
            "cause": self.cause,
            "oldPrimary": self.old_primary,
            "oldPrimaryLastSequence": self.old_primary_last_sequence,
            "oldEpoch": self.old_epoch,
            "newEpoch": self.new_epoch,
            "candidates": [
                {"node": c.node, "appliedSequence": c.applied_sequence, "lagEntries": c.lag_entries}
                for c in self.candidates
            ],
            "exclusions": [{"node": e.node, "reason": e.reason} for e in self.exclusions],
            "winner": self.winner,
            "winnerSequence": self.winner_sequence,
            "entriesPossiblyLost": self.entries_possibly_lost,
            "reason": self.reason,
            "summary": self.summary,
        }


def elect(
    *,
    space: SpaceId,
    spec: SpaceSpec,
    placement: Placement,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    cause: str,
    only: NodeName | None = None,
) -> DecisionRecord:
    """Choose a new primary among `placement.replicas` to replace `placement.primary`.

    `reports` holds each member's last known progress (a dead old primary's last report too).
    `cause` says why the old primary is being replaced, e.g. "node-a dead: lease expired ...".
    `only` restricts the choice to one replica (a manual failover to spec.targetPrimary); the
    others are then excluded with that reason.
    """
    member_reports = [reports[m] for m in placement.members if m in reports]
    old_report = reports.get(placement.primary)
    # Above every epoch recorded or reported by anyone (a non-member too), so it fences them all.
    new_epoch = Epoch(max([placement.epoch, *(r.epoch for r in reports.values())]) + 1)
    # The most data known to exist: the old primary's last report, or a replica of this epoch
    # that reported more (the primary's report is older). A replica still at an older epoch may
    # hold a deposed primary's divergent tail, which is not data anyone should count on.
    current = [r for r in member_reports if r.epoch >= placement.epoch or r is old_report]
    reference = max((r.applied_sequence for r in current), default=0)
    candidates: list[Candidate] = []
    exclusions: list[Exclusion] = []
    for node in placement.replicas:
        report = reports.get(node)
        why = _ineligible(
            node,
            spec=spec,
            placement=placement,
            verdict=verdicts.get(node),
            report=report,
            reference=reference,
        )
        if why is None and only is not None and node != only:
            why = f"not the requested target {only}"
        if why is not None:
            exclusions.append(Exclusion(node=node, reason=why))
        elif report is not None:
            lag = reference - report.applied_sequence
            candidates.append(
                Candidate(node=node, applied_sequence=report.applied_sequence, lag_entries=lag)
            )
    candidates.sort(key=lambda c: (-c.applied_sequence, c.node))
    winner = candidates[0] if candidates else None
    lost = None
    if winner is not None and old_report is not None:
        lost = max(0, reference - winner.applied_sequence)
    reason = _reason(candidates, exclusions, spec, placement)
    return DecisionRecord(
        space=space,
        cause=cause,
        old_primary=placement.primary,
        old_primary_last_sequence=old_report.applied_sequence if old_report else None,
        old_epoch=placement.epoch,
        new_epoch=new_epoch,
        candidates=tuple(candidates),
        exclusions=tuple(exclusions),
        winner=winner.node if winner else None,
        winner_sequence=winner.applied_sequence if winner else None,
        entries_possibly_lost=lost,
        reason=reason,
        summary=_summary(
            space,
            winner=winner,
            new_epoch=new_epoch,
            lost=lost,
            exclusions=exclusions,
            reason=reason,
        ),
    )


def _ineligible(
    node: NodeName,
    *,
    spec: SpaceSpec,
    placement: Placement,
    verdict: Verdict | None,
    report: MemberReport | None,
    reference: int,
) -> str | None:
    if verdict is None:
        return "no liveness verdict (node unknown to the control plane)"
    if verdict.state != "Alive":
        return f"{verdict.state.lower()}: {verdict.reason}"
    if report is None:
        return "no progress reported"
    if report.epoch < placement.epoch:
        return (
            f"still at epoch {report.epoch} (space is at epoch {placement.epoch});"
            " its log may have diverged"
        )
    lag = reference - report.applied_sequence
    if lag > spec.max_lag_on_failover and not spec.allow_lagging_failover:
        return f"{lag} entries behind (maxLagOnFailover {spec.max_lag_on_failover})"
    return None


def _reason(
    candidates: list[Candidate],
    exclusions: list[Exclusion],
    spec: SpaceSpec,
    placement: Placement,
) -> str:
    if candidates:
        best = candidates[0]
        tied = [c.node for c in candidates[1:] if c.applied_sequence == best.applied_sequence]
        if tied:
            return (
                f"highest applied sequence {best.applied_sequence}, tied with"
                f" {', '.join(tied)}; lowest node name wins"
            )
        return f"highest applied sequence {best.applied_sequence}"
    if not placement.replicas:
        return "the space has no replicas (spec.replicas is 0)"
    excluded = "; ".join(f"{e.node} {e.reason}" for e in exclusions)
    fix = f"bring {placement.primary} back"
    if "maxLagOnFailover" in excluded and not spec.allow_lagging_failover:
        fix += ", or set spec.allowLaggingFailover to promote a lagging replica"
    return f"no eligible replica ({excluded}); {fix}"


def _summary(
    space: SpaceId,
    *,
    winner: Candidate | None,
    new_epoch: Epoch,
    lost: int | None,
    exclusions: list[Exclusion],
    reason: str,
) -> str:
    if winner is None:
        return f"cannot promote a replica of space {space}: {reason}"
    lost_text = "an unknown number of" if lost is None else str(lost)
    text = (
        f"promote {winner.node} to primary of space {space} at epoch {new_epoch}"
        f" ({reason}); {lost_text} entries possibly lost"
    )
    if exclusions:
        text += "; excluded " + ", ".join(f"{e.node} ({e.reason})" for e in exclusions)
    return text
