"""Failure verdicts: two signals for Dead, none from the control plane's own store trouble."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engram_contract.ids import NodeName
from engram_operator.verdict import (
    DEFAULT_TIMING,
    LeaseObservation,
    ProbeResult,
    StoreHealth,
    Timing,
    Verdict,
    judge,
    judge_all,
)

A = NodeName("node-a")
NOW = 100.0
HEALTHY_STORE = StoreHealth(last_read_ok_at=NOW)


def verdict(
    renewed_at: float | None,
    probe: ProbeResult | None = None,
    *,
    store: StoreHealth = HEALTHY_STORE,
    now: float = NOW,
) -> Verdict:
    lease = LeaseObservation(node=A, renewed_at=renewed_at, duration=2.0, probe=probe)
    return judge(lease, now=now, store=store)


def test_verdict_alive_while_lease_is_fresh() -> None:
    v = verdict(NOW - 0.3)
    assert (v.state, v.reason, v.since, v.probe_due) == (
        "Alive",
        "lease renewed 0.3 s ago",
        None,
        False,
    )


def test_verdict_suspect_when_lease_expired_and_not_probed() -> None:
    v = verdict(NOW - 3.2)
    assert (v.state, v.reason) == ("Suspect", "lease expired 1.2 s ago; probing")
    assert v.since == NOW - 1.2
    assert v.probe_due


def test_verdict_suspect_when_the_failed_probe_predates_the_expiry() -> None:
    # The probe failed *before* the lease expired: it says nothing about after. Probe again.
    v = verdict(NOW - 3.0, ProbeResult(ok=False, started_at=NOW - 1.5))
    assert v.state == "Suspect"
    assert v.probe_due


def test_verdict_ignores_a_successful_probe_older_than_the_renewal() -> None:
    v = verdict(NOW - 3.0, ProbeResult(ok=True, started_at=NOW - 9.0))
    assert v.state == "Suspect"
    assert v.probe_due, "a probe older than the renewal is no news"


def test_verdict_dead_needs_expiry_and_a_later_failed_probe() -> None:
    v = verdict(NOW - 4.1, ProbeResult(ok=False, started_at=NOW - 1.0))
    assert (v.state, v.reason) == ("Dead", "lease expired 2.1 s ago, probe failed")
    assert v.since == NOW - 2.1
    assert not v.probe_due


def test_verdict_dead_with_a_probe_sent_exactly_at_expiry() -> None:
    assert verdict(NOW - 4.0, ProbeResult(ok=False, started_at=NOW - 2.0)).state == "Dead"


def test_verdict_failed_probe_alone_never_kills_a_node_with_a_fresh_lease() -> None:
    v = verdict(NOW - 0.5, ProbeResult(ok=False, started_at=NOW - 0.1))
    assert v.state == "Alive"


def test_verdict_successful_probe_clears_suspicion() -> None:
    v = verdict(NOW - 3.0, ProbeResult(ok=True, started_at=NOW - 0.4))
    assert (v.state, v.reason) == ("Alive", "probe ok 0.4 s ago (lease expired 1.0 s ago)")


def test_verdict_successful_probe_counts_as_a_renewal_that_expires_too() -> None:
    # Probe ok 2.5 s ago, lease silent since: suspicion returns one lease duration later.
    v = verdict(NOW - 10.0, ProbeResult(ok=True, started_at=NOW - 2.5))
    assert (v.state, v.reason, v.probe_due) == ("Suspect", "lease expired 0.5 s ago; probing", True)


def test_verdict_no_lease_seen_is_suspect_until_a_probe_fails() -> None:
    assert (verdict(None).state, verdict(None).reason) == ("Suspect", "no lease seen; probing")
    dead = verdict(None, ProbeResult(ok=False, started_at=NOW - 0.1))
    assert (dead.state, dead.reason) == ("Dead", "no lease seen, probe failed")
    alive = verdict(None, ProbeResult(ok=True, started_at=NOW - 0.1))
    assert (alive.state, alive.reason) == ("Alive", "probe ok 0.1 s ago (no lease seen)")


def test_verdict_probe_ok_with_fresh_lease_mentions_both() -> None:
    v = verdict(NOW - 0.5, ProbeResult(ok=True, started_at=NOW - 0.2))
    assert v.reason == "probe ok 0.2 s ago (lease renewed 0.5 s ago)"


def test_verdict_unknown_during_store_errors_even_if_everything_looks_dead() -> None:
    store = StoreHealth(last_read_ok_at=NOW, last_error_at=NOW - 0.3)
    v = verdict(NOW - 30.0, ProbeResult(ok=False, started_at=NOW - 1.0), store=store)
    assert (v.state, v.reason) == (
        "Unknown",
        "control plane cannot read leases (store error 0.3 s ago); holding",
    )


def test_verdict_holds_for_one_lease_duration_after_the_last_store_error() -> None:
    lease_silent = NOW - 30.0
    failed = ProbeResult(ok=False, started_at=NOW - 0.5)
    just_after = StoreHealth(last_read_ok_at=NOW, last_error_at=NOW - 1.9)
    assert verdict(lease_silent, failed, store=just_after).state == "Unknown"
    later = StoreHealth(last_read_ok_at=NOW, last_error_at=NOW - 2.0)
    assert verdict(lease_silent, failed, store=later).state == "Dead"


def test_verdict_unknown_when_the_store_has_not_been_read_lately() -> None:
    stale = StoreHealth(last_read_ok_at=NOW - 1.5)
    v = verdict(NOW - 9.0, store=stale)
    assert (v.state, v.reason) == (
        "Unknown",
        "control plane cannot read leases (last successful read 1.5 s ago); holding",
    )
    never = verdict(NOW - 9.0, store=StoreHealth(last_read_ok_at=None))
    assert never.reason == "control plane cannot read leases (no successful read yet); holding"


def test_verdict_judges_lease_age_as_of_the_last_read() -> None:
    # Renewed 1.8 s before our last read, read 0.5 s ago: expired by the clock, not by what
    # we could have seen. A renewal may be sitting unread in the store.
    store = StoreHealth(last_read_ok_at=NOW - 0.5)
    assert verdict(NOW - 2.3, store=store).state == "Alive"


def test_verdict_judge_all_keys_by_node() -> None:
    leases = [
        LeaseObservation(node=NodeName(f"node-{i}"), renewed_at=NOW - i, duration=2.0)
        for i in range(4)
    ]
    verdicts = judge_all(leases, now=NOW, store=HEALTHY_STORE)
    assert {n: v.state for n, v in verdicts.items()} == {
        "node-0": "Alive",
        "node-1": "Alive",
        "node-2": "Alive",
        "node-3": "Suspect",
    }


def test_verdict_timing_budget_fails_over_within_five_seconds() -> None:
    assert DEFAULT_TIMING.worst_case_failover() < 5.0
    assert DEFAULT_TIMING.worst_case_failover() == 3.25
    # Four renewals per lease: three in a row may be lost without suspicion.
    assert DEFAULT_TIMING.lease_duration / DEFAULT_TIMING.renew_interval == 4
    assert Timing(lease_duration=10.0).worst_case_failover() > 5.0


times = st.floats(0.0, 50.0, allow_nan=False)
probes = st.none() | st.builds(ProbeResult, ok=st.booleans(), started_at=times)


@given(renewed=st.none() | times, probe=probes, error=st.none() | times, read=times)
def test_verdict_dead_always_has_two_signals(
    renewed: float | None, probe: ProbeResult | None, error: float | None, read: float
) -> None:
    now = 50.0
    store = StoreHealth(last_read_ok_at=min(read, now), last_error_at=error)
    v = verdict(renewed, probe, store=store, now=now)
    if v.state == "Dead":
        assert probe is not None and not probe.ok
        if renewed is not None:
            assert probe.started_at >= renewed + 2.0
            assert min(read, now) - renewed > 2.0
        assert error is None or now - error >= 2.0
    if v.state == "Alive" and renewed is not None and (probe is None or not probe.ok):
        assert min(read, now) - renewed <= 2.0
