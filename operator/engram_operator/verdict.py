"""Failure verdicts: is a node Alive, Suspect, Dead, or can't the control plane tell (Unknown)?

Owns the rule that turns two independent signals into a verdict, so that no single missed signal
causes a failover:

1. the node's **lease** — each sidecar renews a Lease every `renew_interval`; the control plane
   records *its own* monotonic time when it observes a renewal (never the node's wall clock, so
   clock skew between machines is irrelevant);
2. a **direct probe** — the control plane's own request to the node, sent once the lease expired.

Rules:

* Dead needs both: the lease expired *and* a probe started after the expiry failed.
* A probe that succeeds counts as a renewal: suspicion clears, and the lease clock restarts there.
* A failed probe while the lease is fresh changes nothing (one signal).
* When the control plane itself has trouble with the store (API errors, or no successful read
  lately), every verdict is Unknown: the leases it sees may be stale, and it holds. It keeps
  holding for one lease duration after the last error, because live nodes need that long to
  renew leases they could not write during the same outage.

Timing budget (defaults of `Timing`; failure at t = 0, just after a renewal, worst case):

    lease expires                       t = 2.0  (lease_duration: 4 renewals at 0.5 s, so 3 in a
                                                  row may be missed or late without suspicion)
    control plane notices               t = 2.25 (check_interval 0.25 s)
    probe fails                         t = 2.75 (probe_timeout 0.5 s)
    epoch written to status, promote    t = 3.25 (one API write + one push, budget 0.5 s)
    new primary accepts writes          t < 3.5

The old primary's write lease (design §4) ends at most write_lease + max_grant_delay (1.5 + 0.5 s)
after the control plane last sent it a grant, and `reconcile` promotes nobody before that
(`Settings.lease_wait`): with the last grant sent at t <= 0, by t = 2.01, before the verdict.
Total < 5 s (the seed target) with > 1.5 s to spare.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from engram_contract.ids import NodeName

VerdictState = Literal["Alive", "Suspect", "Dead", "Unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """The failure-detection clock, in seconds. Each default is derived in the module docstring."""

    lease_duration: float = 2.0
    renew_interval: float = 0.5
    check_interval: float = 0.25
    probe_timeout: float = 0.5
    # Time to record the new epoch in status and push the assignment to the winner.
    promote_budget: float = 0.5
    # No successful store read for this long and our lease ages can't be trusted: 2 renewals.
    store_stale_after: float = 1.0

    def worst_case_failover(self) -> float:
        """Seconds from a node's failure to its replacement accepting writes, at worst."""
        return self.lease_duration + self.check_interval + self.probe_timeout + self.promote_budget


DEFAULT_TIMING: Final = Timing()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """The most recent direct probe of a node. `started_at` is when it was sent (monotonic s).

    A probe fails when no answer arrives within the probe timeout. The start time, not the end,
    is what counts: only a probe *sent* after the lease expired says anything about after.
    """

    ok: bool
    started_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseObservation:
    """What the control plane knows about one node's liveness."""

    node: NodeName
    renewed_at: float | None  # when the control plane last saw the lease renewed; None = never
    duration: float
    probe: ProbeResult | None = None  # None = not probed yet


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreHealth:
    """The control plane's own access to the lease store (the Kubernetes API, or local state)."""

    last_read_ok_at: float | None
    last_error_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A node's verdict with a reason a person can read ("lease expired 1.2 s ago; probing").

    `since` is when the lease expired (Suspect, Dead), else None. `probe_due` asks the caller to
    probe the node now: it is Suspect and no probe was sent since the lease expired.
    """

    node: NodeName
    state: VerdictState
    reason: str
    since: float | None = None
    probe_due: bool = False


def judge(
    lease: LeaseObservation, *, now: float, store: StoreHealth, timing: Timing = DEFAULT_TIMING
) -> Verdict:
    """The verdict on one node at `now`."""
    trouble = store_trouble(store, now=now, hold=lease.duration, timing=timing)
    if trouble is not None:
        return Verdict(node=lease.node, state="Unknown", reason=trouble)
    assert store.last_read_ok_at is not None  # store_trouble() checked it
    # Judge lease ages as of our last read: a renewal after it may exist and we just can't see it.
    as_of = min(now, store.last_read_ok_at)
    probe = lease.probe
    renewed = lease.renewed_at
    if probe is not None and probe.ok and (renewed is None or probe.started_at > renewed):
        if as_of - probe.started_at <= lease.duration:
            reason = _probe_ok_reason(lease, probe, as_of)
            return Verdict(node=lease.node, state="Alive", reason=reason)
        renewed = probe.started_at
    if renewed is None:
        return _unseen(lease)
    expired_at = renewed + lease.duration
    if as_of <= expired_at:
        return Verdict(
            node=lease.node, state="Alive", reason=f"lease renewed {_ago(as_of - renewed)}"
        )
    ago = _ago(as_of - expired_at)
    if probe is not None and not probe.ok and probe.started_at >= expired_at:
        return Verdict(
            node=lease.node,
            state="Dead",
            reason=f"lease expired {ago}, probe failed",
            since=expired_at,
        )
    return Verdict(
        node=lease.node,
        state="Suspect",
        reason=f"lease expired {ago}; probing",
        since=expired_at,
        probe_due=probe is None or probe.started_at < expired_at,
    )


def _unseen(lease: LeaseObservation) -> Verdict:
    # Never renewed: the lease counts as expired since forever, so any failed probe confirms it.
    if lease.probe is not None and not lease.probe.ok:
        return Verdict(node=lease.node, state="Dead", reason="no lease seen, probe failed")
    return Verdict(
        node=lease.node,
        state="Suspect",
        reason="no lease seen; probing",
        probe_due=lease.probe is None,
    )


def _probe_ok_reason(lease: LeaseObservation, probe: ProbeResult, as_of: float) -> str:
    probed = f"probe ok {_ago(as_of - probe.started_at)}"
    if lease.renewed_at is None:
        return f"{probed} (no lease seen)"
    expired = as_of - (lease.renewed_at + lease.duration)
    if expired > 0:
        return f"{probed} (lease expired {_ago(expired)})"
    return f"{probed} (lease renewed {_ago(as_of - lease.renewed_at)})"


def store_trouble(
    store: StoreHealth, *, now: float, hold: float, timing: Timing = DEFAULT_TIMING
) -> str | None:
    """Why the control plane can't trust what it reads from the store now, or None if it can."""
    if store.last_error_at is not None and now - store.last_error_at < hold:
        return (
            f"control plane cannot read leases (store error {_ago(now - store.last_error_at)});"
            " holding"
        )
    if store.last_read_ok_at is None:
        return "control plane cannot read leases (no successful read yet); holding"
    if now - store.last_read_ok_at > timing.store_stale_after:
        return (
            "control plane cannot read leases"
            f" (last successful read {_ago(now - store.last_read_ok_at)}); holding"
        )
    return None


def judge_all(
    leases: Iterable[LeaseObservation],
    *,
    now: float,
    store: StoreHealth,
    timing: Timing = DEFAULT_TIMING,
) -> dict[NodeName, Verdict]:
    """Verdicts for every node, keyed by name."""
    return {lease.node: judge(lease, now=now, store=store, timing=timing) for lease in leases}


def _ago(seconds: float) -> str:
    return f"{max(seconds, 0.0):.1f} s ago"
