"""Switchover: a planned, lag-aware change of primary to a chosen replica, with zero loss.

Owns the plan, not its execution. While the target is behind, the plan is to Wait, with a reason
a person can read; once it is within `ready_lag` entries, the plan is a HandOver — fence the old
primary at the new epoch (it stops accepting writes; its reply carries its final sequence), wait
until the target has applied exactly that sequence, promote the target at the new epoch, and
demote the old primary to a replica. Past the timeout the plan is to Abort. A target that is not
a current replica, or not Alive, is refused.

`next_step()` wraps the plan in the switchover's life cycle as tracked between ticks: start,
cool-down after an abort, completion, and withdrawal by the user.

Writes pause only between the fence and the promotion, for the time the target needs to apply
the last `ready_lag` entries. If that step fails, the driver re-promotes the old primary at an
epoch above the fence's, so the write pause is bounded by `AwaitCatchUp.timeout`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.model import MemberReport, Placement, SwitchoverProgress
from engram_operator.verdict import Verdict

# How long the old primary may stay fenced while the target applies the last entries. At the
# seed's 100K entries/s per stream, 1,000 entries take 10 ms; 5 s covers a slow disk and still
# stays inside the 5 s failover budget users already accept for an unplanned change.
DEFAULT_FENCED_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Fence:
    """Tell `node` that `epoch` has begun: it stops writes and replies with its last sequence."""

    node: NodeName
    epoch: Epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class AwaitCatchUp:
    """Wait until `node` has applied the fenced primary's final sequence (at least `sequence`)."""

    node: NodeName
    sequence: Sequence
    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PromoteTarget:
    """Make `node` the primary at `epoch`."""

    node: NodeName
    epoch: Epoch


@dataclass(frozen=True, slots=True, kw_only=True)
class Demote:
    """Make `node` a replica of `primary` at `epoch`."""

    node: NodeName
    primary: NodeName
    epoch: Epoch


HandOverStep = Fence | AwaitCatchUp | PromoteTarget | Demote


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    """The target is not caught up yet."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HandOver:
    """Run `steps` in order. Record `placement` (the new epoch) in status before the first."""

    placement: Placement
    steps: tuple[HandOverStep, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    """The target did not catch up in time; nothing was fenced, writes never paused."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """The switchover can't start (or go on): the target is not a live replica."""

    reason: str


