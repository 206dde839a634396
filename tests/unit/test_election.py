"""Election: highest applied sequence wins, ties to the lowest name, every exclusion explained."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from engram_operator.election import DecisionRecord, elect
from engram_operator.model import MemberReport, Placement, SpaceSpec
from engram_operator.verdict import Verdict, VerdictState
from engram_sidecar.contract import Epoch, NodeName, Sequence, SpaceId

ORDERS = SpaceId("orders")
A, B, C, D = (NodeName(n) for n in ("node-a", "node-b", "node-c", "node-d"))
PLACEMENT = Placement(primary=A, replicas=(B, C, D), epoch=Epoch(3))
CAUSE = "node-a dead: lease expired 2.1 s ago, probe failed"
DEAD = Verdict(node=A, state="Dead", reason="lease expired 2.1 s ago, probe failed", since=1.0)


def alive(node: NodeName) -> Verdict:
    return Verdict(node=node, state="Alive", reason="lease renewed 0.1 s ago")


def report(node: NodeName, seq: int, *, epoch: int = 3, role: str = "replica") -> MemberReport:
    return MemberReport(
        node=node,
        role="primary" if role == "primary" else "replica",
        epoch=Epoch(epoch),
        applied_sequence=Sequence(seq),
    )


def run(
    reports: list[MemberReport],
    *,
    verdicts: dict[NodeName, Verdict] | None = None,
    spec: SpaceSpec | None = None,
    only: NodeName | None = None,
) -> DecisionRecord:
    base = {A: DEAD, B: alive(B), C: alive(C), D: alive(D)}
    return elect(
        space=ORDERS,
        spec=spec or SpaceSpec(max_lag_on_failover=100),
        placement=PLACEMENT,
        verdicts={**base, **(verdicts or {})},
        reports={r.node: r for r in reports},
        cause=CAUSE,
        only=only,
    )


def test_election_picks_the_highest_applied_sequence() -> None:
    record = run([report(A, 1000, role="primary"), report(B, 990), report(C, 1000), report(D, 950)])
    assert record.winner == C
    assert record.winner_sequence == 1000
    assert record.new_epoch == 4
    assert record.old_epoch == 3
    assert record.old_primary == A
    assert record.old_primary_last_sequence == 1000
    assert record.entries_possibly_lost == 0
    assert [(c.node, c.applied_sequence, c.lag_entries) for c in record.candidates] == [
        (C, 1000, 0),
        (B, 990, 10),
        (D, 950, 50),
    ]
    assert record.exclusions == ()
    assert record.summary == (
        "promote node-c to primary of space orders at epoch 4 (highest applied sequence 1000);"
        " 0 entries possibly lost"
    )


def test_election_breaks_ties_by_lowest_node_name() -> None:
    record = run([report(A, 50, role="primary"), report(D, 40), report(C, 40), report(B, 10)])
    assert record.winner == C
    assert record.reason == "highest applied sequence 40, tied with node-d; lowest node name wins"
    assert record.entries_possibly_lost == 10


def test_election_excludes_replicas_too_far_behind() -> None:
    record = run([report(A, 1000, role="primary"), report(B, 899), report(C, 900), report(D, 10)])
    assert record.winner == C
    assert [(e.node, e.reason) for e in record.exclusions] == [
        (B, "101 entries behind (maxLagOnFailover 100)"),
        (D, "990 entries behind (maxLagOnFailover 100)"),
    ]
    assert record.summary.endswith(
        "; 100 entries possibly lost; excluded node-b (101 entries behind (maxLagOnFailover 100)),"
        " node-d (990 entries behind (maxLagOnFailover 100))"
    )


def test_election_promotes_a_lagging_replica_when_allowed() -> None:
    spec = SpaceSpec(max_lag_on_failover=100, allow_lagging_failover=True)
    record = run([report(A, 1000, role="primary"), report(B, 10)], spec=spec)
    assert record.winner == B
    assert record.entries_possibly_lost == 990


def test_election_excludes_dead_unreachable_silent_and_stale_replicas() -> None:
    suspect = Verdict(node=C, state="Suspect", reason="lease expired 0.4 s ago; probing")
    record = run(
        [report(A, 100, role="primary"), report(C, 100), report(D, 100, epoch=2)],
        verdicts={C: suspect},
    )
    assert record.winner is None
    assert [(e.node, e.reason) for e in record.exclusions] == [
        (B, "no progress reported"),
        (C, "suspect: lease expired 0.4 s ago; probing"),
        (D, "still at epoch 2 (space is at epoch 3); its log may have diverged"),
    ]
    assert record.entries_possibly_lost is None
    assert record.reason == (
        "no eligible replica (node-b no progress reported; node-c suspect: lease expired 0.4 s"
        " ago; probing; node-d still at epoch 2 (space is at epoch 3); its log may have"
        " diverged); bring node-a back"
    )
    assert record.summary == f"cannot promote a replica of space orders: {record.reason}"


def test_election_without_winner_suggests_allowing_lagging_failover() -> None:
    record = run([report(A, 5000, role="primary"), report(B, 1), report(C, 2), report(D, 3)])
    assert record.winner is None
    assert record.reason.endswith(
        "; bring node-a back, or set spec.allowLaggingFailover to promote a lagging replica"
    )


def test_election_excludes_a_replica_without_a_verdict() -> None:
    record = elect(
        space=ORDERS,
        spec=SpaceSpec(),
        placement=Placement(primary=A, replicas=(B,), epoch=Epoch(1)),
        verdicts={A: DEAD},
        reports={B: report(B, 1, epoch=1)},
        cause=CAUSE,
    )
    assert record.exclusions[0].reason == "no liveness verdict (node unknown to the control plane)"


def test_election_with_no_replicas_says_so() -> None:
    record = elect(
        space=ORDERS,
        spec=SpaceSpec(replicas=0),
        placement=Placement(primary=A, replicas=(), epoch=Epoch(1)),
        verdicts={A: DEAD},
        reports={},
        cause=CAUSE,
    )
    assert record.winner is None
    assert record.reason == "the space has no replicas (spec.replicas is 0)"


def test_election_lost_entries_unknown_when_the_old_primary_never_reported() -> None:
    record = run([report(B, 10), report(C, 7)])
    assert record.winner == B
    assert record.old_primary_last_sequence is None
    assert record.entries_possibly_lost is None
    assert "an unknown number of entries possibly lost" in record.summary


def test_election_counts_loss_from_a_replica_that_saw_more_than_the_primary_reported() -> None:
    # The primary's report is older than a (now dead) replica's: that replica proves entries
    # up to 120 existed, and the winner lacks 20 of them.
    dead_b = Verdict(node=B, state="Dead", reason="lease expired 3.0 s ago, probe failed")
    record = run(
        [report(A, 100, role="primary"), report(B, 120), report(C, 100)],
        verdicts={B: dead_b},
    )
    assert (record.winner, record.entries_possibly_lost) == (C, 20)
    assert record.old_primary_last_sequence == 100


def test_election_new_epoch_is_above_every_reported_epoch() -> None:
    outsider = report(NodeName("node-z"), 5, epoch=7, role="primary")
    record = run([report(A, 10, role="primary"), report(B, 10), outsider])
    assert record.new_epoch == 8


def test_election_restricted_to_one_target() -> None:
    record = run([report(A, 10, role="primary"), report(B, 10), report(C, 9)], only=C)
    assert record.winner == C
    assert (B, "not the requested target node-c") in [(e.node, e.reason) for e in record.exclusions]


def test_election_record_serialises_to_json_with_camel_case_keys() -> None:
    record = run([report(A, 100, role="primary"), report(B, 99), report(C, 1)])
    data = json.loads(json.dumps(record.to_dict()))
    assert data["winner"] == "node-b"
    assert data["newEpoch"] == 4
    assert data["oldPrimaryLastSequence"] == 100
    assert data["entriesPossiblyLost"] == 1
    assert data["candidates"][0] == {"node": "node-b", "appliedSequence": 99, "lagEntries": 1}
    assert data["candidates"][1] == {"node": "node-c", "appliedSequence": 1, "lagEntries": 99}
    assert data["exclusions"] == [{"node": "node-d", "reason": "no progress reported"}]
    assert set(data) == {
        "space",
        "cause",
        "oldPrimary",
        "oldPrimaryLastSequence",
        "oldEpoch",
        "newEpoch",
        "candidates",
        "exclusions",
        "winner",
        "winnerSequence",
        "entriesPossiblyLost",
        "reason",
        "summary",
    }


states: st.SearchStrategy[VerdictState] = st.sampled_from(["Alive", "Alive", "Suspect", "Dead"])


@given(
    old=st.integers(0, 500),
    replicas=st.lists(st.tuples(st.integers(0, 500), states), min_size=3, max_size=3),
    max_lag=st.integers(0, 600),
)
def test_election_winner_is_the_best_eligible_replica(
    old: int, replicas: list[tuple[int, VerdictState]], max_lag: int
) -> None:
    nodes = (B, C, D)
    reports = [report(A, old, role="primary")] + [
        report(n, seq) for n, (seq, _) in zip(nodes, replicas, strict=True)
    ]
    verdicts = {
        n: Verdict(node=n, state=state, reason="r")
        for n, (_, state) in zip(nodes, replicas, strict=True)
    }
    record = run(reports, verdicts=verdicts, spec=SpaceSpec(max_lag_on_failover=max_lag))
    reference = max([old, *(seq for seq, _ in replicas)])
    eligible = [
        (seq, n)
        for n, (seq, state) in zip(nodes, replicas, strict=True)
        if state == "Alive" and reference - seq <= max_lag
    ]
    assert len(record.candidates) + len(record.exclusions) == 3
    if not eligible:
        assert record.winner is None and record.entries_possibly_lost is None
        return
    best_seq = max(seq for seq, _ in eligible)
    assert record.winner == min(n for seq, n in eligible if seq == best_seq)
    assert record.entries_possibly_lost == reference - best_seq >= 0
    assert record.new_epoch == PLACEMENT.epoch + 1


def test_election_excludes_a_dead_replica_with_its_verdict() -> None:
    dead_b = Verdict(node=B, state="Dead", reason="no lease seen, probe failed")
    record = run(
        [report(A, 9, role="primary"), report(B, 9), report(C, 8)], verdicts={dead_b.node: dead_b}
    )
    assert record.winner == C
    assert record.exclusions[0].reason == "dead: no lease seen, probe failed"
