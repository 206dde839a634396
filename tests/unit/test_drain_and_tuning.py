"""Issue 15, items 1, 3, 7 and 11 at unit level: draining in reconcile and election, the spec's
tuning in the assignment and status, replica states (the breaker counts only while
disconnected), and the named /healthz probe. Integration: tests/integration/test_drain.py,
test_demo_states.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tests.unit.test_reconcile import (
    DEAD_REASON,
    NODES,
    NOW,
    PLACEMENT,
    A,
    B,
    C,
    failover,
    report,
    tick,
    verdict,
    world,
)

from engram_contract.assignment import (
    Assignment,
    AssignmentError,
    Member,
    Tuning,
    assignment_document,
    assignment_from_status,
    parse_duration,
)
from engram_contract.client import SidecarClient
from engram_contract.ids import NodeName
from engram_operator.kube.convert import parse_spec
from engram_operator.kube.nodes import parse_lease
from engram_operator.model import MemberReport, SpaceSpec, member_reports
from engram_operator.reconcile import (
    BeginSwitchover,
    ClearSwitchover,
    ExecuteHandOver,
    PushAssignment,
    SwitchoverProgress,
    Wait,
)
from engram_operator.status import build_status
from engram_sidecar.space.lag import Lag, LagThresholds, classify

TH = LagThresholds(1.0, 5.0, 30.0)

# ---- item 11: classify ------------------------------------------------------------------------


def test_a_connected_caught_up_replica_is_healthy_even_with_the_breaker_open() -> None:
    # The breaker opened while the replica was down; it is back, connected and caught up.
    state = classify(Lag(0, 0.0), thresholds=TH, breaker_open=True, unreachable_for=None)
    assert state == "Healthy"


def test_the_breaker_counts_while_disconnected() -> None:
    assert classify(Lag(5, 0.1), thresholds=TH, breaker_open=True, unreachable_for=2.0) == (
        "Degraded"
    )
    assert classify(Lag(5, 0.1), thresholds=TH, breaker_open=False, unreachable_for=2.0) == (
        "Healthy"
    )
    assert classify(Lag(5, 0.1), thresholds=TH, breaker_open=True, unreachable_for=31.0) == (
        "Failed"
    )


def test_lag_past_the_critical_threshold_is_degraded_even_when_connected() -> None:
    assert classify(Lag(9, 6.0), thresholds=TH, breaker_open=False, unreachable_for=None) == (
        "Degraded"
    )
    assert classify(Lag(9, 2.0), thresholds=TH, breaker_open=True, unreachable_for=None) == (
        "Lagging"
    )


# ---- item 3: tuning in the assignment -----------------------------------------------------------

P = Member(NodeName("n0"), "127.0.0.1:7000", "127.0.0.1:8000")
R = Member(NodeName("n1"), "127.0.0.1:7001", "127.0.0.1:8001")


def test_tuning_round_trips_through_the_assignment_document() -> None:
    t = Tuning(
        batch_max_entries=7,
        batch_max_delay=0.002,
        lag_warning_seconds=2.0,
        lag_critical_seconds=9.0,
        catchup_threshold=50,
    )
    doc = assignment_document(3, [P, R], tuning=t)
    assert doc["batch"] == {"maxEntries": 7, "maxDelaySeconds": 0.002}
    assert doc["lag"] == {"warningSeconds": 2.0, "criticalSeconds": 9.0}
    assert doc["catchupThreshold"] == 50
    assert Assignment.from_json(doc).tuning == t
    # Without tuning the document is what it always was: the nodes' own settings apply.
    plain = assignment_document(3, [P, R])
    assert not {"batch", "lag", "catchupThreshold"} & set(plain)
    assert Assignment.from_json(plain).tuning == Tuning()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"batch": {"maxEntries": 0}}, "batch.maxEntries must be an integer 1..10000"),
        ({"batch": {"maxDelaySeconds": 2}}, "batch.maxDelaySeconds must be a number"),
        ({"batch": {"linger": 1}}, "unknown field(s) in batch: linger"),
        ({"lag": {"warningSeconds": 5, "criticalSeconds": 1}}, "criticalSeconds must be at least"),
        ({"lag": []}, "lag must be an object"),
        ({"catchupThreshold": True}, "catchupThreshold must be an integer"),
    ],
)
def test_bad_tuning_is_refused_with_the_field_named(extra: dict[str, object], words: str) -> None:
    doc = {**assignment_document(1, [P]), **extra}
    with pytest.raises(AssignmentError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Assignment.from_json(doc)


def test_spec_fields_reach_the_operator_spec_and_the_sidecar_read_back() -> None:
    raw = {
        "batch": {"maxEntries": 250, "maxDelay": "500us"},
        "lag": {"warningSeconds": 3, "criticalSeconds": 30},
        "catchupThreshold": 123,
    }
    spec = parse_spec(raw).spec
    assert spec is not None
    want = Tuning(
        batch_max_entries=250,
        batch_max_delay=parse_duration("500us"),
        lag_warning_seconds=3.0,
        lag_critical_seconds=30.0,
        catchup_threshold=123,
    )
    assert spec.tuning == want
    # A sidecar rebuilding its roles from the MemorySpace builds the same document.
    status = {"primary": "n0", "replicas": ["n1"], "epoch": 2}
    addresses = {m.node: {"address": m.address, "http": m.http} for m in (P, R)}
    doc = assignment_from_status(status, raw, addresses)
    assert doc is not None and Assignment.from_json(doc).tuning == want
    assert parse_spec({"batch": {"maxDelay": "10 ms"}}).problem is not None
    assert "spec.lag.criticalSeconds" in str(
        parse_spec({"lag": {"warningSeconds": 9, "criticalSeconds": 2}}).problem
    )


def test_status_judges_lag_by_the_spec_thresholds() -> None:
    def status(spec: SpaceSpec) -> tuple[str, str]:
        reports = {
            A: MemberReport(node=A, role="primary", epoch=PLACEMENT.epoch, applied_sequence=100),
            B: MemberReport(node=B, role="replica", epoch=PLACEMENT.epoch, applied_sequence=90,
                            lag_seconds=8.0, state="Lagging"),
            C: MemberReport(node=C, role="replica", epoch=PLACEMENT.epoch, applied_sequence=100),
        }  # fmt: skip
        st = build_status(
            space=NodeName("orders"),  # type: ignore[arg-type]
            spec=spec,
            placement=PLACEMENT,
            verdicts={n.name: verdict(n.name) for n in NODES},
            reports=reports,
            previous_conditions=(),
            now_iso="2026-01-01T00:00:00Z",
        )
        return st.phase, st.message

    assert "past the 5 s critical lag" in status(SpaceSpec())[1]
    relaxed = SpaceSpec(tuning=Tuning(lag_warning_seconds=5.0, lag_critical_seconds=60.0))
    phase, message = status(relaxed)
    assert phase == "Degraded" and "critical" not in message
    assert "is Lagging, 10 entries / 8.0 s behind" in message


def test_a_member_applying_other_tuning_gets_the_assignment_again() -> None:
    spec = SpaceSpec(tuning=Tuning(batch_max_entries=10))
    reports = (
        replace(report(A, 1000, role="primary"), tuning=Tuning(batch_max_entries=10)),
        replace(report(B, 1000), tuning=Tuning()),
        report(C, 1000),  # an older sidecar that reports none: left alone
    )
    d = tick(world(spec=spec, reports=reports))
    (push,) = [a for a in d.actions if isinstance(a, PushAssignment)]
    assert push.nodes == (B,) and "applies other spec settings" in d.sentence


def test_member_reports_read_the_tuning_a_node_applies() -> None:
    view = {"role": "replica", "epoch": 3, "applied_sequence": 5, "tuning": {"catchupThreshold": 9}}
    got = member_reports({B: {"spaces": {"orders": view}}}, "orders")  # type: ignore[arg-type]
    assert got[B].tuning == Tuning(catchup_threshold=9)


# ---- item 1: draining ------------------------------------------------------------------------


def draining(*names: NodeName) -> tuple:  # type: ignore[type-arg]
    return tuple(replace(n, draining=n.name in names) for n in NODES)


def test_a_draining_primary_is_switched_over_to_its_most_advanced_replica() -> None:
    d = tick(world(nodes=draining(A)))  # B holds 1000, C 988
    assert any(isinstance(a, BeginSwitchover) and a.target == B for a in d.actions), d
    (hand,) = [a for a in d.actions if isinstance(a, ExecuteHandOver)]
    assert hand.plan.placement.primary == B and hand.plan.placement.replicas == (A, C)
    assert "node-a is draining" in d.sentence and d.operation == "SwitchingOver"


def test_a_drain_waits_for_the_target_to_catch_up_and_never_picks_a_draining_replica() -> None:
    d = tick(world(nodes=draining(A, B)))  # only C may lead; it is 12 entries behind
    assert [a.target for a in d.actions if isinstance(a, BeginSwitchover)] == [C]
    assert any(isinstance(a, Wait) for a in d.actions) and "12 entries behind" in d.sentence


def test_a_drain_with_nobody_to_take_over_says_so() -> None:
    d = tick(world(nodes=draining(A, B, C)))
    assert isinstance(d.actions[0], Wait) and "no live replica" in d.sentence


def test_a_drain_keeps_its_target_and_drops_one_that_starts_draining() -> None:
    going = SwitchoverProgress(target=C, started_at=NOW - 1)
    d = tick(world(nodes=draining(A), progress=going))
    assert not any(isinstance(a, BeginSwitchover) for a in d.actions)
    d = tick(world(nodes=draining(A, C), progress=going))
    assert isinstance(d.actions[0], ClearSwitchover)


def test_a_switchover_to_a_draining_node_is_refused() -> None:
    d = tick(world(nodes=draining(B), spec=SpaceSpec(target_primary=B)))
    assert "it is draining" in d.sentence


def test_a_failover_never_elects_a_draining_node() -> None:
    dead = {A: verdict(A, "Dead")}
    d = failover(world(nodes=draining(B), states=dead))
    assert DEAD_REASON in d.sentence
    assert f"promoted {C}" in d.sentence, d.sentence


def test_new_placements_avoid_draining_nodes() -> None:
    d = tick(world(placement=None, reports=(), nodes=draining(A, B)))
    (push,) = [a for a in d.actions if isinstance(a, PushAssignment)]
    assert set(push.placement.members) == {C, NodeName("node-d")}, d.sentence


def test_the_operator_reads_draining_from_the_node_lease() -> None:
    lease = {
        "metadata": {
            "name": "engram-node-n0",
            "labels": {"engram.io/node-lease": "true"},
            "annotations": {
                "engram.io/http-address": "10.0.0.1:8080",
                "engram.io/replication-address": "10.0.0.1:7070",
                "engram.io/draining": "true",
            },
        },
        "spec": {"renewTime": "2026-01-01T00:00:00.000000Z"},
    }
    rec = parse_lease(lease, {})
    assert rec is not None and rec.draining
    lease["metadata"]["annotations"]["engram.io/draining"] = "false"  # type: ignore[index]
    rec = parse_lease(lease, {})
    assert rec is not None and not rec.draining


# ---- item 7: the probe checks the name ---------------------------------------------------------


async def test_healthz_and_heartbeat_count_only_the_node_asked_for(tmp_path: Path) -> None:
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": "n1"})

    async def lease(request: web.Request) -> web.Response:
        return web.json_response({"granted": {}, "node": "n1", "spaces": {}})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/lease", lease)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = SidecarClient("t", probe_timeout=1.0)
    try:
        where = f"127.0.0.1:{port}"
        assert await client.healthz(where, expect="n1")
        assert not await client.healthz(where, expect="n0")  # a reused address: not n0
        assert await client.heartbeat(where, {}, sent_mono_ns=1, expect="n1")
        with pytest.raises(Exception, match="answered by node 'n1', not 'n0'"):
            await client.heartbeat(where, {}, sent_mono_ns=1, expect="n0")
    finally:
        await client.close()
        await runner.cleanup()
