"""Fixtures of the real-API-server tier (marker `k8s`, `make test-k8s`).

`control_plane` (session): etcd + kube-apiserver (+ kube-controller-manager where built) on
127.0.0.1, built from tools/k8s/ by `make k8s-tools` (tests/k8s/tools.py). Where the binaries are
missing every test here skips, saying how to build them; `make test-k8s` builds them first, so
there it never skips.

`namespace` (function): a fresh namespace per test, so tests don't see each other's objects.
Without kube-controller-manager a deleted namespace stays Terminating, so they are left in place
(the whole store is thrown away with the session).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from tests.k8s import tools
from tests.k8s.apiserver import ControlPlane
from tests.k8s.harness import Release

_counter = itertools.count()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    absent = tools.missing()
    if absent:
        failed = {n: tools.failure(n) for n in absent if tools.failure(n)}
        why = f"; failed builds: {sorted(failed)}" if failed else ""
        pytest.skip(
            f"Kubernetes tools not built ({', '.join(absent)} missing in {tools.bin_dir()}){why}: "
            "run `make k8s-tools` (needs Go >= 1.26), or `make test-k8s`"
        )
    cp = ControlPlane.start(tmp_path_factory.mktemp("k8s"), tools.bin_dir())
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> str:
    base = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:40]
    name = f"{base.strip('-')}-{next(_counter)}"
    control_plane.create_namespace(name)
    return name


@pytest.fixture
async def release(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Release]:
    """The chart installed in a fresh namespace; the test starts sidecars and operators on it.
    At the end every process is stopped; an operator or sidecar that logged a traceback fails
    the test (as in tests/integration)."""
    rel = Release.install(control_plane, namespace, tmp_path)
    try:
        yield rel
    finally:
        codes = await rel.close()
        rel.kill_all()
        failed = request.node.stash.get(_FAILED, False)
        if failed:
            print(f"\n===== logs (full logs under {tmp_path}) =====\n{rel.logs()}")
        elif not rel.errors_expected:
            logs = "\n".join(op.log_text() for op in rel.operators)
            if "Traceback" in logs or any(c not in (0, None, -9) for c in codes):
                pytest.fail(f"an operator logged a traceback or exited badly (codes {codes})")
            problems = rel.cluster.problems()
            if problems:
                pytest.fail(
                    "sidecar trouble outside the test's assertions:\n" + "\n".join(problems)
                )


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report
