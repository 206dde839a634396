"""Status: phase, Kubernetes conditions, member table, lag and split-brain detection."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.model import MemberReport, MemberState, Placement, SpaceSpec
from engram_operator.status import (
    Condition,
    MemberRow,
    Operation,
    SpaceStatus,
    build_status,
    detect_split_brain,
    member_table,
)
from engram_operator.verdict import Verdict

ORDERS = SpaceId("orders")
A, B, C = NodeName("node-a"), NodeName("node-b"), NodeName("node-c")
PLACEMENT = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
T0, T1 = "2024-05-01T10:00:00Z", "2024-05-01T10:05:00Z"


def alive(node: NodeName) -> Verdict:
    return Verdict(node=node, state="Alive", reason="lease renewed 0.1 s ago")


ALIVE = {n: alive(n) for n in (A, B, C)}


def report(
    node: NodeName,
    seq: int,
    *,
    role: str = "replica",
    epoch: int = 3,
    lag: float = 0.0,
    state: MemberState = "Healthy",
) -> MemberReport:
    return MemberReport(
        node=node,
        role="primary" if role == "primary" else "replica",
        epoch=Epoch(epoch),
        applied_sequence=Sequence(seq),
        lag_seconds=lag,
        state=state,
    )


HEALTHY = {A: report(A, 1000, role="primary"), B: report(B, 1000), C: report(C, 988, lag=0.2)}


def status(
    *,
    reports: dict[NodeName, MemberReport] | None = None,
    verdicts: dict[NodeName, Verdict] | None = None,
    placement: Placement | None = PLACEMENT,
    spec: SpaceSpec | None = None,
    previous: tuple[Condition, ...] = (),
    now: str = T0,
    operation: Operation = "Idle",
) -> SpaceStatus:
    return build_status(
        space=ORDERS,
        spec=spec or SpaceSpec(),
        placement=placement,
        verdicts={**ALIVE, **(verdicts or {})},
        reports=HEALTHY if reports is None else reports,
        previous_conditions=previous,
        now_iso=now,
        operation=operation,
        operation_message="node-a dead: lease expired 2.1 s ago, probe failed",
    )


def conditions(s: SpaceStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in s.conditions}


def test_status_healthy_space() -> None:
    s = status()
    assert s.phase == "Healthy"
    assert conditions(s) == {
        "Ready": ("True", "PrimaryServing"),
        "Replicating": ("True", "AllReplicasStreaming"),
        "Degraded": ("False", "AsDesired"),
        "FailingOver": ("False", "NoFailover"),
        "SplitBrain": ("False", "SinglePrimary"),
    }
    assert (s.max_lag_entries, s.max_lag_seconds) == (12, 0.2)
    assert s.message == (
        "primary node-a at epoch 3; 2 replicas streaming; max lag 12 entries / 0.2 s"
    )
    assert all(c.last_transition_time == T0 for c in s.conditions)


def test_status_member_table_has_lag_in_entries_and_seconds() -> None:
    assert member_table(PLACEMENT, ALIVE, HEALTHY) == (
        MemberRow(
            node=A,
            role="primary",
            applied_sequence=1000,
            lag_entries=0,
            lag_seconds=0.0,
            state="Healthy",
        ),
        MemberRow(
            node=B,
            role="replica",
            applied_sequence=1000,
            lag_entries=0,
            lag_seconds=0.0,
            state="Healthy",
        ),
        MemberRow(
            node=C,
            role="replica",
            applied_sequence=988,
            lag_entries=12,
            lag_seconds=0.2,
            state="Healthy",
        ),
    )


def test_status_member_table_marks_unreported_and_unreachable_members() -> None:
    dead = Verdict(node=B, state="Dead", reason="lease expired 3.0 s ago, probe failed")
    suspect = Verdict(node=C, state="Suspect", reason="lease expired 0.1 s ago; probing")
    rows = member_table(PLACEMENT, {**ALIVE, B: dead, C: suspect}, {B: report(B, 5)})
    assert [(r.node, r.state, r.applied_sequence, r.lag_entries) for r in rows] == [
        (A, "Unknown", None, None),
        (B, "Failed", 5, None),
        (C, "Unreachable", None, None),
    ]


def test_status_idle_space_reads_zero_lag() -> None:
    idle = {A: report(A, 7, role="primary"), B: report(B, 7), C: report(C, 7)}
    s = status(reports=idle)
    assert (s.max_lag_entries, s.max_lag_seconds) == (0, 0.0)


def test_status_keeps_last_transition_time_while_status_is_unchanged() -> None:
    first = status(now=T0)
    lagging = {**HEALTHY, C: report(C, 500, lag=2.5, state="Lagging")}
    second = status(reports=lagging, previous=first.conditions, now=T1)
    times = {c.type: c.last_transition_time for c in second.conditions}
    assert times["Ready"] == T0, "Ready stayed True"
    assert times["Degraded"] == T1, "Degraded flipped to True"
    degraded = next(c for c in second.conditions if c.type == "Degraded")
    assert (degraded.reason, degraded.message) == (
        "ReplicaLagging",
        "replica node-c is Lagging, 500 entries / 2.5 s behind",
    )
    assert second.phase == "Degraded"


def test_status_condition_round_trips_through_a_dict() -> None:
    for condition in status().conditions:
        assert Condition.from_dict(condition.to_dict()) == condition
    odd = Condition.from_dict({"type": "Ready", "status": "maybe"})
    assert (odd.status, odd.last_transition_time) == ("Unknown", "")


def test_status_previous_unknown_condition_gets_a_fresh_time() -> None:
    previous = (Condition.from_dict({"type": "Ready", "status": "True"}),)
    ready = next(c for c in status(previous=previous, now=T1).conditions if c.type == "Ready")
    assert ready.last_transition_time == T1, "an empty previous time is not kept"


def test_status_lag_at_warning_makes_the_space_degraded() -> None:
    s = status(reports={**HEALTHY, C: report(C, 990, lag=1.0)})
    assert s.phase == "Degraded"
    assert conditions(s)["Replicating"] == ("True", "AllReplicasStreaming")


def test_status_dead_replica_is_degraded_and_not_replicating() -> None:
    dead = Verdict(node=C, state="Dead", reason="lease expired 3.0 s ago, probe failed", since=1.0)
    s = status(verdicts={C: dead})
    assert s.phase == "Degraded"
    assert conditions(s)["Degraded"] == ("True", "ReplicaUnreachable")
    assert conditions(s)["Replicating"] == ("False", "ReplicaNotStreaming")
    assert s.message == "replica node-c dead: lease expired 3.0 s ago, probe failed"
    replicating = next(c for c in s.conditions if c.type == "Replicating")
    assert replicating.message == "not streaming: node-c (Failed)"


def test_status_replica_reported_failed_by_the_primary_is_degraded() -> None:
    s = status(reports={**HEALTHY, B: report(B, 10, state="Failed")})
    assert conditions(s)["Degraded"] == ("True", "ReplicaDegraded")
    assert s.message.startswith("replica node-b is Failed")


def test_status_lists_problems_most_serious_first() -> None:
    suspect = Verdict(node=A, state="Suspect", reason="lease expired 0.2 s ago; probing")
    s = status(
        verdicts={A: suspect},
        reports={**HEALTHY, B: report(B, 900, lag=3.0, state="Lagging")},
        spec=SpaceSpec(replicas=3),
    )
    assert s.message == (
        "primary node-a suspect: lease expired 0.2 s ago; probing; 2 of 3 replicas placed;"
        " replica node-b is Lagging, 100 entries / 3.0 s behind"
    )
    assert conditions(s)["Ready"] == ("False", "PrimaryUnreachable")


def test_status_control_plane_blindness_reads_unknown_not_unreachable() -> None:
    reason = "control plane cannot read leases (store error 0.2 s ago); holding"
    blind = {n: Verdict(node=n, state="Unknown", reason=reason) for n in (A, B, C)}
    s = status(verdicts=blind)
    assert conditions(s)["Ready"] == ("Unknown", "LivenessUnknown")
    assert conditions(s)["Degraded"] == ("True", "LivenessUnknown")
    assert s.message == reason, "said once, not once per member"


def test_status_dead_primary_without_failover_is_failed() -> None:
    dead = Verdict(node=A, state="Dead", reason="lease expired 9.0 s ago, probe failed")
    s = status(verdicts={A: dead})
    assert s.phase == "Failed"
    assert conditions(s)["Ready"] == ("False", "PrimaryUnreachable")


def test_status_failing_over() -> None:
    s = status(operation="FailingOver")
    assert s.phase == "FailingOver"
    failing = next(c for c in s.conditions if c.type == "FailingOver")
    assert (failing.status, failing.reason, failing.message) == (
        "True",
        "PrimaryFailed",
        "node-a dead: lease expired 2.1 s ago, probe failed",
    )


def test_status_failing_over_says_what_holds_it_up() -> None:
    held = {
        "cannot fail over space orders (node-a dead: lease expired 2.1 s ago, probe failed):"
        " only 1 of 3 members reachable; quorum needs 2 (answered the fence at epoch 4: node-c;"
        " node-a no answer within 0.5 s; node-b no answer within 0.5 s)": "QuorumUnreachable",
        "primary node-a of space orders is dead (lease expired 2.1 s ago, probe failed); waiting"
        " out the old primary's write lease (0.4 s left) before promoting": "WaitingForWriteLease",
    }
    for sentence, reason in held.items():
        s = build_status(
            space=ORDERS,
            spec=SpaceSpec(),
            placement=PLACEMENT,
            verdicts=ALIVE,
            reports=HEALTHY,
            previous_conditions=(),
            now_iso=T0,
            operation="FailingOver",
            operation_message=sentence,
        )
        failing = next(c for c in s.conditions if c.type == "FailingOver")
        assert (failing.status, failing.reason, failing.message) == ("True", reason, sentence)


def test_status_switching_over() -> None:
    assert status(operation="SwitchingOver").phase == "SwitchingOver"


def test_status_paused_wins_over_everything() -> None:
    assert status(spec=SpaceSpec(paused=True), operation="FailingOver").phase == "Paused"


def test_status_pending_without_placement() -> None:
    s = status(placement=None, reports={})
    assert s.phase == "Pending"
    assert s.members == ()
    assert conditions(s)["Ready"] == ("False", "NotPlaced")
    assert s.message == "space orders is waiting for nodes"


def test_status_placing_until_the_primary_confirms_its_epoch() -> None:
    s = status(reports={A: report(A, 0, role="replica", epoch=0)})
    assert s.phase == "Placing"
    ready = next(c for c in s.conditions if c.type == "Ready")
    assert (ready.reason, ready.message) == (
        "PrimaryNotConfirmed",
        "waiting for node-a to report primary at epoch 3",
    )


def test_status_without_replicas_is_healthy_but_not_replicating() -> None:
    solo = Placement(primary=A, replicas=(), epoch=Epoch(1))
    s = status(
        placement=solo,
        spec=SpaceSpec(replicas=0),
        reports={A: report(A, 5, role="primary", epoch=1)},
    )
    assert s.phase == "Healthy"
    assert conditions(s)["Replicating"] == ("False", "NoReplicasRequested")


def test_status_split_brain_two_primaries_at_one_epoch() -> None:
    reports = {**HEALTHY, C: report(C, 990, role="primary")}
    s = status(reports=reports)
    split = next(c for c in s.conditions if c.type == "SplitBrain")
    assert (split.status, split.reason, split.message) == (
        "True",
        "MultiplePrimaries",
        "node-a and node-c both report primary at epoch 3",
    )
    assert s.phase == "Degraded"


def test_split_brain_when_a_non_primary_claims_the_current_epoch() -> None:
    reports = [report(A, 5, role="replica", epoch=4), report(B, 5, role="primary", epoch=4)]
    placement = Placement(primary=A, replicas=(B,), epoch=Epoch(4))
    assert detect_split_brain(placement, reports) == (
        "node-b reports primary at epoch 4, but the primary is node-a at epoch 4"
    )


def test_split_brain_not_flagged_for_a_deposed_primary_at_an_older_epoch() -> None:
    reports = [report(A, 5, role="primary", epoch=3), report(B, 5, role="primary", epoch=4)]
    placement = Placement(primary=B, replicas=(A,), epoch=Epoch(4))
    assert detect_split_brain(placement, reports) is None


def test_status_serialises_to_json() -> None:
    data = json.loads(json.dumps(status().to_dict()))
    assert data["phase"] == "Healthy"
    assert (data["primary"], data["replicas"], data["epoch"]) == ("node-a", ["node-b", "node-c"], 3)
    assert data["members"][2] == {
        "node": "node-c",
        "role": "replica",
        "appliedSequence": 988,
        "lagEntries": 12,
        "lagSeconds": 0.2,
        "state": "Healthy",
    }
    assert data["conditions"][0] == {
        "type": "Ready",
        "status": "True",
        "reason": "PrimaryServing",
        "message": "node-a accepts writes at epoch 3",
        "lastTransitionTime": T0,
    }
    assert (data["maxLagEntries"], data["maxLagSeconds"]) == (12, 0.2)
    empty = status(placement=None, reports={}).to_dict()
    assert (empty["primary"], empty["replicas"], empty["epoch"]) == (None, [], None)


flips = st.lists(st.sampled_from(["healthy", "lagging", "dead"]), min_size=1, max_size=8)


@given(flips)
def test_status_transition_time_moves_exactly_when_status_flips(sequence: list[str]) -> None:
    previous: tuple[Condition, ...] = ()
    for i, kind in enumerate(sequence):
        now = f"2024-05-01T10:00:{i:02d}Z"
        reports = HEALTHY if kind != "lagging" else {**HEALTHY, B: report(B, 1, lag=9.0)}
        verdicts = {B: Verdict(node=B, state="Dead", reason="x")} if kind == "dead" else None
        current = status(reports=reports, verdicts=verdicts, previous=previous, now=now)
        before = {c.type: c for c in previous}
        for c in current.conditions:
            old = before.get(c.type)
            if old is not None and old.status == c.status:
                assert c.last_transition_time == old.last_transition_time
            else:
                assert c.last_transition_time == now
        previous = current.conditions
