"""Election: the most up-to-date log wins — (epoch of its last entry, sequence) — ties to the lowest
name, every exclusion explained; after a fence round, only members that took the new epoch count,
and under `quorum` only a majority of them can promote."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.election import DecisionRecord, FenceAnswer, FenceRound, elect, majority
from engram_operator.model import MemberReport, Placement, SpaceSpec
from engram_operator.verdict import Verdict, VerdictState

ORDERS = SpaceId("orders")
A, B, C, D = (NodeName(n) for n in ("node-a", "node-b", "node-c", "node-d"))
PLACEMENT = Placement(primary=A, replicas=(B, C, D), epoch=Epoch(3))
CAUSE = "node-a dead: lease expired 2.1 s ago, probe failed"
DEAD = Verdict(node=A, state="Dead", reason="lease expired 2.1 s ago, probe failed", since=1.0)


def alive(node: NodeName) -> Verdict:
    return Verdict(node=node, state="Alive", reason="lease renewed 0.1 s ago")


def report(
    node: NodeName,
    seq: int,
    *,
    epoch: int = 3,
    role: str = "replica",
    last_epoch: int = 0,
    accepted: int | None = None,
) -> MemberReport:
    return MemberReport(
        node=node,
        role="primary" if role == "primary" else "replica",
        epoch=Epoch(epoch),
        applied_sequence=Sequence(seq),
        last_epoch=Epoch(last_epoch),
        accepted_epoch=None if accepted is None else Epoch(accepted),
    )


def answered(node: NodeName, seq: int, last_epoch: int = 3) -> FenceAnswer:
    return FenceAnswer(
        node=node, ok=True, last_epoch=Epoch(last_epoch), last_sequence=Sequence(seq)
    )


def silent(node: NodeName, error: str = "no answer within 0.5 s") -> FenceAnswer:
    return FenceAnswer(node=node, ok=False, error=error)


def fence_round(*answers: FenceAnswer, quorum: bool = False, epoch: int = 4) -> FenceRound:
    return FenceRound(
        epoch=Epoch(epoch), answers=answers, needed=majority(PLACEMENT) if quorum else 0
    )


def run(
    reports: list[MemberReport],
    *,
    verdicts: dict[NodeName, Verdict] | None = None,
    spec: SpaceSpec | None = None,
    only: NodeName | None = None,
    fence: FenceRound | None = None,
    placement: Placement = PLACEMENT,
) -> DecisionRecord:
    base = {A: DEAD, B: alive(B), C: alive(C), D: alive(D)}
    return elect(
        space=ORDERS,
        spec=spec or SpaceSpec(max_lag_on_failover=100),
        placement=placement,
        verdicts={**base, **(verdicts or {})},
        reports={r.node: r for r in reports},
        cause=CAUSE,
        only=only,
        new_epoch=None if fence is None else fence.epoch,
        fence=fence,
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


def test_election_excludes_dead_unreachable_and_silent_replicas() -> None:
    suspect = Verdict(node=C, state="Suspect", reason="lease expired 0.4 s ago; probing")
    dead_d = Verdict(node=D, state="Dead", reason="no lease seen, probe failed")
    record = run(
        [report(A, 100, role="primary"), report(C, 100), report(D, 100)],
        verdicts={C: suspect, D: dead_d},
    )
    assert record.winner is None
    assert [(e.node, e.reason) for e in record.exclusions] == [
        (B, "no progress reported"),
        (C, "suspect: lease expired 0.4 s ago; probing"),
        (D, "dead: no lease seen, probe failed"),
    ]
    assert record.entries_possibly_lost is None
    assert record.reason == (
        "no eligible replica (node-b no progress reported; node-c suspect: lease expired 0.4 s"
        " ago; probing; node-d dead: no lease seen, probe failed); bring node-a back"
    )
    assert record.summary == f"cannot promote a replica of space orders: {record.reason}"


def test_election_ranks_by_the_epoch_of_the_last_entry_before_the_sequence() -> None:
    # node-b was the epoch-2 primary, deposed with an untruncated tail of epoch-2 entries up to
    # 120 that nobody else has; node-c holds epoch-3 entries up to 100 (the space's current
    # epoch, quorum-acknowledged perhaps). By sequence alone node-b would win and cut them.
    record = run(
        [
            report(A, 100, role="primary", last_epoch=3),
            report(B, 120, epoch=2, last_epoch=2),
            report(C, 100, last_epoch=3),
            report(D, 95, last_epoch=3),
        ]
    )
    assert record.winner == C
    assert record.winner_last_epoch == 3
    assert [(c.node, c.last_epoch, c.applied_sequence) for c in record.candidates] == [
        (C, 3, 100),
        (D, 3, 95),
        (B, 2, 120),
    ]
    assert record.reason == "highest last entry (epoch 3, sequence 100)"
    # node-b's tail is not data of the current epoch: nothing counted as lost for it.
    assert record.entries_possibly_lost == 0


def test_election_a_deposed_primary_tail_loses_to_newer_entries_after_the_fence() -> None:
    # The stale reports say otherwise (node-c reported before it received the epoch-2 entries);
    # the fence answers, taken after both stopped accepting the old epoch, decide.
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(2))
    reports = [
        report(A, 100, epoch=2, role="primary", last_epoch=2),
        report(B, 130, epoch=1, last_epoch=1),
        report(C, 60, epoch=2, last_epoch=1),
    ]
    fence = FenceRound(
        epoch=Epoch(3),
        answers=(silent(A), answered(B, 130, last_epoch=1), answered(C, 100, last_epoch=2)),
        needed=2,
    )
    record = run(reports, fence=fence, placement=placement, spec=SpaceSpec(ack_policy="quorum"))
    assert record.winner == C
    assert (record.winner_sequence, record.winner_last_epoch) == (100, 2)
    assert record.new_epoch == 3


def test_election_a_replica_at_an_older_epoch_is_eligible_when_it_ranks_first() -> None:
    # node-d never got the epoch-3 assignment, yet its log is the most up to date: the epoch-3
    # primary wrote nothing new, so its epoch-2 entries are everybody's history.
    record = run(
        [
            report(A, 100, role="primary", last_epoch=2),
            report(B, 90, last_epoch=2),
            report(D, 100, epoch=2, last_epoch=2),
        ]
    )
    assert record.winner == D


def test_election_after_a_fence_counts_only_members_that_answered_and_their_answers() -> None:
    reports = [report(A, 100, role="primary"), report(B, 90), report(C, 99), report(D, 95)]
    fence = fence_round(
        silent(A), answered(B, 100), silent(C, "HTTP 507 storage_error"), answered(D, 97)
    )
    record = run(reports, fence=fence)
    # node-b caught up between its report and the fence; node-c answered nothing usable.
    assert record.winner == B
    assert record.winner_sequence == 100
    assert (C, "did not answer the fence (HTTP 507 storage_error)") in [
        (e.node, e.reason) for e in record.exclusions
    ]
    assert record.fence == fence
    assert record.to_dict()["fence"] == {
        "epoch": 4,
        "answered": 2,
        "quorumNeeds": None,
        "members": [
            {
                "node": A,
                "answered": False,
                "lastEpoch": None,
                "lastSequence": None,
                "error": "no answer within 0.5 s",
            },
            {"node": B, "answered": True, "lastEpoch": 3, "lastSequence": 100, "error": ""},
            {
                "node": C,
                "answered": False,
                "lastEpoch": None,
                "lastSequence": None,
                "error": "HTTP 507 storage_error",
            },
            {"node": D, "answered": True, "lastEpoch": 3, "lastSequence": 97, "error": ""},
        ],
    }


def test_election_under_quorum_a_minority_of_answers_promotes_nobody() -> None:
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
    reports = [report(A, 100, role="primary"), report(B, 100), report(C, 100)]
    fence = FenceRound(epoch=Epoch(4), answers=(silent(A), silent(B), answered(C, 100)), needed=2)
    record = run(reports, fence=fence, placement=placement, spec=SpaceSpec(ack_policy="quorum"))
    assert record.winner is None
    assert record.entries_possibly_lost is None
    assert record.reason == (
        "only 1 of 3 members reachable; quorum needs 2 (answered the fence at epoch 4: node-c;"
        " node-a no answer within 0.5 s; node-b no answer within 0.5 s)"
    )
    assert record.summary == f"cannot promote a replica of space orders: {record.reason}"
    # The same answers under `async` promote the one that answered (availability).
    unquorate = FenceRound(epoch=Epoch(4), answers=fence.answers, needed=0)
    spec = SpaceSpec(ack_policy="async")
    assert run(reports, fence=unquorate, placement=placement, spec=spec).winner == C


def test_election_under_one_every_replica_must_answer() -> None:
    """`one` acks after the primary and *some* replica: which one is unknown, so a promotion
    that didn't hear from every replica may pick the one that lacks the last writes."""
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
    reports = [report(A, 100, role="primary"), report(B, 100), report(C, 90)]
    spec = SpaceSpec(ack_policy="one")
    partial = FenceRound(
        epoch=Epoch(4),
        answers=(silent(A), silent(B), answered(C, 90)),
        needed=0,
        every_replica=True,
    )
    record = run(reports, fence=partial, placement=placement, spec=spec)
    assert record.winner is None
    assert record.reason.startswith("ackPolicy one: every replica must answer the fence")
    assert "node-b no answer within 0.5 s" in record.reason
    full = FenceRound(
        epoch=Epoch(4),
        answers=(silent(A), answered(B, 100), answered(C, 90)),
        needed=0,
        every_replica=True,
    )
    assert run(reports, fence=full, placement=placement, spec=spec).winner == B


