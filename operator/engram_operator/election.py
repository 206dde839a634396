"""Election: which replica to promote when a primary fails, and the record that explains it.

Owns the promotion rule of design §4. Members are ranked by the position of their log's last
entry, (epoch of that entry, sequence), highest first, ties to the lowest node name: entries are
identified by (epoch, sequence), so a deposed primary's untruncated tail of an old epoch never
outranks a replica holding entries of a newer one, however long that tail is (Raft's "at least as
up-to-date" rule). A replica is ineligible when it is not Alive, has not reported, or is more than
`max_lag_on_failover` entries behind — unless the user allows lagging failover.

A promotion is two-phase, like a Raft vote (`reconcile` plans it, a driver runs it): the control
plane first fences every member at the new epoch (`POST .../fence`); each member that answers has
durably accepted that epoch, refuses the old primary's frames from then on, and answers its log's
last (epoch, sequence) *as of that moment*. Passing those answers as `fence` makes the election
count only them: members that did not answer are excluded, their fresh positions replace the
reports, and under `ackPolicy: quorum` nobody is promoted unless a majority of the members (the
primary included) answered and the winner's log is at least as up to date as a majority's. Every
quorum-acknowledged write is on a majority; any two majorities share a member; so the winner
holds every such write, and a minority can neither elect nor keep acknowledging.

The decision is returned as a `DecisionRecord` (candidates, exclusions with reasons, the fence
round, winner, entries possibly lost) for status, an Event and the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypedDict

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.model import NO_EPOCH, NO_SEQUENCE, MemberReport, Placement, SpaceSpec
from engram_operator.verdict import Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """An eligible replica, its log's last (epoch, sequence), and how far behind the most data
    known to exist it is."""

    node: NodeName
    applied_sequence: Sequence
    lag_entries: int
    last_epoch: Epoch = NO_EPOCH

    @property
    def log_position(self) -> tuple[int, int]:
        return (self.last_epoch, self.applied_sequence)


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceAnswer:
    """One member's answer to a promotion's fence at the new epoch (`POST .../fence`).

    `ok`: the member recorded the epoch durably and refuses older epochs' frames from now on, so
    (`last_epoch`, `last_sequence`) — the last entry it holds durably — can no longer grow with
    the old primary's writes. Otherwise `error` says why it does not count (no answer in time,
    a refusal).
    """

    node: NodeName
    ok: bool
    last_epoch: Epoch = NO_EPOCH
    last_sequence: Sequence = NO_SEQUENCE
    error: str = ""

    @property
    def log_position(self) -> tuple[int, int]:
        return (self.last_epoch, self.last_sequence)


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceRound:
    """The fence of one promotion attempt: the epoch, every member's answer, and what quorum
    needed (`needed` is 0 when the ack policy doesn't ask for a majority)."""

    epoch: Epoch
    answers: tuple[FenceAnswer, ...]
    needed: int
    # `one`: a write was acknowledged by the primary and *some* replica, unknown which, so a
    # promotion must hear from every replica or it may pick one that lacks it.
    every_replica: bool = False

    @property
    def voters(self) -> tuple[FenceAnswer, ...]:
        return tuple(a for a in self.answers if a.ok)


@dataclass(frozen=True, slots=True, kw_only=True)
class Exclusion:
    """A replica that may not be promoted, and why."""

    node: NodeName
    reason: str


class CandidateDict(TypedDict):
    node: str
    appliedSequence: int
    lastEpoch: int
    lagEntries: int


class ExclusionDict(TypedDict):
    node: str
    reason: str


class FenceAnswerDict(TypedDict):
    node: str
    answered: bool
    lastEpoch: int | None
    lastSequence: int | None
    error: str


class FenceRoundDict(TypedDict):
    epoch: int
    answered: int
    quorumNeeds: int | None
    members: list[FenceAnswerDict]


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
    winnerLastEpoch: int | None
    entriesPossiblyLost: int | None
    fence: FenceRoundDict | None
    reason: str
    summary: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRecord:
    """One promotion decision, complete enough to explain it later (status.lastPromotion).

    `entries_possibly_lost` is the most data known to exist (the old primary's last sequence, or
    a replica's of the current epoch if higher) minus the winner's applied sequence, floored at
    0; None when the old primary never reported, since then nobody knows what it had. `fence` is
    the fence round the decision was based on (None: decided on reports alone, a plan).
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
    winner_last_epoch: Epoch | None = None
    fence: FenceRound | None = None

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
                {
                    "node": c.node,
                    "appliedSequence": c.applied_sequence,
                    "lastEpoch": c.last_epoch,
                    "lagEntries": c.lag_entries,
                }
                for c in self.candidates
            ],
            "exclusions": [{"node": e.node, "reason": e.reason} for e in self.exclusions],
            "winner": self.winner,
            "winnerSequence": self.winner_sequence,
            "winnerLastEpoch": self.winner_last_epoch,
            "entriesPossiblyLost": self.entries_possibly_lost,
            "fence": None if self.fence is None else _fence_dict(self.fence),
            "reason": self.reason,
            "summary": self.summary,
        }


def _fence_dict(fence: FenceRound) -> FenceRoundDict:
    return {
        "epoch": fence.epoch,
        "answered": len(fence.voters),
        "quorumNeeds": fence.needed or None,
        "members": [
            {
                "node": a.node,
                "answered": a.ok,
                "lastEpoch": a.last_epoch if a.ok else None,
                "lastSequence": a.last_sequence if a.ok else None,
                "error": a.error,
            }
            for a in fence.answers
        ],
    }


def majority(placement: Placement) -> int:
    """Members a `quorum` write needs, the primary included: floor(n / 2) + 1 of 1 + replicas."""
    return len(placement.members) // 2 + 1


def next_epoch(placement: Placement, reports: Mapping[NodeName, MemberReport]) -> Epoch:
    """An epoch above every epoch recorded, assigned or accepted by anyone (a non-member too),
    so that it fences them all."""
    known = [placement.epoch]
    for r in reports.values():
        known.append(r.epoch)
        if r.accepted_epoch is not None:
            known.append(r.accepted_epoch)
    return Epoch(max(known) + 1)


def elect(
    *,
    space: SpaceId,
    spec: SpaceSpec,
    placement: Placement,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    cause: str,
    only: NodeName | None = None,
    new_epoch: Epoch | None = None,
    fence: FenceRound | None = None,
    draining: frozenset[NodeName] = frozenset(),
) -> DecisionRecord:
    """Choose a new primary among `placement.replicas` to replace `placement.primary`.

    A node in `draining` is shutting down (a rolling update, a node drain) and is never chosen.

    `reports` holds each member's last known progress (a dead old primary's last report too).
    `cause` says why the old primary is being replaced, e.g. "node-a dead: lease expired ...".
    `only` restricts the choice to one replica (a manual failover to spec.targetPrimary); the
    others are then excluded with that reason. `new_epoch` defaults to `next_epoch`.

    Without `fence` the result is a plan: who would win on what was last reported. With it, the
    decision: only members that answered the fence count, with the positions they answered.
    """
    epoch = new_epoch if new_epoch is not None else next_epoch(placement, reports)
    answers = {a.node: a for a in fence.answers} if fence is not None else {}
    reports = _with_fresh_positions(placement, reports, answers)
    old_report = reports.get(placement.primary)
    reference = _most_data_known(placement, reports)
    candidates: list[Candidate] = []
    exclusions: list[Exclusion] = []
    for node in placement.replicas:
        report = reports.get(node)
        why = _ineligible(
            node,
            spec=spec,
            verdict=verdicts.get(node),
            report=report,
            reference=reference,
            answer=answers.get(node) if fence is not None else None,
            fenced=fence is not None,
        )
        if why is None and node in draining:
            why = "is draining (shutting down); it rejoins as a replica"
        if why is None and only is not None and node != only:
            why = f"not the requested target {only}"
        if why is not None:
            exclusions.append(Exclusion(node=node, reason=why))
        elif report is not None:
            candidates.append(
                Candidate(
                    node=node,
                    applied_sequence=report.applied_sequence,
                    lag_entries=reference - report.applied_sequence,
                    last_epoch=report.last_epoch,
                )
            )
    candidates.sort(key=lambda c: (-c.last_epoch, -c.applied_sequence, c.node))
    blocked = _quorum_problem(placement, fence, candidates)
    winner = candidates[0] if candidates and blocked is None else None
    lost = None
    if winner is not None and old_report is not None:
        lost = max(0, reference - winner.applied_sequence)
    reason = blocked or _reason(candidates, exclusions, spec, placement)
    return DecisionRecord(
        space=space,
        cause=cause,
        old_primary=placement.primary,
        old_primary_last_sequence=old_report.applied_sequence if old_report else None,
        old_epoch=placement.epoch,
        new_epoch=epoch,
        candidates=tuple(candidates),
        exclusions=tuple(exclusions),
        winner=winner.node if winner else None,
        winner_sequence=winner.applied_sequence if winner else None,
        winner_last_epoch=winner.last_epoch if winner else None,
        entries_possibly_lost=lost,
        fence=fence,
        reason=reason,
        summary=_summary(
            space,
            winner=winner,
            new_epoch=epoch,
            lost=lost,
            exclusions=exclusions,
            reason=reason,
        ),
    )


def _with_fresh_positions(
    placement: Placement,
    reports: Mapping[NodeName, MemberReport],
    answers: Mapping[NodeName, FenceAnswer],
) -> dict[NodeName, MemberReport]:
    """`reports`, with the log position each member answered the fence with (taken after it
    stopped accepting the old epoch, so newer than any report) in place of the reported one."""
    out = dict(reports)
    for node, answer in answers.items():
        if not answer.ok or placement.role_of(node) is None:
            continue
        known = reports.get(node)
        if known is None:
            role = placement.role_of(node)
            assert role is not None
            known = MemberReport(node=node, role=role, epoch=NO_EPOCH, applied_sequence=NO_SEQUENCE)
        out[node] = replace(
            known, applied_sequence=answer.last_sequence, last_epoch=answer.last_epoch
        )
    return out


def _most_data_known(placement: Placement, reports: Mapping[NodeName, MemberReport]) -> int:
    """The highest sequence known to hold data of the current epoch's history: the old
    primary's, or a member's at the current epoch (by role or by its last entry). A member left
    at an older epoch may hold a deposed primary's divergent tail, which is nobody's data."""
    old = reports.get(placement.primary)
    current = [
        r
        for m in placement.members
        if (r := reports.get(m)) is not None
        and (r is old or r.epoch >= placement.epoch or r.last_epoch >= placement.epoch)
    ]
    return max((r.applied_sequence for r in current), default=0)


def _ineligible(
    node: NodeName,
    *,
    spec: SpaceSpec,
    verdict: Verdict | None,
    report: MemberReport | None,
    reference: int,
    answer: FenceAnswer | None,
    fenced: bool,
) -> str | None:
    if verdict is None:
        return "no liveness verdict (node unknown to the control plane)"
    if verdict.state != "Alive":
        return f"{verdict.state.lower()}: {verdict.reason}"
    if fenced and (answer is None or not answer.ok):
        # Only a member that took the new epoch is known to refuse the old primary from now on:
        # what it holds can't grow behind our back, and it can't ack the old primary's writes.
        return f"did not answer the fence ({answer.error if answer else 'not asked'})"
    if report is None:
        return "no progress reported"
    lag = reference - report.applied_sequence
    if lag > spec.max_lag_on_failover and not spec.allow_lagging_failover:
        return f"{lag} entries behind (maxLagOnFailover {spec.max_lag_on_failover})"
    return None


def _quorum_problem(
    placement: Placement, fence: FenceRound | None, candidates: list[Candidate]
) -> str | None:
    """Why a `quorum` space may not promote on this fence round, or None.

    Two rules, both Raft's: a majority of the members must have taken the new epoch (else the
    old primary, or a node on the other side of a partition, may still gather a majority), and
    the winner's log must be at least as up to date as a majority's (else a write acknowledged
    by a majority that excludes the winner could be lost).
    """
    if fence is not None and fence.every_replica:
        unheard = [
            f"{a.node} {a.error}".strip()
            for a in fence.answers
            if not a.ok and a.node in placement.replicas
        ]
        if unheard:
            return (
                f"ackPolicy one: every replica must answer the fence (any one of them may hold"
                f" the last acknowledged writes); no answer from {'; '.join(unheard)}"
            )
        if candidates:
            best = candidates[0]
            more = [
                a.node
                for a in fence.voters
                if a.node in placement.replicas and a.log_position > best.log_position
            ]
            if more:
                return (
                    f"ackPolicy one: {', '.join(more)} hold(s) more than the most up-to-date"
                    f" eligible replica {best.node} and may hold acknowledged writes"
                )
        return None
    if fence is None or not fence.needed:
        return None
    voters = fence.voters
    total, needed = len(placement.members), fence.needed
    if len(voters) < needed:
        who = ", ".join(a.node for a in voters) or "none"
        silent = "; ".join(f"{a.node} {a.error}" for a in fence.answers if not a.ok)
        return (
            f"only {len(voters)} of {total} members reachable; quorum needs {needed}"
            f" (answered the fence at epoch {fence.epoch}: {who}; {silent})"
        )
    if not candidates:
        return None
    best = candidates[0]
    behind = [a for a in voters if a.log_position <= best.log_position]
    if len(behind) >= needed:
        return None
    ahead = ", ".join(
        f"{a.node} (epoch {a.last_epoch}, sequence {a.last_sequence})"
        for a in voters
        if a.log_position > best.log_position
    )
    return (
        f"the most up-to-date eligible replica, {best.node} (epoch {best.last_epoch}, sequence"
        f" {best.applied_sequence}), is behind {ahead}; only {len(behind)} of {total} members"
        f" hold no more than it and quorum needs {needed}, so it may lack acknowledged writes;"
        f" bring {placement.primary} back or make a member that is ahead reachable"
    )


def _position(c: Candidate) -> str:
    if c.last_epoch:
        return f"highest last entry (epoch {c.last_epoch}, sequence {c.applied_sequence})"
    return f"highest applied sequence {c.applied_sequence}"


def _reason(
    candidates: list[Candidate],
    exclusions: list[Exclusion],
    spec: SpaceSpec,
    placement: Placement,
) -> str:
    if candidates:
        best = candidates[0]
        tied = [c.node for c in candidates[1:] if c.log_position == best.log_position]
        if tied:
            return f"{_position(best)}, tied with {', '.join(tied)}; lowest node name wins"
        return _position(best)
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