SwitchoverPlan = Wait | HandOver | Abort | Refuse


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """The tracked switchover is over: it completed, or the user withdrew it. Forget it."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CoolingDown:
    """The last attempt aborted; the next starts after a cool-down."""

    reason: str


SwitchoverStep = SwitchoverPlan | Finished | CoolingDown


def next_step(
    *,
    space: SpaceId,
    placement: Placement,
    target: NodeName | None,
    progress: SwitchoverProgress | None,
    verdicts: Mapping[NodeName, Verdict],
    reports: Mapping[NodeName, MemberReport],
    now: float,
    timeout: float,
    ready_lag: int,
    retry_after: float,
) -> SwitchoverStep | None:
    """What the switchover of `space` to `target` (spec.targetPrimary) needs now; None if none.

    A `progress` that is None, or aborted and cooled down, means a new attempt starts now.
    """
    if progress is not None and progress.target != target:
        why = f"spec.targetPrimary is now {target or 'unset'}"
        return Finished(reason=f"switchover of space {space} to {progress.target} withdrawn: {why}")
    if target is None or target == placement.primary:
        if progress is None:
            return None
        return Finished(
            reason=f"switchover of space {space} to {target} complete:"
            f" it leads at epoch {placement.epoch}"
        )
    started_at = now
    if progress is not None and progress.aborted_at is None:
        started_at = progress.started_at
    elif progress is not None and progress.aborted_at is not None:
        left = retry_after - (now - progress.aborted_at)
        if left > 0:
            return CoolingDown(
                reason=f"switchover of space {space} to {target} aborted"
                f" ({progress.abort_reason}); retrying in {left:.1f} s"
            )
    primary = reports.get(placement.primary)
    if primary is None:
        return Wait(reason=f"waiting for primary {placement.primary} to report its sequence")
    target_report = reports.get(target)
    return plan_switchover(
        space=space,
        placement=placement,
        target=target,
        verdicts=verdicts,
        primary_last_sequence=primary.applied_sequence,
        target_applied=target_report.applied_sequence if target_report else None,
        started_at=started_at,
        now=now,
        timeout=timeout,
        ready_lag=ready_lag,
    )


def plan_switchover(
    *,
    space: SpaceId,
    placement: Placement,
    target: NodeName,
    verdicts: Mapping[NodeName, Verdict],
    primary_last_sequence: Sequence,
    target_applied: Sequence | None,
    started_at: float,
    now: float,
    timeout: float,
    ready_lag: int = 0,
    fenced_timeout: float = DEFAULT_FENCED_TIMEOUT,
) -> SwitchoverPlan:
    """The next step of switching `space` over to `target` (times are monotonic seconds)."""
    refusal = _refusal(space, placement, target, verdicts)
    if refusal is not None:
        return Refuse(reason=refusal)
    elapsed = now - started_at
    clock = f"{elapsed:.1f} s of {timeout:g} s"
    if target_applied is None:
        behind, still = "has not reported progress", "still has not reported progress"
    else:
        lag = max(0, primary_last_sequence - target_applied)
        if lag <= ready_lag:
            return _hand_over(placement, target, primary_last_sequence, lag, fenced_timeout)
        behind = f"is {lag} entries behind"
        still = f"is still {lag} entries behind"
    if elapsed > timeout:
        return Abort(
            reason=(
                f"switchover of space {space} to {target} aborted: target {target} {still}"
                f" after {elapsed:.1f} s (timeout {timeout:g} s)"
            )
        )
    return Wait(reason=f"target {target} {behind}; waiting ({clock})")


def _refusal(
    space: SpaceId, placement: Placement, target: NodeName, verdicts: Mapping[NodeName, Verdict]
) -> str | None:
    prefix = f"cannot switch space {space} over to {target}"
    if target == placement.primary:
        return f"{prefix}: it is already the primary"
    if target not in placement.replicas:
        members = ", ".join(placement.members)
        return f"{prefix}: it is not a replica of the space (members: {members})"
    verdict = verdicts.get(target)
    if verdict is None or verdict.state != "Alive":
        state = f"{verdict.state.lower()} ({verdict.reason})" if verdict else "unknown"
        return f"{prefix}: it is {state}"
    primary = verdicts.get(placement.primary)
    if primary is None or primary.state != "Alive":
        state = f"{primary.state.lower()} ({primary.reason})" if primary else "unknown"
        return f"{prefix}: the primary {placement.primary} is {state}"
    return None


def _hand_over(
    placement: Placement, target: NodeName, last: Sequence, lag: int, fenced_timeout: float
) -> HandOver:
    epoch = Epoch(placement.epoch + 1)
    old = placement.primary
    # The old primary takes the target's replica slot, so the replica order is otherwise kept.
    replicas = tuple(old if r == target else r for r in placement.replicas)
    steps: tuple[HandOverStep, ...] = (
        Fence(node=old, epoch=epoch),
        AwaitCatchUp(node=target, sequence=last, timeout=fenced_timeout),
        PromoteTarget(node=target, epoch=epoch),
        Demote(node=old, primary=target, epoch=epoch),
    )
    lag_text = "caught up" if lag == 0 else f"{lag} entries behind, within the handover margin"
    return HandOver(
        placement=Placement(primary=target, replicas=replicas, epoch=epoch),
        steps=steps,
        reason=f"target {target} is {lag_text}; handing over at epoch {epoch}",
    )
