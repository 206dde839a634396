"""The operator's API requests per second against a real kube-apiserver (issue 15, item 8).

The chart's CRD and RBAC, the operator as its ServiceAccount, S MemorySpaces (2 replicas each)
on N stand-in nodes (tests/integration/api_load.py: each answers the sidecar API as a caught-up
idle sidecar would, and its Lease is renewed twice a second as a sidecar does). Once every space
is Healthy and a settling pause has passed, the API server's audit log is read over a window: every
request of the operator's ServiceAccount, by verb and resource. docs/benchmarks.md ("Kubernetes
API load") has the figures:

    ENGRAM_API_LOAD="100x3 1000x5" .venv/bin/pytest -m k8s tests/k8s/test_k8s_api_load.py -s

Without ENGRAM_API_LOAD it runs 20 x 3 and checks the steady state costs the operator nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from tests.integration.api_load import (
    LEASE_RENEW,
    StandInNode,
    leases_path,
    renew_time,
    stand_in_lease,
)
from tests.k8s.harness import GROUP, VERSION, Release

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(3600)]

SETTLE = 10.0
WINDOW = 30.0


def _sizes() -> list[tuple[int, int]]:
    text = os.environ.get("ENGRAM_API_LOAD", "")
    if not text:
        return [(20, 3)]
    return [(int(a), int(b)) for a, b in (s.split("x") for s in text.split())]


async def _renew(release: Release, nodes: list[StandInNode]) -> None:
    rest = release.cp.rest()
    base = leases_path(release.namespace)
    for n in nodes:
        rest.create(base, stand_in_lease(n, release.namespace))
    due = time.monotonic()
    while True:
        due += LEASE_RENEW
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        for n in nodes:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    rest.merge_patch,
                    f"{base}/engram-node-{n.name}",
                    {"spec": {"renewTime": renew_time()}},
                )


def _count(release: Release, since: int) -> tuple[collections.Counter[str], int]:
    """Requests of the operator's ServiceAccount in the audit log after line `since`."""
    seen: set[str] = set()
    counts: collections.Counter[str] = collections.Counter()
    line = 0
    for line, ev in enumerate(release.cp.audit(), start=1):
        if line <= since or ev.get("auditID") in seen:
            continue
        if ev.get("user", {}).get("username") != release.operator_sa.username:
            continue
        seen.add(ev["auditID"])
        ref = ev.get("objectRef") or {}
        resource = ref.get("resource", ev.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        counts[f"{ev['verb']} {resource}"] += 1
    return counts, line


@pytest.mark.parametrize(("spaces", "nodes"), _sizes())
async def test_operator_api_requests_per_second(
    release: Release, spaces: int, nodes: int, tmp_path: Path
) -> None:
    stand_ins = [StandInNode(f"n{i}") for i in range(nodes)]
    for n in stand_ins:
        await n.start()
    renewer = asyncio.create_task(_renew(release, stand_ins))
    try:
        op = release.operator("operator", "--standalone")
        rest = release.cp.rest()
        t0 = time.monotonic()

        def create_all() -> None:
            for i in range(spaces):
                rest.create(
                    release.spaces_path(),
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "MemorySpace",
                        "metadata": {"name": f"space-{i:04d}"},
                        "spec": {"replicas": min(2, nodes - 1)},
                    },
                )

        await asyncio.to_thread(create_all)  # the stand-ins run on this loop meanwhile

        def all_healthy() -> bool:
            items = rest.get(release.spaces_path())["items"]
            return len(items) == spaces and all(
                (o.get("status") or {}).get("phase") == "Healthy" for o in items
            )

        # In a thread, and every 2 s: listing 1,000 objects blocks for a while, and this event
        # loop also runs the stand-in nodes and their Lease renewals, which must not stall.
        deadline = time.monotonic() + 60 + spaces * 1.0
        while not await asyncio.to_thread(all_healthy):
            assert time.monotonic() < deadline, f"{spaces} spaces not all Healthy in time"
            await asyncio.sleep(2.0)
        ready = time.monotonic() - t0
        # kopf works through its backlog of events (finalizers, annotations) for a while after
        # the last space turns Healthy: at 1,000 spaces that is the better part of a minute.
        await asyncio.sleep(max(SETTLE, spaces * 0.05))
        _, mark = _count(release, 0)
        pid = op.proc.pid if op.proc else 0
        cpu_before = _cpu(pid)
        await asyncio.sleep(WINDOW)
        cpu_after = _cpu(pid)
        counts, _ = _count(release, mark)
        rates = {k: round(v / WINDOW, 3) for k, v in sorted(counts.items())}
        total = round(sum(counts.values()) / WINDOW, 3)
        leases = nodes * 2  # the nodes' Lease renewals (patch leases), by design
        result: dict[str, Any] = {
            "spaces": spaces,
            "nodes": nodes,
            "window_seconds": WINDOW,
            "all_healthy_after_seconds": round(ready, 1),
            "operator_requests_per_second": total,
            "operator_by_request": rates,
            "node_lease_patches_per_second": leases,
            "operator_cpu_seconds": cpu_after,
            # The operator's share of a core while steady, over the window.
            "operator_cpu_steady": (
                round((cpu_after - cpu_before) / WINDOW, 3)
                if cpu_after is not None and cpu_before is not None
                else None
            ),
            "operator_ticks": {
                k: v for k, v in op.metrics().items() if "operator_ticks_total" in k
            },
        }
        print(json.dumps(result, indent=1))
        out = os.environ.get("ENGRAM_API_LOAD_OUT")
        if out:
            _append(Path(out), json.dumps(result))
        if not os.environ.get("ENGRAM_API_LOAD"):
            # Steady state: no Lease list, no status write. The one request left is the watch
            # audit's MemorySpace LIST, every 30 s by design, which a window may or may not hold.
            audit = counts.get("list memoryspaces", 0)
            assert audit <= WINDOW // 30 + 1, rates
            assert sum(counts.values()) - audit == 0, rates
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        for n in stand_ins:
            await n.stop()


def _append(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line + "\n")


def _cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return round((int(fields[11]) + int(fields[12])) / ticks, 1)
