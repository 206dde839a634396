"""The operator is light on the API server (issue 15 item 8): at steady state it reads node
Leases from a watch, not by listing them, and writes no MemorySpace status that didn't change.
Measured by tests/integration/api_load.py, at a small size (docs/benchmarks.md has the figures
at 100 x 3 and 1,000 x 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.api_load import measure

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_an_idle_cluster_costs_the_operator_no_api_requests(tmp_path: Path) -> None:
    figures = await measure(tmp_path, spaces=8, nodes=3, window=6.0, settle=3.0)
    print(figures.table())
    # A refresh LISTs the Leases instead of reading the watch's cache whenever a node's renewal
    # is a little late (nodes.py `_cache_will_do`: failover verdicts need a consistent read).
    # On a loaded machine a stand-in node's renewal can be, so one LIST in the window is
    # allowed; a cache that is never used would show ~4 a second (24 here).
    assert figures.counts.get("LIST leases", 0) <= 1, figures.counts
    assert figures.counts.get("PATCH memoryspaces/status", 0) == 0
    others = {k: v for k, v in figures.counts.items() if k not in ("PATCH leases", "LIST leases")}
    assert sum(others.values()) == 0, figures.counts
    # The stand-in nodes renew their Leases (what sidecars do): twice a second each.
    assert figures.counts.get("PATCH leases", 0) >= 3 * 2 * 6.0 * 0.7
