"""`engram-replication up`, `status` and `switchover` for the local cluster."""

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

import aiohttp

from engram_contract.ids import NodeName, SpaceId
from engram_operator.local import TIMING, ClusterFiles, ControlLoop, LocalNode, Processes
from engram_operator.model import SpaceSpec

SPACE_NAMES = ("orders", "sessions", "profiles", "events", "notes", "tasks", "agents", "docs")


@dataclass
class UpOptions:
    nodes: int = 3
    spaces: int = 4
    data_dir: Path = Path("data/local")
    http_port_base: int = 18100
    replication_port_base: int = 18200
    ack_policy: str = "async"
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
    spec = SpaceSpec(replicas=min(2, opts.nodes - 1), ack_policy=opts.ack_policy)  # type: ignore[arg-type]
    return files, nodes, {SpaceId(n): spec for n in names}


def table(loop: ControlLoop) -> str:
    lines = [
        f"{'SPACE':<10} {'PRIMARY':<8} {'EPOCH':>5} {'LAST SEQ':>9}  "
        "REPLICAS (acked / lag entries / lag s / state)"
    ]
    for sid, rec in loop.spaces.items():
        p = rec.placement
        if p is None:
            lines.append(f"{sid:<10} (not placed) {rec.last_sentence}")
            continue
        v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid)
        if v is None:
            lines.append(f"{sid:<10} {p.primary:<8} {p.epoch:>5} {'?':>9}  primary not answering")
            continue
        reps = []
        for name, r in sorted(v.get("replicas", {}).items()):
            reps.append(
                f"{name}: {r['acked_sequence']} / {r['lag_entries']} / "
                f"{r['lag_seconds']:.2f} / {r['state']}"
            )
        lines.append(
            f"{sid:<10} {p.primary:<8} {p.epoch:>5} {v['last_sequence']:>9}  "
            + ("; ".join(reps) or "-")
        )
    return "\n".join(lines)


class Workload:
    """Writers that follow each space's primary and retry elsewhere on 421/503/errors."""

    def __init__(self, loop: ControlLoop, batch: int = 20, rate_per_space: float = 200.0) -> None:
        self.loop = loop
        self.batch = batch
        self.interval = batch / rate_per_space
        self.acked = 0
        self.errors = 0
        self.max_gap = 0.0
        self.last_ok: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(s)) for s in self.loop.spaces]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _writer(self, sid: SpaceId) -> None:
        s = await self.loop.session()
        i = 0
        while True:
            await asyncio.sleep(self.interval)
            rec = self.loop.spaces[sid]
            if rec.placement is None:
                continue
            node = self.loop.nodes[rec.placement.primary]
            body = "\n".join(
                json.dumps({"demo": i + k, "text": "an episode"}) for k in range(self.batch)
            )
            t = time.monotonic()
            try:
                async with s.post(
                    f"http://{node.http}/v1/spaces/{sid}/entries",
                    data=body,
                    headers={"Content-Type": "application/x-ndjson"},
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as resp:
                    ok = resp.status == 200
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                i += self.batch
                self.acked += self.batch
                prev = self.last_ok.get(sid)
                if prev is not None:
                    self.max_gap = max(self.max_gap, t - prev)
                self.last_ok[sid] = time.monotonic()
            else:
                self.errors += 1


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
            return await _demo(loop, procs, say, stop)
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


async def _wait_for(cond: Callable[[], bool], timeout: float, stop: asyncio.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if cond():
            return True
        await asyncio.sleep(0.1)
    return cond()


async def _demo(
    loop: ControlLoop, procs: Processes, say: Callable[[str], None], stop: asyncio.Event
) -> int:
    def all_ready() -> bool:
        for sid, rec in loop.spaces.items():
            p = rec.placement
            v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid) if p else None
            if v is None or v.get("write_lease") is not True:
                return False
        return True

    if not await _wait_for(all_ready, 20.0, stop):
        say("demo: the cluster did not become ready within 20 s; see the node logs")
        return 1
    work = Workload(loop)
    work.start()
    say("demo: writing to every space; live lag per replica:")
    for _ in range(4):
        await asyncio.sleep(1.0)
        say(table(loop))
    leaders: dict[NodeName, int] = {}
    for rec in loop.spaces.values():
        if rec.placement is not None:
            leaders[rec.placement.primary] = leaders.get(rec.placement.primary, 0) + 1
    victim = max(sorted(leaders), key=lambda n: leaders[n])
    say(f"demo: SIGKILL {victim}, primary of {leaders[victim]} space(s); writers keep going")
    killed_at = time.monotonic()
    procs.kill(victim)

    def failed_over() -> bool:
        return all(
            r.placement is not None and r.placement.primary != victim for r in loop.spaces.values()
        )

    ok = await _wait_for(failed_over, 15.0, stop)
    say(
        f"demo: every space has a primary again {time.monotonic() - killed_at:.1f} s after the kill"
        if ok
        else "demo: failover did not complete in 15 s"
    )
    await asyncio.sleep(2.0)
    say(table(loop))
    say(f"demo: restarting {victim}; it rejoins as a replica and catches up")
    procs.start(victim)
    restarted = time.monotonic()

    def caught_up() -> bool:
        for sid, rec in loop.spaces.items():
            p = rec.placement
            v = loop.status.get(p.primary, {}).get("spaces", {}).get(sid) if p else None
            r = (v or {}).get("replicas", {}).get(victim)
            if r is None or r["lag_entries"] > 100:
                return False
        return True

    for _ in range(12):
        if await _wait_for(caught_up, 2.0, stop):
            break
        say(table(loop))
    say(table(loop))
    if caught_up():
        say(f"demo: {victim} caught up {time.monotonic() - restarted:.1f} s after its restart")
    await work.stop()
    say(
        f"demo: {work.acked} entries acknowledged; longest write gap {work.max_gap:.2f} s; "
        f"{work.errors} refused or failed requests (retried)"
    )
    return 0 if ok else 1


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


async def _gather_status(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"spaces": {}}
    nodes: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        for name, n in doc["nodes"].items():
            try:
                async with s.get(
                    f"http://{n['http']}/v1/status", timeout=aiohttp.ClientTimeout(total=1.0)
                ) as resp:
                    nodes[name] = await resp.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                nodes[name] = None
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
