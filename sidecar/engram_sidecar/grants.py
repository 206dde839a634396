"""How late a control-plane grant arrived, judged without trusting any wall clock.

A write-lease grant runs from when it *arrives* (this node's monotonic clock), so a grant that
sat in a socket while this process was stopped would renew a lease the control plane has long
given up on. Each grant carries the control plane's monotonic send time. The difference
`arrived - sent` is the (unknown, fixed) offset between the two monotonic clocks plus this
message's delay; its minimum over recent grants is the offset plus the smallest delay seen. A
grant whose difference exceeds that minimum by more than `max_delay` was delayed by more than
`max_delay` beyond the fastest delivery: it is refused.

"Recent" is measured on the control plane's clock (send times), not by count or arrival: a
burst of queued grants that all arrive late after a long stop can't push the on-time baseline
out of the window, however many there are. Monotonic clocks don't jump, so a skewed or stepped
wall clock changes nothing here. A new control-plane process (another id, another clock
origin) starts a new baseline. The one assumption left is the documented one: the fastest
delivery in the window was not itself late by more than `max_delay` (docs/design-notes.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# A grant that arrived later than this beyond the fastest recent one is refused (design-notes
# "Write lease": the one timing assumption, the control plane's bound on message delay).
MAX_GRANT_DELAY_NS = 500_000_000
# Samples sent within this long (control-plane clock) of the newest form the baseline: long
# enough to span any pause worth refusing grants for, short enough that clock drift (~100 ppm,
# so ~3 ms here) stays far below max_delay.
WINDOW_NS = 30_000_000_000
MAX_SAMPLES = 4096  # a bound on memory, far above WINDOW_NS at the control plane's 4 grants/s


@dataclass
class GrantClock:
    max_delay_ns: int
    window_ns: int = WINDOW_NS
    _source: str = ""
    _samples: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def lateness_ns(self, source: str, sent_ns: int, arrived_ns: int) -> int:
        """How much later than the fastest recent delivery this grant arrived (>= 0)."""
        if source != self._source:
            self._source = source
            self._samples.clear()
        offset = arrived_ns - sent_ns
        self._samples.append((sent_ns, offset))
        horizon = max(s for s, _ in self._samples) - self.window_ns
        if self._samples[0][0] < horizon:  # grants may arrive out of order: filter, don't pop
            kept = [x for x in self._samples if x[0] >= horizon]
            self._samples.clear()
            self._samples.extend(kept)
        return max(0, offset - min(o for _, o in self._samples))

    def accept(self, source: str, sent_ns: int, arrived_ns: int) -> bool:
        return self.lateness_ns(source, sent_ns, arrived_ns) <= self.max_delay_ns


@dataclass(frozen=True, slots=True)
class Grant:
    """Who vouched and when: the control plane's id and monotonic send time (pushed grants), or
    this node's own monotonic send time of the request that earned it (`sent_by_us`)."""

    source: str = ""
    sent_ns: int = 0
    sent_by_us: float | None = None
    # The lease the control plane grants, in seconds: the node keeps the shorter of it and its
    # own `write_lease_seconds`, so the control plane's wait can't be shorter than the lease.
    seconds: float | None = None
