"""Options, markers and the safety net of the chaos tests (tests/chaos).

- `chaos_short`: the short seeded run that `make test` includes (a handful of faults, < 60 s).
- `chaos`: the long run of `make chaos` (≥ 1,000 faults over 8 seeded runs, ~25 min). Also marked
  `slow`; it is skipped unless `--chaos` is given, so `make slow` does not pay for it either.

Options (all optional): `--chaos-seed N` (replay one seed), `--chaos-nodes 3|5`,
`--chaos-faults N`, `--chaos-model single|multi`, `--chaos-report PATH` (where the long run
writes its report; by default docs/reliability.md, and only when the whole default plan ran).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.chaos.harness import ChaosCluster


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "chaos tests (tests/chaos)")
    group.addoption("--chaos", action="store_true", help="run the long chaos run (make chaos)")
    group.addoption("--chaos-seed", type=int, default=None, help="replay this seed only")
    group.addoption("--chaos-nodes", type=int, default=None, help="cluster size (3 or 5)")
    group.addoption("--chaos-faults", type=int, default=None, help="faults per run")
    group.addoption(
        "--chaos-model",
        choices=["single", "multi"],
        default=None,
        help="fault model: single (one impaired node at a time) or multi (several, splits)",
    )
    group.addoption("--chaos-report", default=None, help="write the report here")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos_short: the short seeded chaos run (tests/chaos); part of make test"
    )
    config.addinivalue_line(
        "markers",
        "chaos: the long chaos run of make chaos (>= 1,000 faults); skipped unless --chaos",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--chaos", default=False):
        return
    skip = pytest.mark.skip(reason="the long chaos run (~25 min) runs with `make chaos`")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)


@pytest.fixture
def chaos_guard() -> Iterator[list[ChaosCluster]]:
    """Synchronous safety net: SIGCONT + SIGKILL every node and unmount the tmpfs, even when
    the event loop is gone (a timeout)."""
    clusters: list[ChaosCluster] = []
    yield clusters
    for c in clusters:
        c.kill_all()
