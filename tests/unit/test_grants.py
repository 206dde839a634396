"""Write-lease grants judged by lateness, never by a wall clock (engram_sidecar.grants).

Each grant carries the control plane's monotonic send stamp; the node notes its own monotonic
arrival time. Only differences of `arrived - sent` between grants of one source matter, so the
clocks' origins (and any wall-clock skew) cancel out.
"""

from __future__ import annotations

import random

import pytest

from engram_sidecar.grants import MAX_SAMPLES, WINDOW_NS, GrantClock

MS = 1_000_000
MAX_DELAY = 500 * MS
CP = "control-plane-a"


def clock() -> GrantClock:
    return GrantClock(max_delay_ns=MAX_DELAY)


def test_grants_on_time_grants_are_accepted() -> None:
    g = clock()
    sent, arrived = 10_000 * MS, 90_000 * MS  # unrelated origins: only differences count
    for i in range(200):
        delay = (i * 7919) % (3 * MS)  # a few ms of jitter
        assert g.lateness_ns(CP, sent + i * 1_000 * MS, arrived + i * 1_000 * MS + delay) <= 3 * MS
    assert g.accept(CP, sent + 200_000 * MS, arrived + 200_000 * MS + 2 * MS)


def test_grants_first_grant_of_a_source_is_the_baseline() -> None:
    g = clock()
    assert g.lateness_ns(CP, 5, 10**15) == 0
    assert g.accept(CP, 6, 10**15 + 1)


def test_grants_delayed_beyond_max_delay_is_refused() -> None:
    g = clock()
    assert g.accept(CP, 0, 1 * MS)
    assert g.accept(CP, 1_000 * MS, 1_001 * MS)
    # Sent at 2 s, held in a socket (this process stopped) and read 2 s later than usual.
    assert g.lateness_ns(CP, 2_000 * MS, 4_001 * MS) == 2_000 * MS
    g2 = clock()
    g2.accept(CP, 0, 1 * MS)
    assert not g2.accept(CP, 2_000 * MS, 4_001 * MS)
    # A late grant doesn't move the baseline: the next on-time grant is on time.
    assert g2.accept(CP, 3_000 * MS, 3_001 * MS)
    assert g2.lateness_ns(CP, 4_000 * MS, 4_001 * MS) == 0


def test_grants_max_delay_is_inclusive() -> None:
    g = clock()
    g.accept(CP, 0, 0)
    assert g.accept(CP, 1_000 * MS, 1_000 * MS + MAX_DELAY)
    assert not g.accept(CP, 2_000 * MS, 2_000 * MS + MAX_DELAY + 1)


def test_grants_a_faster_delivery_lowers_the_baseline() -> None:
    g = clock()
    g.accept(CP, 0, 400 * MS)  # the first grant was itself 400 ms slow
    assert g.lateness_ns(CP, 1_000 * MS, 1_001 * MS) == 0  # faster: the new minimum
    # Judged against the fastest now: 400 ms + 200 ms slower than that is over 500 ms.
    assert not g.accept(CP, 2_000 * MS, 2_601 * MS)


def test_grants_new_source_resets_the_baseline() -> None:
    g = clock()
    g.accept(CP, 0, 0)
    assert g.accept(CP, 1_000 * MS, 1_000 * MS)
    # A new control-plane process: another monotonic clock, whose origin is an hour off. Against
    # the old baseline every grant would look an hour late; against its own it is on time.
    hour = 3_600_000 * MS
    assert g.lateness_ns("control-plane-b", 5 * MS, 2_000 * MS + hour) == 0
    assert g.accept("control-plane-b", 1_005 * MS, 3_000 * MS + hour)
    assert not g.accept("control-plane-b", 2_005 * MS, 4_000 * MS + hour + MAX_DELAY + 1)
    # Back to the first source (its process restarted under the old id, say): a fresh baseline.
    assert g.accept(CP, 0, 10 * hour)


@pytest.mark.parametrize(
    "origin",
    [0, 10**18, -(10**18), 2**62, -(2**62) + 12_345],
    ids=["zero", "far-ahead", "far-behind", "huge", "negative-odd"],
)
def test_grants_clock_origin_does_not_matter(origin: int) -> None:
    """The same deliveries, with the node's clock offset by `origin`: the same verdicts."""
    rng = random.Random(7)
    deliveries = [
        (i * 250 * MS, i * 250 * MS + rng.choice([1, 2, 5, 40, 300, 499, 501, 800, 3_000]) * MS)
        for i in range(300)
    ]
    plain, shifted = clock(), clock()
    verdicts = [plain.accept(CP, s, a) for s, a in deliveries]
    assert verdicts == [shifted.accept(CP, s, a + origin) for s, a in deliveries]
    plain, shifted = clock(), clock()  # fresh: both clocks' origins move together below
    lateness = [plain.lateness_ns(CP, s, a) for s, a in deliveries]
    assert lateness == [shifted.lateness_ns(CP, s - origin, a) for s, a in deliveries]
    assert True in verdicts and False in verdicts


def test_grants_never_read_a_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Verdicts come from the two stamps alone: a stepped or skewed wall clock (or any clock this
    # module might read) can't change them.
    def no_clock() -> float:
        raise AssertionError("GrantClock read a clock")

    for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
        monkeypatch.setattr(f"time.{name}", no_clock)
    g = clock()
    assert g.accept(CP, 0, 50 * MS)
    assert g.accept(CP, 1_000 * MS, 1_050 * MS)
    assert not g.accept(CP, 2_000 * MS, 2_050 * MS + MAX_DELAY + 1)


def test_grants_window_expires_old_minimum() -> None:
    """The baseline is the minimum over grants *sent* within WINDOW_NS of the newest: once the
    fast one is older than that, a steadily slower delivery becomes the baseline (a drifting
    clock can't make every grant late forever)."""
    g = clock()
    slow = MAX_DELAY + 100 * MS
    assert g.accept(CP, 0, 0)
    step = 1_000 * MS
    n = WINDOW_NS // step
    for i in range(1, n + 1):
        assert not g.accept(CP, i * step, i * step + slow), i
    # The fast grant (sent at 0) leaves the window with this one: the slow offset is the base.
    assert g.accept(CP, (n + 1) * step, (n + 1) * step + slow)
    assert g.lateness_ns(CP, (n + 2) * step, (n + 2) * step + slow) == 0


def test_grants_a_burst_of_queued_grants_cannot_flush_the_baseline() -> None:
    """One on-time grant, then 100 grants sent 100 ms apart that all sat in a queue while the
    node was stopped and arrive together at 20 s: every one is late, none is accepted (a
    count-based window let the 64th through)."""
    g = clock()
    assert g.accept(CP, 0, 1 * MS)
    for i in range(1, 101):
        assert not g.accept(CP, i * 100 * MS, 20_000 * MS), i


def test_grants_slow_drift_within_window_stays_accepted() -> None:
    # The two monotonic clocks run at slightly different rates (50 ppm): the offset creeps by
    # 50 µs a second. With grants every second the window (30 s) holds the drift far below
    # max_delay, however long it runs.
    g = clock()
    for i in range(5_000):
        sent = i * 1_000 * MS
        assert g.accept(CP, sent, sent + i * 50_000), i


def test_grants_window_is_bounded() -> None:
    g = clock()
    for i in range(3 * MAX_SAMPLES):
        g.accept(CP, i, i)
    assert len(g._samples) <= MAX_SAMPLES