def test_election_under_one_an_ineligible_replica_holding_more_blocks() -> None:
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
    reports = [report(A, 100, role="primary"), report(B, 100), report(C, 90)]
    dead_b = Verdict(node=B, state="Dead", reason="lease expired", since=1.0)
    fence = FenceRound(
        epoch=Epoch(4),
        answers=(silent(A), answered(B, 100), answered(C, 90)),
        needed=0,
        every_replica=True,
    )
    record = run(
        reports,
        fence=fence,
        placement=placement,
        spec=SpaceSpec(ack_policy="one"),
        verdicts={B: dead_b},
    )
    assert record.winner is None
    assert "node-b hold(s) more than the most up-to-date eligible replica node-c" in record.reason


def test_election_under_quorum_a_majority_of_answers_promotes_the_best() -> None:
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
    reports = [report(A, 100, role="primary"), report(B, 98), report(C, 100)]
    fence = FenceRound(
        epoch=Epoch(4), answers=(silent(A), answered(B, 100), answered(C, 99)), needed=2
    )
    record = run(reports, fence=fence, placement=placement, spec=SpaceSpec(ack_policy="quorum"))
    assert record.winner == B
    assert record.to_dict()["fence"]["quorumNeeds"] == 2  # type: ignore[index]


def test_election_under_quorum_the_winner_must_be_as_up_to_date_as_a_majority() -> None:
    # The old primary answered the fence (it is cut off from our liveness checks, not from the
    # fence) and holds 100; node-c, which may hold 100 too (acknowledged by a and c), is silent.
    # node-b at 95 is the only candidate: promoting it could lose acknowledged writes.
    placement = Placement(primary=A, replicas=(B, C), epoch=Epoch(3))
    reports = [report(A, 100, role="primary"), report(B, 95), report(C, 100)]
    fence = FenceRound(
        epoch=Epoch(4), answers=(answered(A, 100), answered(B, 95), silent(C)), needed=2
    )
    record = run(reports, fence=fence, placement=placement, spec=SpaceSpec(ack_policy="quorum"))
    assert record.winner is None
    assert record.reason == (
        "the most up-to-date eligible replica, node-b (epoch 3, sequence 95), is behind node-a"
        " (epoch 3, sequence 100); only 1 of 3 members hold no more than it and quorum needs 2,"
        " so it may lack acknowledged writes; bring node-a back or make a member that is ahead"
        " reachable"
    )
    # With node-c answering at 95 too, a majority (b, c) holds no more than node-b: what only
    # node-a had was never acknowledged by a majority.
    fence = FenceRound(
        epoch=Epoch(4), answers=(answered(A, 100), answered(B, 95), answered(C, 95)), needed=2
    )
    record = run(reports, fence=fence, placement=placement, spec=SpaceSpec(ack_policy="quorum"))
    assert record.winner == B
    assert record.entries_possibly_lost == 5


