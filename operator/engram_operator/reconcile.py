"""The reconcile tick: one space's observed world in, actions and one sentence out.

Owns the order in which the deciders are consulted, and nothing they own. Like Patroni's
`run_cycle()`, every tick returns exactly one sentence saying what it decided ("promoted node-b
to primary of space orders at epoch 4 (...)"); drivers log it and tests assert it.

Precedence, most urgent first: paused; the control plane can't trust its view (hold); not placed
yet; primary dead (fail over); split brain (fence by a new epoch); primary suspect (wait for the
probe); members fenced by a promotion that did not finish (re-assert the primary); placement
repair; members that missed their assignment; switchover; steady state. Repair and re-sends take
one tick each, so they go before a switchover that may wait for many ticks.

Actions run in list order. Anything that changes the epoch or the placement comes as an action
that records it in status (`Place`, `Promote`, `ExecuteHandOver`, `FenceAndElect`) *before* the
action that tells a sidecar (`PushAssignment`, the handover steps, the fence round): the epoch is
recorded before anyone acts on it.

A failover takes two steps within one tick, like a Raft vote (design §4). Once the old primary's
write lease has certainly run out, `reconcile` returns `FenceAndElect`: the driver records the
new epoch, fences every member at it, and hands the answers to `conclude_failover`, which elects
among the members that answered and returns the `Promote` (or says why not). Under `quorum`, a
minority of answers promotes nobody.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from engram_contract.ids import Epoch, NodeName
from engram_operator import switchover
from engram_operator.election import (
    DecisionRecord,
    FenceAnswer,
    FenceRound,
    elect,
    majority,
    next_epoch,
)
from engram_operator.model import NodeInfo, Observation, Placement, SwitchoverProgress
from engram_operator.placement import describe, place, primary_cap
from engram_operator.status import Operation, detect_split_brain, member_table
from engram_operator.verdict import Verdict

# The tick's vocabulary. Observation and SwitchoverProgress live in `model` (plain data) and are
# re-exported here so a driver needs only this module.
__all__ = [
    "DEFAULT_SETTINGS",
    "AbortSwitchover",
    "Action",
    "BeginSwitchover",
    "ClearSwitchover",
    "Decision",
    "ExecuteHandOver",
    "FenceAndElect",
    "Noop",
    "Observation",
    "Place",
    "Promote",
    "PushAssignment",
    "Settings",
    "SwitchoverProgress",
    "Wait",
    "conclude_failover",
    "gist",
    "reconcile",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Control-loop tunables, in seconds and entries."""

    # A dead replica is replaced only after this long: a node that reboots within it rejoins and
    # catches up incrementally, instead of a new node copying a whole snapshot.
    replace_dead_after: float = 30.0
    switchover_timeout: float = 30.0
    # Hand over once the target is this close. At the seed's 100K entries/s per stream, 1,000
    # entries take ~10 ms to apply, so that is how long writes pause. Waiting for exactly 0 would
    # never finish under steady load, since lag is sampled from rate-limited reports.
    switchover_ready_lag: int = 1_000
    # After an aborted switchover, try again after this long (a longer cool-down than the attempt).
    switchover_retry_after: float = 60.0
    # The sidecars' write lease and the largest grant delay they accept (their
    # `write_lease_seconds` and `max_grant_delay`): a grant keeps a primary writing for at most
    # write_lease after it arrives, and it arrives at most max_grant_delay after we sent it (the
    # one timing assumption, docs/design-notes.md; the sidecar refuses grants it can tell broke
    # it). The margin covers the two monotonic clocks running at slightly different rates
    # (parts per million: microseconds over 2 s) with room to spare. It is small on purpose: the
    # liveness lease (2 s from the same heartbeat) expires at about the same moment, and a margin
    # longer than the gap to the next tick would cost every failover a whole tick.
    write_lease: float = 1.5
    max_grant_delay: float = 0.5
    lease_margin: float = 0.01
    # Each member gets this long to answer a promotion's fence. A killed node refuses at once; a
    # stopped or cut-off one costs the whole timeout, so it is as tight as the liveness probe's.
    fence_timeout: float = 0.5

    @property
    def lease_wait(self) -> float:
        """Seconds after the last grant sent to a primary before another node may lead."""
        return self.write_lease + self.max_grant_delay + self.lease_margin


