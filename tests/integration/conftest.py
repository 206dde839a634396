"""Fixtures for the integration tests: a `Cluster` per test, torn down (bounded) afterwards.

When a test fails, the tail of every node's log is printed in the teardown section of the report;
the whole logs stay in the test's tmp dir (`<tmp>/<node>.log`). A test that passed still fails at
teardown when a node logged a Python traceback (an unhandled error inside the sidecar), or did not
exit within the bound after SIGTERM; `@pytest.mark.node_errors_expected` opts out of both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
from tests.integration.cluster import Cluster

_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "node_errors_expected: the test provokes sidecar tracebacks or shutdown hangs on purpose",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORT_KEY, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORT_KEY, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def _kill_guard(request: pytest.FixtureRequest) -> Generator[list[Cluster], None, None]:
    """Synchronous safety net: SIGKILL every node even when the event loop is gone (a timeout)."""
    clusters: list[Cluster] = []
    yield clusters
    for c in clusters:
        c.kill_all()


@pytest.fixture
async def cluster(
    tmp_path: Path, request: pytest.FixtureRequest, _kill_guard: list[Cluster]
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    _kill_guard.append(c)
    try:
        yield c
    finally:
        await c.close()
        if _failed(request.node):
            print(f"\n===== node logs (full logs under {tmp_path}) =====")
            print(c.log_tails())
    if request.node.get_closest_marker("node_errors_expected") is None and not _failed(
        request.node
    ):
        problems = c.problems()
        if problems:
            print(c.log_tails())
            pytest.fail("sidecar trouble outside the test's assertions:\n" + "\n".join(problems))
