"""The reconcile tick: actions in the right order, and one sentence that says what it did.

A failover is two steps: `reconcile` plans the fence round (`FenceAndElect`), and
`conclude_failover` decides on its answers; `failover()` below runs both."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator import switchover
from engram_operator.election import FenceAnswer
from engram_operator.model import (
    MemberReport,
    NodeInfo,
    Observation,
    Placement,
    SpaceSpec,
    SwitchoverProgress,
)
from engram_operator.placement import describe, rank
from engram_operator.reconcile import (
    AbortSwitchover,
    BeginSwitchover,
    ClearSwitchover,
    Decision,
    ExecuteHandOver,
    FenceAndElect,
    Noop,
    Place,
    Promote,
    PushAssignment,
    Settings,
    Wait,
    conclude_failover,
    reconcile,
)
from engram_operator.verdict import Verdict, VerdictState

ORDERS = SpaceId("orders")
A, B, C, D = (NodeName(n) for n in ("node-a", "node-b", "node-c", "node-d"))
NODES = tuple(NodeInfo(name=n, address=f"{n}:7400") for n in (A, B, C, D))
PLACEMENT = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
NOW = 1000.0
DEAD_REASON = "lease expired 2.1 s ago, probe failed"


def verdict(node: NodeName, state: VerdictState = "Alive", *, dead_for: float = 2.1) -> Verdict:
    reasons = {
        "Alive": "lease renewed 0.1 s ago",
        "Suspect": "lease expired 0.4 s ago; probing",
        "Dead": DEAD_REASON if dead_for == 2.1 else f"lease expired {dead_for:.1f} s ago",
        "Unknown": "control plane cannot read leases (store error 0.2 s ago); holding",
    }
    since = None if state in ("Alive", "Unknown") else NOW - dead_for
    return Verdict(node=node, state=state, reason=reasons[state], since=since)


def report(
    node: NodeName,
    seq: int,
    *,
    role: str = "replica",
    epoch: int = 3,
    accepted: int | None = None,
) -> MemberReport:
    return MemberReport(
        node=node,
        role="primary" if role == "primary" else "replica",
        epoch=Epoch(epoch),
        applied_sequence=Sequence(seq),
        lag_seconds=0.2 if seq < 1000 else 0.0,
        last_epoch=Epoch(epoch),
        accepted_epoch=None if accepted is None else Epoch(accepted),
    )


HEALTHY = (report(A, 1000, role="primary"), report(B, 1000), report(C, 988))


def world(
    *,
    placement: Placement | None = PLACEMENT,
    spec: SpaceSpec | None = None,
    states: dict[NodeName, Verdict] | None = None,
    reports: tuple[MemberReport, ...] = HEALTHY,
    nodes: tuple[NodeInfo, ...] = NODES,
    progress: SwitchoverProgress | None = None,
    last_promotion_epoch: int | None = None,
    load: dict[NodeName, int] | None = None,
    grants: dict[NodeName, float] | None = None,
    pending: int | None = None,
) -> Observation:
    verdicts = {n.name: verdict(n.name) for n in nodes}
    return Observation(
        space=ORDERS,
        spec=spec or SpaceSpec(),
        placement=placement,
        nodes=nodes,
        verdicts={**verdicts, **(states or {})},
        reports={r.node: r for r in reports},
        switchover=progress,
        primary_load=load or {},
        last_promotion_epoch=None if last_promotion_epoch is None else Epoch(last_promotion_epoch),
        lease_grants=grants or {},
        pending_epoch=None if pending is None else Epoch(pending),
    )


def tick(obs: Observation, *, now: float = NOW, settings: Settings | None = None) -> Decision:
    return reconcile(obs, now=now, settings=settings or Settings(switchover_ready_lag=0))


def answers_from_reports(obs: Observation) -> list[FenceAnswer]:
    """Every member that is not Dead answers the fence with what it last reported."""
    assert obs.placement is not None
    out = []
    for m in obs.placement.members:
        r = obs.reports.get(m)
        v = obs.verdicts.get(m)
        if r is None or v is None or v.state == "Dead":
            out.append(FenceAnswer(node=m, ok=False, error="no answer within 0.5 s"))
        else:
            out.append(
                FenceAnswer(
                    node=m, ok=True, last_epoch=r.last_epoch, last_sequence=r.applied_sequence
                )
            )
    return out


def fence_of(decision: Decision) -> FenceAndElect:
    (fence,) = [a for a in decision.actions if isinstance(a, FenceAndElect)]
    return fence


def failover(obs: Observation, answers: list[FenceAnswer] | None = None) -> Decision:
    """Plan the fence round, then conclude it with `answers` (default: from the reports)."""
    plan = tick(obs)
    return conclude_failover(
        obs, fence_of(plan), answers if answers is not None else answers_from_reports(obs)
    )


# -- paused, holding, first placement ------------------------------------------------------


def test_reconcile_paused_does_nothing_and_says_so() -> None:
    decision = tick(world(spec=SpaceSpec(paused=True), states={A: verdict(A, "Dead")}))
    assert decision.actions == (Noop(),)
    assert decision.sentence == (
        "paused: spec.paused is true; space orders stays as it is"
        " (primary node-a, replicas node-b, node-c at epoch 3)"
    )


def test_reconcile_paused_before_placement() -> None:
    decision = tick(world(placement=None, spec=SpaceSpec(paused=True)))
    assert decision.sentence == "paused: spec.paused is true; space orders is not placed yet"


def test_reconcile_holds_while_the_control_plane_cannot_read_leases() -> None:
    unknown = {n.name: verdict(n.name, "Unknown") for n in NODES}
    for placement in (PLACEMENT, None):
        decision = tick(world(placement=placement, states=unknown))
        assert decision.sentence == (
            "holding space orders: control plane cannot read leases (store error 0.2 s ago);"
            " holding"
        )
        assert decision.actions == (Wait(reason=decision.sentence),)


def test_reconcile_holds_without_a_verdict_on_the_primary() -> None:
    decision = tick(world(nodes=NODES[1:]))
    assert decision.sentence == "holding space orders: no verdict on primary node-a yet"


def test_reconcile_places_a_new_space_and_pushes_assignments() -> None:
    decision = tick(world(placement=None, nodes=NODES[:3], reports=()))
    place, push = decision.actions
    assert isinstance(place, Place) and isinstance(push, PushAssignment)
    placement = place.placement
    assert set(placement.members) == {A, B, C}
    assert placement.epoch == 1
    assert push == PushAssignment(placement=placement, nodes=placement.members)
    assert decision.sentence == f"placed space orders: {describe(placement)}"


def test_reconcile_places_new_primaries_away_from_busy_nodes() -> None:
    top = rank(ORDERS, NODES[:3])
    # The space's favourite node already leads 10 spaces, over the cap of ceil(11/3) + 1 = 5.
    decision = tick(world(placement=None, nodes=NODES[:3], reports=(), load={top[0].name: 10}))
    assert isinstance(decision.actions[0], Place)
    assert decision.actions[0].placement.primary == top[1].name


def test_reconcile_places_what_it_can_when_nodes_are_short() -> None:
    decision = tick(world(placement=None, nodes=NODES[:2], reports=()))
    assert decision.sentence.endswith(
        "; under-replicated: space orders wants 1 primary + 2 replicas = 3 nodes but only 2 are"
        " available; placed 1 of 2 replicas; add 1 node(s) or lower spec.replicas to 1"
    )


def test_reconcile_waits_for_nodes_before_placing() -> None:
    decision = tick(world(placement=None, nodes=(), reports=()))
    assert (
        decision.sentence == "waiting: no nodes available for space orders; start at least 1 node"
    )
    assert decision.actions == (Wait(reason=decision.sentence),)


def test_reconcile_never_places_on_suspect_nodes() -> None:
    states = {n.name: verdict(n.name, "Suspect") for n in NODES}
    decision = tick(world(placement=None, states=states, reports=()))
    assert decision.sentence.startswith("waiting: no nodes available")


# -- failover ---------------------------------------------------------------------------


def test_reconcile_fences_every_member_before_electing_when_the_primary_dies() -> None:
    decision = tick(world(states={A: verdict(A, "Dead")}))
    assert decision.sentence == (
        "fencing every member of space orders at epoch 4 before electing a new primary"
        " (node-a dead: lease expired 2.1 s ago, probe failed)"
    )
    assert decision.operation == "FailingOver"
    fence = fence_of(decision)
    assert (fence.epoch, fence.nodes, fence.only) == (4, (A, B, C), None)
    assert fence.timeout == Settings().fence_timeout
    # What is recorded before the fence: the epoch, and no winner yet.
    assert fence.record.new_epoch == 4 and fence.record.winner is None
    assert fence.record.summary == decision.sentence


def test_reconcile_promotes_the_best_replica_when_the_primary_dies() -> None:
    decision = failover(world(states={A: verdict(A, "Dead")}))
    assert decision.sentence == (
        "promoted node-b to primary of space orders at epoch 4"
        " (node-a dead: lease expired 2.1 s ago, probe failed); 0 entries possibly lost"
    )
    promote, push = decision.actions
    new = Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    assert isinstance(promote, Promote)
    assert promote.placement == new
    assert promote.record.winner == B
    assert promote.record.cause == "node-a dead: lease expired 2.1 s ago, probe failed"
    assert promote.record.fence is not None and len(promote.record.fence.voters) == 2
    assert push == PushAssignment(placement=new, nodes=(B, C)), "not to the dead node"
    assert decision.operation == "FailingOver"


def test_reconcile_reports_entries_possibly_lost() -> None:
    reports = (report(A, 1000, role="primary"), report(B, 990), report(C, 985))
    decision = failover(world(states={A: verdict(A, "Dead")}, reports=reports))
    assert decision.sentence.endswith("; 10 entries possibly lost")


def test_reconcile_waits_out_the_old_primary_write_lease_before_fencing() -> None:
    lease_wait = Settings().lease_wait
    assert lease_wait >= 1.5 + 0.5
    granted = NOW - 1.0
    obs = world(states={A: verdict(A, "Dead")}, grants={A: granted, B: NOW})
    decision = tick(obs)
    left = lease_wait - 1.0
    assert decision.sentence == (
        "primary node-a of space orders is dead (lease expired 2.1 s ago, probe failed);"
        f" waiting out the old primary's write lease ({left:.1f} s left) before promoting"
    )
    assert decision.actions == (Wait(reason=decision.sentence),)
    assert decision.operation == "FailingOver"
    # Just before it has run out: still waiting; once it has: the fence round.
    assert not any(
        isinstance(a, FenceAndElect) for a in tick(obs, now=granted + lease_wait - 0.01).actions
    )
    assert fence_of(tick(obs, now=granted + lease_wait + 0.001)).epoch == 4


def test_reconcile_under_quorum_a_minority_of_fence_answers_promotes_nobody() -> None:
    obs = world(spec=SpaceSpec(ack_policy="quorum"), states={A: verdict(A, "Dead")})
    answers = [
        FenceAnswer(node=A, ok=False, error="no answer within 0.5 s"),
        FenceAnswer(node=B, ok=False, error="no answer within 0.5 s"),
        FenceAnswer(node=C, ok=True, last_epoch=Epoch(3), last_sequence=Sequence(988)),
    ]
    decision = failover(obs, answers)
    assert decision.sentence == (
        "cannot fail over space orders (node-a dead: lease expired 2.1 s ago, probe failed):"
        " only 1 of 3 members reachable; quorum needs 2 (answered the fence at epoch 4: node-c;"
        " node-a no answer within 0.5 s; node-b no answer within 0.5 s)"
    )
    (wait,) = decision.actions
    assert isinstance(wait, Wait) and wait.record is not None and wait.record.winner is None
    # Retried on every tick (at the same epoch): the space is failing over, not given up.
    assert decision.operation == "FailingOver"
    # A majority answers: promoted, even though node-a never did.
    answers[1] = FenceAnswer(node=B, ok=True, last_epoch=Epoch(3), last_sequence=Sequence(1000))
    decision = failover(obs, answers)
    assert isinstance(decision.actions[0], Promote)
    assert decision.actions[0].placement.primary == B


def test_reconcile_after_a_fence_the_answers_decide_not_the_reports() -> None:
    obs = world(states={A: verdict(A, "Dead")})
    answers = [
        FenceAnswer(node=A, ok=True, last_epoch=Epoch(3), last_sequence=Sequence(1003)),
        FenceAnswer(node=B, ok=True, last_epoch=Epoch(3), last_sequence=Sequence(1000)),
        FenceAnswer(node=C, ok=True, last_epoch=Epoch(3), last_sequence=Sequence(1002)),
    ]
    decision = failover(obs, answers)
    promote, push = decision.actions
    assert isinstance(promote, Promote) and isinstance(push, PushAssignment)
    assert promote.placement.primary == C
    assert promote.record.entries_possibly_lost == 1
    # node-a answered the fence, so it is reachable: it learns it is a replica now.
    assert push.nodes == (C, B, A)


def test_reconcile_retries_a_failover_at_the_pending_epoch() -> None:
    dead = {A: verdict(A, "Dead")}
    assert fence_of(tick(world(states=dead, pending=5))).epoch == 5
    # A member accepted it (our own fence): still ours to use.
    fenced = (report(A, 1000, role="primary"), report(B, 1000, accepted=5), report(C, 988))
    assert fence_of(tick(world(states=dead, pending=5, reports=fenced))).epoch == 5
    # Someone accepted more than we recorded: above it.
    beyond = (report(A, 1000, role="primary"), report(B, 1000, accepted=6), report(C, 988))
    assert fence_of(tick(world(states=dead, pending=5, reports=beyond))).epoch == 7
    # A pending epoch at or below the placement's was used up: above everything.
    assert fence_of(tick(world(states=dead, pending=3))).epoch == 4


def test_reconcile_explains_a_failover_without_a_winner() -> None:
    states = {A: verdict(A, "Dead"), C: verdict(C, "Dead", dead_for=9.0)}
    reports = (report(A, 50_000, role="primary"), report(B, 10), report(C, 49_999))
    decision = tick(world(states=states, reports=reports))
    assert decision.sentence == (
        "cannot fail over space orders (node-a dead: lease expired 2.1 s ago, probe failed):"
        " no eligible replica (node-b 49990 entries behind (maxLagOnFailover 10000); node-c"
        " dead: lease expired 9.0 s ago); bring node-a back, or set spec.allowLaggingFailover"
        " to promote a lagging replica"
    )
    (wait,) = decision.actions
    assert isinstance(wait, Wait) and wait.record is not None
    assert wait.record.winner is None
    assert decision.operation == "Idle"


def test_reconcile_waits_for_a_human_when_failover_is_manual() -> None:
    decision = tick(world(spec=SpaceSpec(failover_automatic=False), states={A: verdict(A, "Dead")}))
    assert decision.sentence == (
        "primary node-a of space orders is dead (lease expired 2.1 s ago, probe failed) and"
        " spec.failoverAutomatic is false; set spec.targetPrimary to a replica to fail over"
    )


def test_reconcile_manual_failover_promotes_the_target_primary() -> None:
    spec = SpaceSpec(failover_automatic=False, target_primary=C)
    decision = failover(world(spec=spec, states={A: verdict(A, "Dead")}))
    assert decision.sentence == (
        "promoted node-c to primary of space orders at epoch 4 (node-a dead: lease expired"
        " 2.1 s ago, probe failed; manual failover to spec.targetPrimary); 12 entries possibly lost"
    )


def test_reconcile_failover_abandons_a_switchover_in_progress() -> None:
    progress = SwitchoverProgress(target=C, started_at=NOW - 1)
    spec = SpaceSpec(target_primary=C)
    decision = tick(world(spec=spec, states={A: verdict(A, "Dead")}, progress=progress))
    assert decision.actions[0] == AbortSwitchover(target=C, reason="node-a dead: " + DEAD_REASON)
    assert isinstance(decision.actions[1], FenceAndElect)


def test_reconcile_waits_for_the_probe_when_the_primary_is_suspect() -> None:
    decision = tick(world(states={A: verdict(A, "Suspect")}))
    assert decision.sentence == (
        "primary node-a of space orders is suspect (lease expired 0.4 s ago; probing);"
        " not failing over unless the probe fails"
    )


def test_reconcile_phase_stays_failing_over_until_the_winner_confirms() -> None:
    promoted = Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    unconfirmed = (report(B, 1000, epoch=3), report(C, 990, epoch=4))
    obs = world(placement=promoted, reports=unconfirmed, last_promotion_epoch=4)
    assert tick(obs).operation == "FailingOver"
    confirmed = (report(B, 1000, role="primary", epoch=4), report(C, 990, epoch=4))
    obs = world(placement=promoted, reports=confirmed, last_promotion_epoch=4)
    assert tick(obs).operation == "Idle"


def test_reconcile_gives_a_restarted_primary_a_newer_epoch() -> None:
    # The sidecar's Space.resume: a primary that restarted accepts the next epoch itself (it may
    # have shipped entries its disk lost) and takes no writes at its old one. The control plane
    # re-asserts it above every epoch known, so its new entries cut the replicas' stale tail.
    restarted = (
        report(A, 990, role="primary", accepted=4),
        report(B, 1000),
        report(C, 1000),
    )
    decision = tick(world(reports=restarted))
    again = Placement(primary=A, replicas=(B, C), epoch=Epoch(5))
    assert decision.sentence == (
        "space orders: primary node-a restarted and takes writes only at a newer epoch;"
        " re-asserted node-a as primary at epoch 5"
    )
    assert decision.actions == (
        Place(placement=again, message=decision.sentence),
        PushAssignment(placement=again, nodes=(A, B, C)),
    )


def test_reconcile_reasserts_the_primary_when_a_promotion_did_not_finish() -> None:
    # A fence round at epoch 4 found no majority; now node-a answers again. node-b and node-c
    # took epoch 4 and refuse node-a's epoch-3 frames: node-a leads at epoch 4 (nobody else
    # was ever assigned at it).
    fenced = (
        report(A, 1000, role="primary"),
        report(B, 1000, accepted=4),
        report(C, 988, accepted=4),
    )
    decision = tick(world(reports=fenced, pending=4))
    again = Placement(primary=A, replicas=(B, C), epoch=Epoch(4))
    assert decision.sentence == (
        "space orders: node-b (epoch 4), node-c (epoch 4) accepted a promotion's epoch that"
        " never took effect; re-asserted node-a as primary at epoch 4"
    )
    assert decision.actions == (
        Place(placement=again, message=decision.sentence),
        PushAssignment(placement=again, nodes=(A, B, C)),
    )
    # Without a record of that epoch, above it.
    assert tick(world(reports=fenced)).actions[0] == Place(
        placement=replace(again, epoch=Epoch(5)), message=tick(world(reports=fenced)).sentence
    )


# -- split brain ------------------------------------------------------------------------


def test_reconcile_fences_a_split_brain_with_a_new_epoch() -> None:
    rogue = report(D, 900, role="primary", epoch=3)
    decision = tick(world(reports=(*HEALTHY, rogue)))
    assert decision.sentence == (
        "split brain in space orders: node-a and node-d both report primary at epoch 3;"
        " re-asserted node-a as primary at epoch 4 to fence the others"
    )
    fenced = Placement(primary=A, replicas=(B, C), epoch=Epoch(4))
    assert decision.actions == (
        Place(placement=fenced, message=decision.sentence),
        PushAssignment(placement=fenced, nodes=(A, B, C, D)),
    )


# -- switchover -------------------------------------------------------------------------


def behind(lag: int) -> tuple[MemberReport, ...]:
    return (report(A, 1000, role="primary"), report(B, 1000 - lag), report(C, 1000))


def test_reconcile_starts_a_switchover_and_waits_for_the_target() -> None:
    decision = tick(world(spec=SpaceSpec(target_primary=B), reports=behind(120)))
    reason = "target node-b is 120 entries behind; waiting (0.0 s of 30 s)"
    assert decision.actions == (BeginSwitchover(target=B), Wait(reason=reason))
    assert decision.sentence == f"switching space orders over to node-b: {reason}"
    assert decision.operation == "SwitchingOver"


def test_reconcile_keeps_waiting_during_a_switchover() -> None:
    progress = SwitchoverProgress(target=B, started_at=NOW - 3.1)
    obs = world(spec=SpaceSpec(target_primary=B), reports=behind(120), progress=progress)
    decision = tick(obs)
    assert decision.sentence == (
        "switching space orders over to node-b:"
        " target node-b is 120 entries behind; waiting (3.1 s of 30 s)"
    )
    assert decision.actions == (Wait(reason=decision.sentence.split(": ", 1)[1]),)


def test_reconcile_hands_over_when_the_target_caught_up() -> None:
    progress = SwitchoverProgress(target=B, started_at=NOW - 3.1)
    obs = world(spec=SpaceSpec(target_primary=B), reports=behind(0), progress=progress)
    decision = tick(obs)
    assert decision.sentence == (
        "switching space orders over to node-b: target node-b is caught up; handing over at epoch 4"
    )
    (action,) = decision.actions
    assert isinstance(action, ExecuteHandOver)
    assert action.plan.placement == Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    assert isinstance(action.plan.steps[0], switchover.Fence)


def test_reconcile_hands_over_within_the_default_margin() -> None:
    obs = world(spec=SpaceSpec(target_primary=B), reports=behind(120))
    decision = reconcile(obs, now=NOW)
    assert isinstance(decision.actions[-1], ExecuteHandOver)


def test_reconcile_aborts_a_switchover_past_its_timeout() -> None:
    progress = SwitchoverProgress(target=B, started_at=NOW - 31)
    decision = tick(world(spec=SpaceSpec(target_primary=B), reports=behind(5), progress=progress))
    reason = (
        "switchover of space orders to node-b aborted: target node-b is still 5 entries behind"
        " after 31.0 s (timeout 30 s)"
    )
    assert decision.actions == (AbortSwitchover(target=B, reason=reason),)
    assert decision.sentence == reason


def test_reconcile_retries_an_aborted_switchover_after_a_cool_down() -> None:
    progress = SwitchoverProgress(
        target=B, started_at=NOW - 50, aborted_at=NOW - 10, abort_reason="too slow"
    )
    obs = world(spec=SpaceSpec(target_primary=B), reports=behind(5), progress=progress)
    assert tick(obs).sentence == (
        "switchover of space orders to node-b aborted (too slow); retrying in 50.0 s"
    )
    retry = tick(obs, now=NOW + 51)
    assert retry.actions[0] == BeginSwitchover(target=B)


def test_reconcile_refuses_a_switchover_to_a_non_replica() -> None:
    decision = tick(world(spec=SpaceSpec(target_primary=D)))
    assert decision.sentence == (
        "cannot switch space orders over to node-d: it is not a replica of the space"
        " (members: node-a, node-b, node-c)"
    )
    assert decision.actions == (AbortSwitchover(target=D, reason=decision.sentence),)


def test_reconcile_switchover_first_resends_to_a_silent_primary() -> None:
    decision = tick(world(spec=SpaceSpec(target_primary=B), reports=HEALTHY[1:]))
    assert decision.sentence == (
        "re-sent the epoch 3 assignment of space orders to node-a (reports nothing)"
    )
    assert any(isinstance(a, PushAssignment) and a.nodes == (A,) for a in decision.actions)


def test_reconcile_clears_a_completed_switchover() -> None:
    done = Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    progress = SwitchoverProgress(target=B, started_at=NOW - 5)
    confirmed = (
        report(A, 9, epoch=4),
        report(B, 9, role="primary", epoch=4),
        report(C, 9, epoch=4),
    )
    obs = world(
        placement=done, spec=SpaceSpec(target_primary=B), reports=confirmed, progress=progress
    )
    decision = tick(obs)
    assert decision.sentence == "switchover of space orders to node-b complete: it leads at epoch 4"
    assert decision.actions == (ClearSwitchover(reason=decision.sentence),)


def test_reconcile_clears_a_withdrawn_switchover() -> None:
    progress = SwitchoverProgress(target=B, started_at=NOW - 5)
    decision = tick(world(progress=progress))
    assert decision.sentence == (
        "switchover of space orders to node-b withdrawn: spec.targetPrimary is now unset"
    )


# -- placement repair, re-sends, steady state -------------------------------------------


def test_reconcile_gives_a_dead_replica_time_to_return() -> None:
    decision = tick(world(states={C: verdict(C, "Dead", dead_for=5.0)}))
    assert decision.sentence == (
        "space orders: replica node-c is dead (lease expired 5.0 s ago);"
        " replacing it in 25.0 s unless it returns"
    )


def test_reconcile_replaces_a_replica_dead_past_the_grace_period() -> None:
    decision = tick(world(states={C: verdict(C, "Dead", dead_for=31.0)}))
    assert decision.sentence == (
        "space orders: replaced replica node-c (dead for 31 s) with node-d;"
        " now primary node-a, replicas node-b, node-d at epoch 3"
    )
    new = Placement(primary=A, replicas=(B, D), epoch=Epoch(3))
    assert decision.actions == (
        Place(placement=new, message="placed space orders: " + describe(new)),
        PushAssignment(placement=new, nodes=(A, B, D)),
    )


def test_reconcile_drops_a_dead_replica_even_without_a_replacement() -> None:
    decision = tick(world(nodes=NODES[:3], states={C: verdict(C, "Dead", dead_for=40.0)}))
    assert decision.sentence.startswith(
        "space orders: removed replica node-c (dead for 40 s);"
        " now primary node-a, replicas node-b at epoch 3; under-replicated:"
    )


def test_reconcile_adds_a_replica_when_spec_grows() -> None:
    decision = tick(world(spec=SpaceSpec(replicas=3)))
    assert decision.sentence == (
        "space orders: added replica node-d; now primary node-a, replicas node-b, node-c, node-d"
        " at epoch 3"
    )


def test_reconcile_removes_a_replica_when_spec_shrinks_and_tells_it() -> None:
    decision = tick(world(spec=SpaceSpec(replicas=1)))
    place, push = decision.actions
    assert isinstance(place, Place) and isinstance(push, PushAssignment)
    (gone,) = set(PLACEMENT.replicas) - set(place.placement.replicas)
    assert decision.sentence.startswith(
        f"space orders: removed replica {gone} (spec.replicas is 1)"
    )
    assert push.nodes[-1] == gone, "the removed node learns it no longer hosts the space"


def test_reconcile_leaves_a_running_space_alone_when_a_node_joins() -> None:
    decision = tick(world(nodes=(*NODES, NodeInfo(name=NodeName("node-e"), address="e:1"))))
    assert decision.actions == (Noop(),)


def test_reconcile_resends_the_assignment_to_a_member_that_missed_it() -> None:
    reports = (report(A, 1000, role="primary"), report(B, 1000, epoch=2), report(C, 988))
    decision = tick(world(reports=reports))
    assert decision.sentence == (
        "re-sent the epoch 3 assignment of space orders to node-b (reports replica at epoch 2)"
    )
    assert decision.actions == (PushAssignment(placement=PLACEMENT, nodes=(B,)),)


def test_reconcile_tells_a_returning_deposed_primary_to_step_down() -> None:
    now_b = Placement(primary=B, replicas=(A, C), epoch=Epoch(4))
    reports = (report(A, 1010, role="primary", epoch=3), report(B, 1000, role="primary", epoch=4))
    decision = tick(world(placement=now_b, reports=(*reports, report(C, 1000, epoch=4))))
    assert decision.sentence == (
        "re-sent the epoch 4 assignment of space orders to node-a (reports primary at epoch 3)"
    )


def test_reconcile_resends_to_a_live_member_that_reports_nothing() -> None:
    decision = tick(world(reports=HEALTHY[:2]))
    assert decision.sentence == (
        "re-sent the epoch 3 assignment of space orders to node-c (reports nothing)"
    )
    assert any(isinstance(a, PushAssignment) and a.nodes == (C,) for a in decision.actions)


def test_reconcile_says_when_it_cannot_replace_a_lost_replica() -> None:
    short = Placement(primary=A, replicas=(B,), epoch=Epoch(3))
    decision = tick(world(placement=short, nodes=NODES[:2], reports=HEALTHY[:2]))
    assert decision.sentence == (
        "space orders is under-replicated: 1 of 2 replicas; add a node or lower spec.replicas"
    )


def test_reconcile_steady_state_says_so() -> None:
    decision = tick(world())
    assert decision.actions == (Noop(),)
    assert decision.sentence == (
        "space orders is steady: primary node-a, replicas node-b, node-c at epoch 3;"
        " max lag 12 entries / 0.2 s"
    )
    assert decision.operation == "Idle"


# -- properties -------------------------------------------------------------------------

# Weighted so that every branch is common: a dead primary, blindness, pauses, switchovers.
primary_states: st.SearchStrategy[VerdictState] = st.sampled_from(
    ["Alive", "Alive", "Suspect", "Dead", "Dead", "Unknown"]
)
other_states: st.SearchStrategy[VerdictState] = st.sampled_from(
    ["Alive", "Alive", "Alive", "Alive", "Suspect", "Dead"]
)


@given(
    states=st.tuples(primary_states, other_states, other_states, other_states).map(list),
    seqs=st.lists(st.integers(0, 2000), min_size=3, max_size=3),
    epochs=st.lists(st.integers(2, 5), min_size=3, max_size=3),
    roles=st.lists(st.sampled_from(["replica", "replica", "primary"]), min_size=3, max_size=3),
    replicas=st.integers(0, 3),
    target=st.sampled_from([None, None, A, B, C, D]),
    placed=st.sampled_from([True, True, True, False]),
    paused=st.sampled_from([False, False, False, True]),
)
def test_reconcile_always_says_one_sentence_and_acts_safely(
    *,
    states: list[VerdictState],
    seqs: list[int],
    epochs: list[int],
    roles: list[str],
    replicas: int,
    target: NodeName | None,
    placed: bool,
    paused: bool,
) -> None:
    verdicts = {
        n.name: verdict(n.name, s, dead_for=40.0) for n, s in zip(NODES, states, strict=True)
    }
    reports = tuple(
        report(n, seq, role=role, epoch=epoch)
        for n, seq, role, epoch in zip((A, B, C), seqs, roles, epochs, strict=True)
    )
    spec = SpaceSpec(replicas=replicas, target_primary=target, paused=paused)
    obs = world(
        placement=PLACEMENT if placed else None, spec=spec, states=verdicts, reports=reports
    )
    decision = tick(obs)
    assert decision.sentence and "\n" not in decision.sentence
    assert decision.actions
    kinds = [type(a) for a in decision.actions]
    if paused or "Unknown" in states:
        assert kinds in ([Noop], [Wait]), "paused or blind: never act"
    assert Promote not in kinds, "a promotion only ever follows a fence round"
    if FenceAndElect in kinds:
        assert verdicts[A].state == "Dead"
        fence = decision.actions[kinds.index(FenceAndElect)]
        assert isinstance(fence, FenceAndElect)
        assert fence.epoch > max([*epochs, PLACEMENT.epoch])
        assert fence.nodes == PLACEMENT.members
        concluded = conclude_failover(obs, fence, answers_from_reports(obs))
        promotes = [a for a in concluded.actions if isinstance(a, Promote)]
        for promote in promotes:
            assert verdicts[promote.placement.primary].state == "Alive"
            assert promote.placement.epoch == fence.epoch
            assert isinstance(concluded.actions[1], PushAssignment), "recorded, then told"
    if PushAssignment in kinds:
        # The epoch is recorded in status before any sidecar hears of it.
        first_push = kinds.index(PushAssignment)
        recorded = {Place, Promote} & set(kinds[:first_push])
        assert recorded or all(
            isinstance(a, PushAssignment) and a.placement == PLACEMENT for a in decision.actions
        )
    for action in decision.actions:
        if isinstance(action, Place | Promote):
            assert action.placement.epoch >= (PLACEMENT.epoch if placed else 1)