DEFAULT_SETTINGS: Final = Settings()


@dataclass(frozen=True, slots=True, kw_only=True)
class Place:
    """Record `placement` in status (a first placement, changed replicas, or a fencing epoch)."""

    placement: Placement
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PushAssignment:
    """Tell each of `nodes` its role in `placement` (idempotent; a non-member drops the space)."""

    placement: Placement
    nodes: tuple[NodeName, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Promote:
    """Record `placement` and `record` in status, emit an Event and log the record's summary."""

    record: DecisionRecord
    placement: Placement


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceAndElect:
    """Phase one of a failover. Record `record` (a decision without a winner yet, at `epoch`) in
    status before anything else; fence every one of `nodes` at `epoch` in parallel, each answer
    bounded by `timeout`; then act on `conclude_failover(observation, this, answers)`."""

    epoch: Epoch
    nodes: tuple[NodeName, ...]
    cause: str
    only: NodeName | None
    record: DecisionRecord
    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BeginSwitchover:
    """Start tracking a switchover to `target`, started now."""

    target: NodeName


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecuteHandOver:
    """Record `plan.placement` in status, run `plan.steps`, then clear the switchover."""

    plan: switchover.HandOver


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortSwitchover:
    """Mark the switchover to `target` aborted now (it is retried after a cool-down)."""

    target: NodeName
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearSwitchover:
    """Forget the tracked switchover: it completed, or the user withdrew it."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    """Nothing can be done now, for `reason`. `record` explains a failover that found no winner."""

    reason: str
    record: DecisionRecord | None = None


@dataclass(frozen=True, slots=True)
class Noop:
    """Everything is as it should be."""


Action = (
    Place
    | PushAssignment
    | Promote
    | FenceAndElect
    | BeginSwitchover
    | ExecuteHandOver
    | AbortSwitchover
    | ClearSwitchover
    | Wait
    | Noop
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What one tick decided: actions in order, and the one sentence that says so."""

    actions: tuple[Action, ...]
    sentence: str
    operation: Operation = "Idle"


def gist(sentence: str) -> str:
    """A sentence without its numbers: drivers say a tick's sentence again only when its gist
    changes, not when only its numbers tick along (lease ages, lag)."""
    return re.sub(r"\d+(\.\d+)?", "#", sentence)


def reconcile(obs: Observation, *, now: float, settings: Settings = DEFAULT_SETTINGS) -> Decision:
    """Decide what to do for one space now."""
    if obs.spec.paused:
        return _paused(obs)
    unknown = next((v for v in obs.verdicts.values() if v.state == "Unknown"), None)
    if unknown is not None:
        return _wait(f"holding space {obs.space}: {unknown.reason}")
    if obs.placement is None:
        return _first_placement(obs)
    decision = _tick(obs, obs.placement, now, settings)
    if decision.operation == "Idle" and _promotion_unconfirmed(obs, obs.placement):
        return replace(decision, operation="FailingOver")
    return decision


def _tick(obs: Observation, placement: Placement, now: float, settings: Settings) -> Decision:
    space = obs.space
    primary = obs.verdicts.get(placement.primary)
    if primary is None:
        return _wait(f"holding space {space}: no verdict on primary {placement.primary} yet")
    if primary.state == "Dead":
        return _failover(obs, placement, primary, now, settings)
    split = detect_split_brain(placement, obs.reports.values())
    if split is not None:
        return _fence(obs, placement, split)
    if primary.state == "Suspect":
        return _wait(
            f"primary {placement.primary} of space {space} is suspect ({primary.reason});"
            " not failing over unless the probe fails"
        )
    return (
        _reassert(obs, placement)
        or _repair(obs, placement, now, settings)
        or _resend(obs, placement)
        or _drain(obs, placement, now, settings)
        or _switchover(obs, placement, now, settings)
        or _steady(obs, placement, now, settings)
    )


def _wait(sentence: str, record: DecisionRecord | None = None) -> Decision:
    return Decision(actions=(Wait(reason=sentence, record=record),), sentence=sentence)


def _paused(obs: Observation) -> Decision:
    where = (
        f"space {obs.space} stays as it is ({describe(obs.placement)})"
        if obs.placement
        else f"space {obs.space} is not placed yet"
    )
    return Decision(actions=(Noop(),), sentence=f"paused: spec.paused is true; {where}")


def _alive(obs: Observation) -> list[NodeInfo]:
    return [n for n in obs.nodes if _state(obs, n.name) == "Alive"]


def _draining(obs: Observation) -> frozenset[NodeName]:
    return frozenset(n.name for n in obs.nodes if n.draining)


def _state(obs: Observation, node: NodeName) -> str | None:
    verdict = obs.verdicts.get(node)
    return verdict.state if verdict else None


def _first_placement(obs: Observation) -> Decision:
    alive = [n for n in _alive(obs) if not n.draining]
    cap = primary_cap(sum(obs.primary_load.values()) + 1, len(alive))
    result = place(
        obs.space, obs.spec, alive, None, primary_load=obs.primary_load, max_primaries=cap
    )
    if result.placement is None:
        return _wait(f"waiting: {result.message}")
    placement = result.placement
    sentence = f"placed space {obs.space}: {describe(placement)}"
    if not result.satisfied:
        sentence += f"; under-replicated: {result.message}"
    actions = (
        Place(placement=placement, message=result.message),
        PushAssignment(placement=placement, nodes=placement.members),
    )
    return Decision(actions=actions, sentence=sentence)


def _failover(
    obs: Observation, placement: Placement, primary: Verdict, now: float, settings: Settings
) -> Decision:
    space, spec, old = obs.space, obs.spec, placement.primary
    cause = f"{old} dead: {primary.reason}"
    only = None
    if not spec.failover_automatic:
        target = spec.target_primary
        if target is None or target == old:
            return _wait(
                f"primary {old} of space {space} is dead ({primary.reason}) and"
                " spec.failoverAutomatic is false; set spec.targetPrimary to a replica to fail over"
            )
        only, cause = target, f"{cause}; manual failover to spec.targetPrimary"
    epoch = _fresh_epoch(obs, placement)
    # The plan, on what was last reported: if nobody could win, say so now, fence nobody.
    plan = elect(
        space=space,
        spec=spec,
        placement=placement,
        verdicts=obs.verdicts,
        reports=obs.reports,
        cause=cause,
        only=only,
        new_epoch=epoch,
        draining=_draining(obs),
    )
    if plan.winner is None:
        return _wait(f"cannot fail over space {space} ({cause}): {plan.reason}", record=plan)
    # A grant we sent keeps the old primary writing for up to write_lease after it arrives, and
    # it may arrive max_grant_delay late: until both have passed, a second primary could
    # acknowledge writes next to it (under `async` or `one` nothing else would stop it).
    granted = obs.lease_grants.get(old)
    if granted is not None and now - granted < settings.lease_wait:
        left = settings.lease_wait - (now - granted)
        sentence = (
            f"primary {old} of space {space} is dead ({primary.reason}); waiting out the old"
            f" primary's write lease ({left:.1f} s left) before promoting"
        )
        return Decision(
            actions=(Wait(reason=sentence),), sentence=sentence, operation="FailingOver"
        )
    actions: list[Action] = []
    if obs.switchover is not None and obs.switchover.aborted_at is None:
        actions.append(AbortSwitchover(target=obs.switchover.target, reason=cause))
    summary = (
        f"fencing every member of space {space} at epoch {epoch} before electing a new primary"
        f" ({cause})"
    )
    record = replace(
        plan,
        winner=None,
        winner_sequence=None,
        winner_last_epoch=None,
        entries_possibly_lost=None,
        reason=f"fencing at epoch {epoch}: the members that take it elect the new primary",
        summary=summary,
    )
    actions.append(
        FenceAndElect(
            epoch=epoch,
            nodes=placement.members,
            cause=cause,
            only=only,
            record=record,
            timeout=settings.fence_timeout,
        )
    )
    return Decision(actions=tuple(actions), sentence=summary, operation="FailingOver")


def conclude_failover(
    obs: Observation, fence: FenceAndElect, answers: Sequence[FenceAnswer]
) -> Decision:
    """Phase two of a failover: elect among the members that answered `fence`, or say why not.

    `obs` is the observation the fence was planned on; `answers` has one entry per fenced node
    (a member missing from it counts as not answering).
    """
    placement = obs.placement
    assert placement is not None, "a fence round is planned only for a placed space"
    space, spec = obs.space, obs.spec
    by_node = {a.node: a for a in answers}
    round_ = FenceRound(
        epoch=fence.epoch,
        answers=tuple(
            by_node.get(m) or FenceAnswer(node=m, ok=False, error="not asked")
            for m in placement.members
        ),
        needed=majority(placement) if spec.ack_policy == "quorum" else 0,
        every_replica=spec.ack_policy == "one",
    )
    record = elect(
        space=space,
        spec=spec,
        placement=placement,
        verdicts=obs.verdicts,
        reports=obs.reports,
        cause=fence.cause,
        only=fence.only,
        new_epoch=fence.epoch,
        fence=round_,
        draining=_draining(obs),
    )
    if record.winner is None:
        sentence = f"cannot fail over space {space} ({fence.cause}): {record.reason}"
        # The plan had a winner, so what stopped it is who answered (or, under quorum, that
        # too few did): retried every tick at the same epoch, the space is still failing over.
        return Decision(
            actions=(Wait(reason=sentence, record=record),),
            sentence=sentence,
            operation="FailingOver",
        )
    winner, old = record.winner, placement.primary
    new = Placement(
        primary=winner,
        replicas=tuple(old if r == winner else r for r in placement.replicas),
        epoch=record.new_epoch,
    )
    # Members that answered the fence are reachable now, whatever their verdict: tell them too.
    told = set(_alive_members(obs, new)) | {a.node for a in round_.voters}
    lost = record.entries_possibly_lost
    return Decision(
        actions=(
            Promote(record=record, placement=new),
            PushAssignment(placement=new, nodes=tuple(m for m in new.members if m in told)),
        ),
        sentence=(
            f"promoted {winner} to primary of space {space} at epoch {new.epoch} ({fence.cause});"
            f" {'an unknown number of' if lost is None else lost} entries possibly lost"
        ),
        operation="FailingOver",
    )


def _fresh_epoch(obs: Observation, placement: Placement) -> Epoch:
    """The epoch of the next promotion or re-assertion: the pending one while nobody was
    assigned at it and nobody accepted more (fences are idempotent at the same epoch, so a
    retry doesn't inflate epochs), else one above everything known."""
    pending = obs.pending_epoch
    assigned = max([placement.epoch, *(r.epoch for r in obs.reports.values())])
    accepted = max((r.accepted_epoch or 0 for r in obs.reports.values()), default=0)
    if pending is not None and pending > assigned and pending >= accepted:
        return pending
    return Epoch(max(next_epoch(placement, obs.reports), (pending or 0) + 1))


def _reassert(obs: Observation, placement: Placement) -> Decision | None:
    """Members fenced above the placement's epoch while its primary lives: a promotion that
    could not finish (no majority answered, no winner) left them refusing the primary, or the
    primary restarted (it accepts the next epoch itself, so as never to write at its old one
    again). Give the primary a new epoch they accept; nobody was assigned at a pending epoch, so
    it may be that."""
    fenced = sorted(
        (r.node, r.accepted_epoch)
        for r in obs.reports.values()
        if placement.role_of(r.node) is not None
        and r.accepted_epoch is not None
        and r.accepted_epoch > placement.epoch
        and _state(obs, r.node) == "Alive"
    )
    if not fenced:
        return None
    epoch = _fresh_epoch(obs, placement)
    again = replace(placement, epoch=epoch)
    if [n for n, _ in fenced] == [placement.primary]:
        # A restarted primary does this to itself (the sidecar's `Space.resume`): it may have
        # shipped entries its disk lost, so it must not write again at its old epoch.
        why = f"primary {placement.primary} restarted and takes writes only at a newer epoch"
    else:
        who = ", ".join(f"{n} (epoch {e})" for n, e in fenced)
        why = f"{who} accepted a promotion's epoch that never took effect"
    sentence = (
        f"space {obs.space}: {why}; re-asserted {placement.primary} as primary at epoch {epoch}"
    )
    return Decision(
        actions=(
            Place(placement=again, message=sentence),
            PushAssignment(placement=again, nodes=_alive_members(obs, again)),
        ),
        sentence=sentence,
    )


def _alive_members(obs: Observation, placement: Placement) -> tuple[NodeName, ...]:
    return tuple(m for m in placement.members if _state(obs, m) == "Alive")


def _fence(obs: Observation, placement: Placement, split: str) -> Decision:
    epoch = _fresh_epoch(obs, placement)
    fenced = replace(placement, epoch=epoch)
    claimants = tuple(
        r.node
        for r in sorted(obs.reports.values(), key=lambda r: r.node)
        if r.role == "primary"
        and r.node not in placement.members
        and _state(obs, r.node) == "Alive"
    )
    sentence = (
        f"split brain in space {obs.space}: {split}; re-asserted {placement.primary} as primary"
        f" at epoch {epoch} to fence the others"
    )
    actions = (
        Place(placement=fenced, message=sentence),
        PushAssignment(placement=fenced, nodes=_alive_members(obs, fenced) + claimants),
    )
    return Decision(actions=actions, sentence=sentence)


def _drain(
    obs: Observation, placement: Placement, now: float, settings: Settings
) -> Decision | None:
    """The primary is draining (it got SIGTERM: a rolling update, a node drain): switch the space
    over to its most advanced live replica that is not draining, the same lag-aware handover as
    a switchover the user asks for, so an `async` space loses nothing. spec.targetPrimary, when
    set, wins (that switchover moves the primary away too)."""
    draining = _draining(obs)
    if placement.primary not in draining or obs.spec.target_primary is not None:
        return None
    progress = obs.switchover
    candidates = [
        r
        for r in placement.replicas
        if r not in draining and _state(obs, r) == "Alive" and r in obs.reports
    ]
    if progress is not None and progress.target in candidates:
        target = progress.target
    elif progress is not None:
        return _clear(
            f"switchover of space {obs.space} to {progress.target} withdrawn:"
            f" {placement.primary} is draining and {progress.target} can't take over"
        )
    elif candidates:
        target = max(candidates, key=lambda r: (obs.reports[r].log_position, r))
    else:
        return _wait(
            f"primary {placement.primary} of space {obs.space} is draining, but no live replica"
            " that is not draining can take over; it leads until it stops"
        )
    return _switch_to(
        obs,
        placement,
        target=target,
        progress=progress,
        now=now,
        settings=settings,
        why=f"{placement.primary} is draining",
    )


def _switchover(
    obs: Observation, placement: Placement, now: float, settings: Settings
) -> Decision | None:
    target, progress = obs.spec.target_primary, obs.switchover
    if target is not None and target in _draining(obs) and target != placement.primary:
        reason = f"cannot switch space {obs.space} over to {target}: it is draining (shutting down)"
        if progress is not None and progress.aborted_at is not None:
            return _wait(reason)
        return Decision(actions=(AbortSwitchover(target=target, reason=reason),), sentence=reason)
    step = switchover.next_step(
        space=obs.space,
        placement=placement,
        target=target,
        progress=progress,
        verdicts=obs.verdicts,
        reports=obs.reports,
        now=now,
        timeout=settings.switchover_timeout,
        ready_lag=settings.switchover_ready_lag,
        retry_after=settings.switchover_retry_after,
    )
    if isinstance(step, switchover.Finished):
        return _clear(step.reason)
    if step is None or target is None:
        return None
    return _act(obs, target, progress, step, doing=f"switching space {obs.space} over to {target}")


def _switch_to(
    obs: Observation,
    placement: Placement,
    *,
    target: NodeName,
    progress: SwitchoverProgress | None,
    now: float,
    settings: Settings,
    why: str,
) -> Decision | None:
    step = switchover.next_step(
        space=obs.space,
        placement=placement,
        target=target,
        progress=progress,
        verdicts=obs.verdicts,
        reports=obs.reports,
        now=now,
        timeout=settings.switchover_timeout,
        ready_lag=settings.switchover_ready_lag,
        retry_after=settings.switchover_retry_after,
    )
    if isinstance(step, switchover.Finished):
        return _clear(step.reason)
    if step is None:
        return None
    return _act(
        obs, target, progress, step, doing=f"switching space {obs.space} over to {target} ({why})"
    )


def _act(
    obs: Observation,
    target: NodeName,
    progress: SwitchoverProgress | None,
    step: switchover.SwitchoverStep,
    *,
    doing: str,
) -> Decision | None:
    fresh = progress is None or progress.aborted_at is not None
    begin: tuple[Action, ...] = (BeginSwitchover(target=target),) if fresh else ()
    match step:
        case switchover.CoolingDown(reason=reason):
            return _wait(reason)
        case switchover.Refuse(reason=reason) | switchover.Abort(reason=reason):
            return Decision(
                actions=(AbortSwitchover(target=target, reason=reason),), sentence=reason
            )
        case switchover.Wait(reason=reason):
            return Decision(
                actions=(*begin, Wait(reason=reason)),
                sentence=f"{doing}: {reason}",
                operation="SwitchingOver",
            )
        case switchover.HandOver():
            return Decision(
                actions=(*begin, ExecuteHandOver(plan=step)),
                sentence=f"{doing}: {step.reason}",
                operation="SwitchingOver",
            )
    return None  # Finished: the callers handle it first


def _clear(sentence: str) -> Decision:
    return Decision(actions=(ClearSwitchover(reason=sentence),), sentence=sentence)


def _usable(
    obs: Observation, node: NodeName, placement: Placement, now: float, grace: float
) -> bool:
    """Alive nodes may take any role; a member that is not Alive keeps its seat for `grace` s."""
    verdict = obs.verdicts.get(node)
    if verdict is None:
        return False
    if node not in placement.members and node in _draining(obs):
        return False  # shutting down: no new seats (a member keeps its own, it comes back)
    if verdict.state == "Alive":
        return True
    if node not in placement.members:
        return False
    return verdict.since is not None and now - verdict.since < grace


def _repair(
    obs: Observation, placement: Placement, now: float, settings: Settings
) -> Decision | None:
    grace = settings.replace_dead_after
    usable = [n for n in obs.nodes if _usable(obs, n.name, placement, now, grace)]
    result = place(obs.space, obs.spec, usable, placement)
    if not result.changed or result.placement is None:
        return None
    new = result.placement
    gone = ", ".join(f"{n} ({_why_removed(obs, n, now)})" for n in result.removed)
    added = ", ".join(result.added)
    if result.added and result.removed:
        change = f"replaced replica {gone} with {added}"
    elif result.added:
        change = f"added replica {added}"
    else:
        change = f"removed replica {gone}"
    sentence = f"space {obs.space}: {change}; now {describe(new)}"
    if not result.satisfied:
        sentence += f"; under-replicated: {result.message}"
    departed = tuple(n for n in result.removed if _state(obs, n) == "Alive")
    actions = (
        Place(placement=new, message=result.message),
        PushAssignment(placement=new, nodes=_alive_members(obs, new) + departed),
    )
    return Decision(actions=actions, sentence=sentence)


def _why_removed(obs: Observation, node: NodeName, now: float) -> str:
    verdict = obs.verdicts.get(node)
    if verdict is not None and verdict.state == "Alive":
        return f"spec.replicas is {obs.spec.replicas}"
    if verdict is not None and verdict.since is not None:
        return f"{verdict.state.lower()} for {now - verdict.since:.0f} s"
    return verdict.state.lower() if verdict else "node gone"


def _resend(obs: Observation, placement: Placement) -> Decision | None:
    """Push the assignment again to live members that report something else, or nothing.

    A member with no report for the space (a fresh node, or one that lost its data) would
    otherwise wait for an assignment nobody sends.
    """
    stale = [
        r
        for r in sorted(obs.reports.values(), key=lambda r: r.node)
        if _state(obs, r.node) == "Alive"
        and (r.role, r.epoch) != (placement.role_of(r.node), placement.epoch)
    ]
    silent = [m for m in placement.members if m not in obs.reports and _state(obs, m) == "Alive"]
    # A member that applies other spec settings than the spec's (spec.batch, spec.lag or
    # spec.catchupThreshold changed): the same assignment with the new settings.
    retuned = [
        r
        for r in sorted(obs.reports.values(), key=lambda r: r.node)
        if r not in stale
        and _state(obs, r.node) == "Alive"
        and placement.role_of(r.node) is not None
        and r.tuning is not None
        and r.tuning != obs.spec.tuning
    ]
    if not stale and not silent and not retuned:
        return None
    parts = [f"{r.node} (reports {r.role} at epoch {r.epoch})" for r in stale]
    parts += [f"{m} (reports nothing)" for m in silent]
    parts += [f"{r.node} (applies other spec settings)" for r in retuned]
    stale += retuned
    sentence = (
        f"re-sent the epoch {placement.epoch} assignment of space {obs.space} to {', '.join(parts)}"
    )
    nodes = tuple(sorted([r.node for r in stale] + silent))
    push = PushAssignment(placement=placement, nodes=nodes)
    return Decision(actions=(push,), sentence=sentence)


def _steady(obs: Observation, placement: Placement, now: float, settings: Settings) -> Decision:
    space = obs.space
    for node in placement.replicas:
        verdict = obs.verdicts.get(node)
        if verdict is not None and verdict.state != "Alive" and verdict.since is not None:
            left = settings.replace_dead_after - (now - verdict.since)
            return _wait(
                f"space {space}: replica {node} is {verdict.state.lower()} ({verdict.reason});"
                f" replacing it in {left:.1f} s unless it returns"
            )
    if len(placement.replicas) < obs.spec.replicas:
        return _wait(
            f"space {space} is under-replicated: {len(placement.replicas)} of"
            f" {obs.spec.replicas} replicas; add a node or lower spec.replicas"
        )
    silent = [m for m in placement.members if m not in obs.reports]
    if silent:
        return _wait(
            f"space {space}: waiting for {', '.join(silent)} to report at epoch {placement.epoch}"
        )
    rows = member_table(placement, obs.verdicts, obs.reports)
    entries = max((r.lag_entries or 0 for r in rows), default=0)
    seconds = max((r.lag_seconds or 0.0 for r in rows), default=0.0)
    return Decision(
        actions=(Noop(),),
        sentence=(
            f"space {space} is steady: {describe(placement)};"
            f" max lag {entries} entries / {seconds:.1f} s"
        ),
    )


def _promotion_unconfirmed(obs: Observation, placement: Placement) -> bool:
    if obs.last_promotion_epoch != placement.epoch:
        return False
    report = obs.reports.get(placement.primary)
    return report is None or (report.role, report.epoch) != ("primary", placement.epoch)
