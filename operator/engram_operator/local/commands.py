"""`engram-replication up`, `status` and `switchover`: the local cluster's commands.

`up` starts the node processes (`supervisor`), runs the control loop (`loop`) until Ctrl-C, a
duration, or the end of the demo (`demo`); `status` and `switchover` work from another terminal,
through cluster.json and the requests folder (`store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram_contract.assignment import AckPolicy
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_operator.local.demo import run_demo, table
from engram_operator.local.loop import TIMING, ControlLoop
from engram_operator.local.store import ClusterFiles
from engram_operator.local.supervisor import LocalNode, Processes
from engram_operator.model import SpaceSpec

SPACE_NAMES = ("orders", "sessions", "profiles", "events", "notes", "tasks", "agents", "docs")


@dataclass
class UpOptions:
    nodes: int = 3
    spaces: int = 4
    data_dir: Path = Path("data/local")
    http_port_base: int = 18100
    replication_port_base: int = 18200
    ack_policy: AckPolicy = "async"
    demo: bool = False
    duration: float = 0.0  # 0 = until Ctrl-C (without --demo)


def build(opts: UpOptions) -> tuple[ClusterFiles, list[LocalNode], dict[SpaceId, SpaceSpec]]:
    files = ClusterFiles(opts.data_dir.resolve())
    nodes = [
        LocalNode(
            NodeName(f"node-{i}"),
            opts.http_port_base + i,
            opts.replication_port_base + i,
            files.root / f"node-{i}",
        )
        for i in range(opts.nodes)
    ]
    names = [SPACE_NAMES[i] if i < len(SPACE_NAMES) else f"space-{i}" for i in range(opts.spaces)]
    spec = SpaceSpec(replicas=min(2, opts.nodes - 1), ack_policy=opts.ack_policy)
    return files, nodes, {SpaceId(n): spec for n in names}


async def run_up(opts: UpOptions, say: Callable[[str], None] = print) -> int:
    files, nodes, spaces = build(opts)
    token = files.ensure_secret()
    procs = Processes(
        files,
        nodes,
        ["--lag-monitor-interval", "1", "--log-level", "WARNING", "--kube-enabled", "false"],
    )
    loop = ControlLoop(files=files, nodes=nodes, spaces=spaces, token=token, say=say)
    for n in nodes:
        procs.start(n.name)
    say(
        f"started {len(nodes)} nodes on 127.0.0.1 (HTTP {opts.http_port_base}..."
        f"{opts.http_port_base + len(nodes) - 1}); data and logs in {files.root}"
    )
    stop = asyncio.Event()
    aloop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            aloop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(_ticks(loop, stop))
    try:
        if opts.demo:
            return await run_demo(loop, procs, say, stop)
        deadline = time.monotonic() + opts.duration if opts.duration else None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
            say(table(loop))
            if deadline is not None and time.monotonic() > deadline:
                break
        return 0
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ticker
        await loop.close()
        procs.stop_all()
        say("stopped all nodes")


async def _ticks(loop: ControlLoop, stop: asyncio.Event) -> None:
    while not stop.is_set():
        loop.poll_requests()
        try:
            await loop.tick()
        except Exception as err:  # the loop must outlive one bad tick
            logging.getLogger(__name__).exception("tick failed: %r", err)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TIMING.check_interval)


def status(data_dir: Path, *, as_json: bool, watch: bool) -> int:
    files = ClusterFiles(data_dir.resolve())
    if not files.state.exists():
        print(
            f"error: no local cluster state at {files.state}; start one with "
            "`engram-replication up`"
        )
        return 2
    while True:
        doc = json.loads(files.state.read_text())
        view = asyncio.run(_gather_status(doc))
        if as_json:
            print(json.dumps(view, indent=2))
        else:
            _print_status(view)
        if not watch:
            return 0
        time.sleep(1.0)


async def _node_status(client: SidecarClient, http: str) -> dict[str, Any] | None:
    try:
        return await client.node_status(http, timeout=1.0)
    except SidecarError:
        return None


async def _gather_status(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"spaces": {}}
    # `/v1/status` needs no token.
    client = SidecarClient("", probe_timeout=1.0)
    try:
        answers = await asyncio.gather(
            *(_node_status(client, n["http"]) for n in doc["nodes"].values())
        )
    finally:
        await client.close()
    nodes = dict(zip(doc["nodes"], answers, strict=True))
    for sid, rec in doc["spaces"].items():
        p = rec.get("placement") or {}
        prim = nodes.get(p.get("primary", ""))
        v = (prim or {}).get("spaces", {}).get(sid, {})
        out["spaces"][sid] = {
            "primary": p.get("primary"),
            "replicas": p.get("replicas", []),
            "epoch": p.get("epoch"),
            "last_sequence": v.get("last_sequence"),
            "replica_lag": v.get("replicas", {}),
            "last_decision": (rec.get("decisions") or [None])[-1],
            "control_loop": rec.get("lastSentence", ""),
        }
    out["nodes"] = {k: ("up" if v else "down") for k, v in nodes.items()}
    return out


def _print_status(view: dict[str, Any]) -> None:
    print("nodes: " + ", ".join(f"{k} {v}" for k, v in view["nodes"].items()))
    for sid, s in view["spaces"].items():
        reps = (
            "; ".join(
                f"{r}: lag {v['lag_entries']} entries / {v['lag_seconds']:.2f} s {v['state']}"
                for r, v in sorted(s["replica_lag"].items())
            )
            or "-"
        )
        print(
            f"{sid:<10} primary {s['primary']} epoch {s['epoch']} last {s['last_sequence']}: {reps}"
        )


def switchover(data_dir: Path, space: str, to: str, timeout: float = 30.0) -> int:
    files = ClusterFiles(data_dir.resolve())
    if not files.state.exists():
        print(f"error: no local cluster state at {files.state}")
        return 2
    doc = json.loads(files.state.read_text())
    if space not in doc["spaces"]:
        print(f"error: unknown space {space!r}; spaces: {', '.join(doc['spaces'])}")
        return 2
    if to not in doc["nodes"]:
        print(f"error: unknown node {to!r}; nodes: {', '.join(doc['nodes'])}")
        return 2
    files.requests.mkdir(exist_ok=True)
    req = files.requests / f"switchover-{space}.json"
    req.write_text(json.dumps({"space": space, "to": to, "nonce": random.random()}))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        rec = json.loads(files.state.read_text())["spaces"][space]
        sentence = rec.get("lastSentence", "")
        if sentence != last:
            print(sentence)
            last = sentence
        if (rec.get("placement") or {}).get("primary") == to:
            print(f"space {space} is now led by {to} at epoch {rec['placement']['epoch']}")
            return 0
        if not req.exists():
            print(f"switchover of {space} to {to} ended without {to} leading: {sentence}")
            return 1
        time.sleep(0.2)
    print(f"switchover of {space} to {to} did not complete within {timeout:g} s")
    return 1
