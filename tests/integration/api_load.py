"""How hard the operator leans on the Kubernetes API: requests per second at S spaces x N nodes.

Runs the real operator process against kmock's emulator (kube_harness), with N light stand-in
nodes instead of sidecar processes: each renews its node Lease like a sidecar (every 0.5 s) and
answers the sidecar API the operator calls (heartbeats, assignments, fences, probes) with the
views a caught-up node would give. The nodes are stand-ins so that 1,000 spaces fit on a laptop;
the API traffic they cause is the sidecars' own (Lease renewals; an idle space's primary sends no
member reports, `engram_sidecar.kube.agent`).

It creates S spaces (2 replicas each), waits until every one is Healthy, lets the operator settle,
then counts what the API server served over a window, by kind of request:

    .venv/bin/python -m tests.integration.api_load --spaces 100 --nodes 3 --window 20

`measure` is also what tests/integration/test_api_load.py asserts on, at a small size.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
from aiohttp import web
from tests.integration.cluster import IntegrationError
from tests.integration.kube_harness import (
    NAMESPACE,
    Kube,
    OperatorProcess,
    register_resources,
    wait_for,
)

from engram_contract.assignment import Assignment
from engram_contract.launcher import free_port

LEASE_RENEW = 0.5


class StandInNode:
    """A node that answers the sidecar API the way a caught-up, idle sidecar would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.http = f"127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{free_port()}"
        self.spaces: dict[str, Assignment] = {}
        self.runner: web.AppRunner | None = None

    def view(self, space: str) -> dict[str, Any]:
        a = self.spaces[space]
        role = a.role_of(self.name)
        view: dict[str, Any] = {
            "space": space,
            "role": role,
            "epoch": a.epoch,
            "accepted_epoch": a.epoch,
            "first_sequence": 1,
            "last_sequence": 0,
            "applied_sequence": 0,
            "last_epoch": 0,
            "ack_policy": a.ack_policy,
            "tuning": a.tuning.to_json(),
            "primary": a.primary.node,
            "incarnation": a.incarnation,
            "fenced": None,
            "write_lease": role == "primary",
        }
        if role == "primary":
            view["replicas"] = {
                r.node: {
                    "acked_sequence": 0,
                    "lag_entries": 0,
                    "lag_seconds": 0.0,
                    "state": "Healthy",
                    "connected": True,
                }
                for r in a.replicas
            }
        return view

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "draining": False,
            "spaces": {s: self.view(s) for s in self.spaces},
        }

    async def start(self) -> None:
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True, "node": self.name})

        async def lease(request: web.Request) -> web.Response:
            doc = await request.json()
            granted = {s: s in self.spaces for s in doc.get("epochs") or {}}
            return web.json_response({"granted": granted, **self.status()})

        async def assign(request: web.Request) -> web.Response:
            space = request.match_info["space"]
            self.spaces[space] = Assignment.from_json(await request.json())
            return web.json_response({"changed": True, **self.view(space)})

        async def fence(request: web.Request) -> web.Response:
            doc = await request.json()
            return web.json_response(
                {"epoch": doc["epoch"], "last_sequence": 0, "last_epoch": 0, "fenced": None}
            )

        async def retire(request: web.Request) -> web.Response:
            space = request.match_info["space"]
            hosted = self.spaces.pop(space, None) is not None
            return web.json_response({"space": space, "hosted": hosted, "kept": hosted})

        app.router.add_get("/healthz", healthz)
        app.router.add_post("/v1/lease", lease)
        app.router.add_put("/v1/spaces/{space}/assignment", assign)
        app.router.add_post("/v1/spaces/{space}/fence", fence)
        app.router.add_post("/v1/spaces/{space}/retire", retire)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def renew_time() -> str:
    """A Lease's renewTime for now (MicroTime)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def leases_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def stand_in_lease(node: StandInNode, namespace: str) -> dict[str, Any]:
    """The node Lease a sidecar would create for `node` (what the operator reads)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": f"engram-node-{node.name}",
            "namespace": namespace,
            "labels": {"engram.io/node-lease": "true"},
            "annotations": {
                "engram.io/http-address": node.http,
                "engram.io/replication-address": node.address,
            },
        },
        "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 2, "renewTime": renew_time()},
    }


