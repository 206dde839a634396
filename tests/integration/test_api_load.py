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
    assert figures.counts.get("LIST leases", 0) == 0
    assert figures.counts.get("PATCH memoryspaces/status", 0) == 0
    assert figures.operator_rate() == 0.0, figures.counts
    # The stand-in nodes renew their Leases (what sidecars do): twice a second each.
    assert figures.counts.get("PATCH leases", 0) >= 3 * 2 * 6.0 * 0.7