def test_election_new_epoch_is_above_every_accepted_epoch() -> None:
    record = run([report(A, 10, role="primary"), report(B, 10, accepted=6)])
    assert record.new_epoch == 7


def test_majority_counts_the_primary() -> None:
    assert majority(Placement(primary=A, replicas=(), epoch=Epoch(1))) == 1
    assert majority(Placement(primary=A, replicas=(B,), epoch=Epoch(1))) == 2
    assert majority(Placement(primary=A, replicas=(B, C), epoch=Epoch(1))) == 2
    assert majority(PLACEMENT) == 3


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
    assert data["candidates"][0] == {
        "node": "node-b",
        "appliedSequence": 99,
        "lastEpoch": 0,
        "lagEntries": 1,
    }
    assert data["candidates"][1] == {
        "node": "node-c",
        "appliedSequence": 1,
        "lastEpoch": 0,
        "lagEntries": 99,
    }
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
        "winnerLastEpoch",
        "entriesPossiblyLost",
        "fence",
        "reason",
        "summary",
    }
    assert data["fence"] is None


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


positions = st.tuples(st.integers(1, 3), st.integers(0, 50))


@given(
    members=st.lists(st.one_of(st.none(), positions), min_size=4, max_size=4),
    quorum=st.booleans(),
)
def test_election_after_a_fence_picks_the_best_answer_and_respects_quorum(
    members: list[tuple[int, int] | None], quorum: bool
) -> None:
    # None: the member did not answer the fence. Every replica is Alive; lag is allowed.
    answers = tuple(
        silent(n) if pos is None else answered(n, pos[1], last_epoch=pos[0])
        for n, pos in zip((A, B, C, D), members, strict=True)
    )
    fence = fence_round(*answers, quorum=quorum)
    spec = SpaceSpec(ack_policy="quorum" if quorum else "async", allow_lagging_failover=True)
    record = run([report(A, 0, role="primary")], fence=fence, spec=spec)
    voters = [a for a in answers if a.ok]
    eligible = [a for a in voters if a.node != A]
    if record.winner is None:
        best = max((a.log_position for a in eligible), default=None)
        assert (
            best is None
            or (quorum and len(voters) < 3)
            or (quorum and sum(a.log_position <= best for a in voters) < 3)
        )
        return
    win = next(a for a in answers if a.node == record.winner)
    assert win.ok and win.node != A
    assert all(win.log_position >= a.log_position for a in eligible)
    assert win.node == min(a.node for a in eligible if a.log_position == win.log_position)
    if quorum:
        assert len(voters) >= 3
        assert sum(a.log_position <= win.log_position for a in voters) >= 3