async def renew_leases(kube: Kube, nodes: list[StandInNode]) -> None:
    """Create each node's Lease, then renew them all every LEASE_RENEW, as sidecars do."""
    base = leases_path(NAMESPACE)
    for n in nodes:
        await kube.call("POST", base, stand_in_lease(n, NAMESPACE))
    due = time.monotonic()
    while True:
        due += LEASE_RENEW
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        for n in nodes:
            with contextlib.suppress(Exception):
                await kube.call(
                    "PATCH", f"{base}/engram-node-{n.name}", {"spec": {"renewTime": renew_time()}}
                )


async def create(kube: Kube, name: str, replicas: int) -> None:
    """Create a space; an emulator slowed by a thousand objects may time out and still have
    created it (409 on the retry: done)."""
    for attempt in range(5):
        try:
            await kube.create_space(name, {"replicas": replicas})
            return
        except (TimeoutError, IntegrationError) as err:
            if "409" in str(err) or "AlreadyExists" in str(err):
                return
            if attempt == 4:
                raise
            await asyncio.sleep(1.0)


def kind_of(method: str, path: str, query: Mapping[str, str]) -> str:
    """A request as counted: method, resource (and subresource), watch or list."""
    parts = path.strip("/").split("/")
    resource = "?"
    for known in ("leases", "memoryspaces", "events", "kopfpeerings"):
        if known in parts:
            i = parts.index(known)
            resource = "/".join([known, *parts[i + 2 : i + 3]]) if len(parts) > i + 2 else known
            named = len(parts) > i + 1
            break
    else:
        return f"{method} {path}"
    if method == "GET":
        if query.get("watch") in ("1", "true"):
            return f"WATCH {resource}"
        return f"GET {resource}" if named else f"LIST {resource}"
    return f"{method} {resource}"


@dataclass
class Figures:
    spaces: int
    nodes: int
    window: float
    settle_seconds: float
    counts: dict[str, int]

    def rates(self) -> dict[str, float]:
        return {k: v / self.window for k, v in sorted(self.counts.items())}

    def operator_rate(self) -> float:
        """Requests per second the operator made (everything but the nodes' Lease PATCHes)."""
        return sum(v for k, v in self.counts.items() if k != "PATCH leases") / self.window

    def table(self) -> str:
        lines = [
            f"{self.spaces} spaces x {self.nodes} nodes, {self.window:g} s window "
            f"(all Healthy after {self.settle_seconds:.1f} s)",
            "| request | per second |",
            "|---|---|",
        ]
        for k, v in self.rates().items():
            lines.append(f"| `{k}` | {v:.2f} |")
        lines.append(f"| operator total | {self.operator_rate():.2f} |")
        return "\n".join(lines)


async def measure(
    root: Path,
    *,
    spaces: int,
    nodes: int,
    window: float,
    settle: float = 5.0,
    ready_timeout: float = 600.0,
) -> Figures:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        register_resources(emulator)
        kube = Kube(emulator, str(server.url), root)
        stand_ins = [StandInNode(f"n{i}") for i in range(nodes)]
        for n in stand_ins:
            await n.start()
        renewer = asyncio.create_task(renew_leases(kube, stand_ins))
        (root / "secret").write_text("api-load-secret-0123456789abcdef\n")
        op = OperatorProcess(kube, root, "operator", root / "secret", "--standalone")
        op.start()
        try:
            t0 = time.monotonic()
            for i in range(spaces):
                await create(kube, f"space-{i:04d}", min(2, nodes - 1))

            def healthy() -> bool:
                return all(
                    kube.status(f"space-{i:04d}").get("phase") == "Healthy" for i in range(spaces)
                )

            await wait_for(healthy, timeout=ready_timeout, what="every space Healthy")
            ready = time.monotonic() - t0
            await asyncio.sleep(settle)
            start = len(list(emulator))
            await asyncio.sleep(window)
            served = list(emulator)[start:]
            counts = collections.Counter(
                kind_of(_method(r.method), str(r.url.path), dict(r.url.query)) for r in served
            )
            return Figures(
                spaces=spaces,
                nodes=nodes,
                window=window,
                settle_seconds=ready,
                counts=dict(counts),
            )
        finally:
            await op.stop()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            for n in stand_ins:
                await n.stop()
            await kube.close()


def _method(method: object) -> str:
    # kmock records the method as an enum (`method.PATCH`).
    return str(getattr(method, "name", method)).upper()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(
            measure(Path(tmp), spaces=args.spaces, nodes=args.nodes, window=args.window)
        )
    print(figures.table())
    if args.json:
        print(json.dumps(figures.counts, sort_keys=True))


if __name__ == "__main__":
    main()
