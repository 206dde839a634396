"""SIGTERM of a primary under `async` load: a planned handover, and no acknowledged write lost.

Real sidecar processes and the local control loop (test_partition's harness), a writer that
follows the primary (test_async_loss's). The primary gets SIGTERM while writes stream in; it
marks itself draining, the control loop switches its space to a replica (fence, the target
applies the fenced primary's last entry, promote, demote), and the old primary exits by itself
once it leads nothing. Every acknowledged entry is then on the new primary, at its sequence, with
its payload. The same setup with SIGKILL loses the unshipped tail (test_async_loss.py).

Replica traffic is delayed a little (a FaultProxy), so the primary is always ahead of its
replicas when the signal lands. Every wait is bounded.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from tests.integration.test_async_loss import SPACE, Writer
from tests.integration.test_partition import NODE_FLAGS, LocalHarness, harnesses

from engram_contract.ids import NodeName
from engram_operator.model import SpaceSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DRAIN_TIMEOUT = 20.0
FLAGS = [*NODE_FLAGS, "--drain-timeout", str(DRAIN_TIMEOUT)]


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalHarness]]]:
    async with harnesses(tmp_path) as make:
        yield make


async def _readyz(h: LocalHarness, node: str) -> tuple[int, dict[str, object]]:
    assert h.session is not None
    async with h.session.get(
        f"http://{h.http(node)}/readyz", timeout=aiohttp.ClientTimeout(total=2.0)
    ) as r:
        return r.status, await r.json()


async def test_sigterm_of_an_async_primary_under_load_loses_no_acknowledged_write(
    make_local: Callable[..., Awaitable[LocalHarness]],
) -> None:
    h = await make_local(spaces={SPACE: SpaceSpec(replicas=2, ack_policy="async")}, flags=FLAGS)
    old = h.placement(SPACE).primary
    await h.until(lambda: h.caught_up(SPACE), 15.0, "replicas streaming")
    for n in h.nodes:
        status, doc = await _readyz(h, n.name)
        assert status == 200 and doc["node"] == n.name, (n.name, status, doc)
    for r in h.placement(SPACE).replicas:
        h.proxies[r].set_delay(0.05, "up")
    w = Writer(h)
    w.start()
    await h.until(lambda: w.acks() >= 2000, 30.0, "2,000 acknowledged entries")

    proc = h.pr.nodes[NodeName(old)].proc
    assert proc is not None
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await h.until(lambda: bool(h.lp.status[NodeName(old)].get("draining")), 5.0, "draining")
    await h.until(lambda: h.placement(SPACE).primary != old, DRAIN_TIMEOUT, "a handover")
    new = h.placement(SPACE).primary
    await h.until(lambda: proc.poll() is not None, DRAIN_TIMEOUT, f"{old} exiting")
    exited = time.monotonic() - signalled
    assert proc.returncode == 0, proc.returncode
    await h.until(lambda: bool(w.by_sequence(2)), 15.0, f"a write acknowledged by {new}")
    await w.finish()

    # A switchover, not a failover: no decision record, and the old node said it drained.
    assert h.decisions(SPACE) == [], h.decisions(SPACE)
    log = (h.root / f"{old}.log").read_text(errors="replace")
    assert "drained: every space it led has another primary" in log, log[-2000:]
    assert any(f"{old} is draining" in s for s in h.sentences), h.sentences[-10:]

    have = await h.entries(new, SPACE)
    lost = []
    for epoch, first, last, payloads in w.acked:
        for seq, payload in zip(range(first, last + 1), payloads, strict=True):
            if have.get(seq) != (epoch, payload):
                lost.append(seq)
    assert lost == [], f"{len(lost)} acknowledged entries lost, first {lost[:5]}"
    print(
        f"SIGTERM of {old}: {new} leads, {old} exited after {exited:.1f} s;"
        f" {w.acks()} acknowledged entries, 0 lost"
    )
