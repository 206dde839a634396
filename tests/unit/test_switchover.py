"""Switchover: wait for the target with a visible reason, then hand over with zero loss."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.model import MemberReport, Placement, SwitchoverProgress
from engram_operator.switchover import (
    DEFAULT_FENCED_TIMEOUT,
    Abort,
    AwaitCatchUp,
    CoolingDown,
    Demote,
    Fence,
    Finished,
    HandOver,
    PromoteTarget,
    Refuse,
    SwitchoverPlan,
    SwitchoverStep,
    Wait,
    next_step,
    plan_switchover,
)
from engram_operator.verdict import Verdict

ORDERS = SpaceId("orders")
A, B, C = NodeName("node-a"), NodeName("node-b"), NodeName("node-c")
PLACEMENT = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
ALIVE = {n: Verdict(node=n, state="Alive", reason="lease renewed 0.1 s ago") for n in (A, B, C)}


def plan(
    *,
    target: NodeName = B,
    last: int = 1000,
    applied: int | None = 880,
    elapsed: float = 3.1,
    verdicts: dict[NodeName, Verdict] | None = None,
    ready_lag: int = 0,
) -> SwitchoverPlan:
    return plan_switchover(
        space=ORDERS,
        placement=PLACEMENT,
        target=target,
        verdicts={**ALIVE, **(verdicts or {})},
        primary_last_sequence=Sequence(last),
        target_applied=None if applied is None else Sequence(applied),
        started_at=50.0,
        now=50.0 + elapsed,
        timeout=30.0,
        ready_lag=ready_lag,
    )


def test_switchover_waits_while_the_target_is_behind() -> None:
    assert plan() == Wait(reason="target node-b is 120 entries behind; waiting (3.1 s of 30 s)")


def test_switchover_waits_for_a_target_that_has_not_reported() -> None:
    assert plan(applied=None) == Wait(
        reason="target node-b has not reported progress; waiting (3.1 s of 30 s)"
    )


def test_switchover_hands_over_once_caught_up() -> None:
    result = plan(applied=1000)
    assert isinstance(result, HandOver)
    assert result.placement == Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    assert result.steps == (
        Fence(node=A, epoch=Epoch(4)),
        AwaitCatchUp(node=B, sequence=Sequence(1000), timeout=DEFAULT_FENCED_TIMEOUT),
        PromoteTarget(node=B, epoch=Epoch(4)),
        Demote(node=A, primary=B, epoch=Epoch(4)),
    )
    assert result.reason == "target node-b is caught up; handing over at epoch 4"


def test_switchover_hands_over_within_the_ready_margin() -> None:
    result = plan(applied=880, ready_lag=120)
    assert isinstance(result, HandOver)
    assert result.reason == (
        "target node-b is 120 entries behind, within the handover margin; handing over at epoch 4"
    )
    # The fence stops writes first, so the wait is for the full last sequence: zero loss.
    assert AwaitCatchUp(node=B, sequence=Sequence(1000), timeout=5.0) in result.steps


def test_switchover_aborts_past_the_timeout() -> None:
    assert plan(elapsed=30.5) == Abort(
        reason=(
            "switchover of space orders to node-b aborted: target node-b is still 120 entries"
            " behind after 30.5 s (timeout 30 s)"
        )
    )


def test_switchover_aborts_when_the_target_never_reported() -> None:
    result = plan(applied=None, elapsed=31.0)
    assert isinstance(result, Abort)
    assert "target node-b still has not reported progress after 31.0 s" in result.reason


def test_switchover_hands_over_if_caught_up_right_at_the_deadline() -> None:
    assert isinstance(plan(elapsed=45.0, applied=1000), HandOver)


def test_switchover_refuses_a_target_that_is_not_a_replica() -> None:
    assert plan(target=NodeName("node-z")) == Refuse(
        reason=(
            "cannot switch space orders over to node-z: it is not a replica of the space"
            " (members: node-a, node-b, node-c)"
        )
    )


def test_switchover_refuses_the_current_primary() -> None:
    assert plan(target=A) == Refuse(
        reason="cannot switch space orders over to node-a: it is already the primary"
    )


def test_switchover_refuses_a_dead_target() -> None:
    dead = Verdict(node=B, state="Dead", reason="lease expired 3.0 s ago, probe failed")
    assert plan(verdicts={B: dead}) == Refuse(
        reason=(
            "cannot switch space orders over to node-b: it is dead"
            " (lease expired 3.0 s ago, probe failed)"
        )
    )


def test_switchover_refuses_when_the_primary_is_not_alive() -> None:
    suspect = Verdict(node=A, state="Suspect", reason="lease expired 0.2 s ago; probing")
    assert plan(verdicts={A: suspect}) == Refuse(
        reason=(
            "cannot switch space orders over to node-b: the primary node-a is suspect"
            " (lease expired 0.2 s ago; probing)"
        )
    )


def test_switchover_refuses_a_target_without_verdict() -> None:
    result = plan_switchover(
        space=ORDERS,
        placement=PLACEMENT,
        target=B,
        verdicts={A: ALIVE[A]},
        primary_last_sequence=Sequence(1),
        target_applied=Sequence(1),
        started_at=0.0,
        now=0.0,
        timeout=30.0,
    )
    assert result == Refuse(reason="cannot switch space orders over to node-b: it is unknown")


@given(
    last=st.integers(0, 10_000),
    applied=st.integers(0, 10_000),
    elapsed=st.floats(0, 100),
    ready=st.integers(0, 500),
)
def test_switchover_never_hands_over_to_a_target_further_behind_than_the_margin(
    last: int, applied: int, elapsed: float, ready: int
) -> None:
    result = plan(last=last, applied=applied, elapsed=elapsed, ready_lag=ready)
    if isinstance(result, HandOver):
        assert last - applied <= ready
        assert result.placement.epoch == PLACEMENT.epoch + 1
        assert isinstance(result.steps[0], Fence), "writes stop before anything else"
    elif isinstance(result, Abort):
        assert elapsed > 30.0
    else:
        assert isinstance(result, Wait)


def step(
    *,
    target: NodeName | None = B,
    progress: SwitchoverProgress | None = None,
    placement: Placement = PLACEMENT,
    reports: tuple[MemberReport, ...] | None = None,
) -> SwitchoverStep | None:
    reports = reports or (
        MemberReport(node=A, role="primary", epoch=Epoch(3), applied_sequence=Sequence(100)),
        MemberReport(node=B, role="replica", epoch=Epoch(3), applied_sequence=Sequence(40)),
    )
    return next_step(
        space=ORDERS,
        placement=placement,
        target=target,
        progress=progress,
        verdicts=ALIVE,
        reports={r.node: r for r in reports},
        now=100.0,
        timeout=30.0,
        ready_lag=0,
        retry_after=60.0,
    )


def test_switchover_next_step_is_none_without_a_target() -> None:
    assert step(target=None) is None
    assert step(target=A) is None, "the target already leads and nothing is tracked"


def test_switchover_next_step_starts_the_clock_now() -> None:
    assert step() == Wait(reason="target node-b is 60 entries behind; waiting (0.0 s of 30 s)")


def test_switchover_next_step_continues_a_tracked_attempt() -> None:
    progress = SwitchoverProgress(target=B, started_at=90.0)
    assert step(progress=progress) == Wait(
        reason="target node-b is 60 entries behind; waiting (10.0 s of 30 s)"
    )


def test_switchover_next_step_cools_down_after_an_abort() -> None:
    aborted = SwitchoverProgress(target=B, started_at=0.0, aborted_at=70.0, abort_reason="slow")
    assert step(progress=aborted) == CoolingDown(
        reason="switchover of space orders to node-b aborted (slow); retrying in 30.0 s"
    )
    cooled = SwitchoverProgress(target=B, started_at=0.0, aborted_at=30.0, abort_reason="slow")
    assert step(progress=cooled) == Wait(
        reason="target node-b is 60 entries behind; waiting (0.0 s of 30 s)"
    )


def test_switchover_next_step_finishes_when_the_target_leads() -> None:
    done = Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    progress = SwitchoverProgress(target=B, started_at=90.0)
    assert step(placement=done, progress=progress) == Finished(
        reason="switchover of space orders to node-b complete: it leads at epoch 4"
    )


def test_switchover_next_step_finishes_when_the_user_changes_the_target() -> None:
    progress = SwitchoverProgress(target=B, started_at=90.0)
    assert step(target=C, progress=progress) == Finished(
        reason="switchover of space orders to node-b withdrawn: spec.targetPrimary is now node-c"
    )


def test_switchover_next_step_waits_for_the_primary_to_report() -> None:
    only_b = (MemberReport(node=B, role="replica", epoch=Epoch(3), applied_sequence=Sequence(1)),)
    assert step(reports=only_b) == Wait(reason="waiting for primary node-a to report its sequence")
