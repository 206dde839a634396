"""A local chaos cluster: real sidecars, the real control loop in a task, every link faulted.

- Nodes are `python -m engram_sidecar` processes on 127.0.0.1 (started here, not by
  `engram_operator.local.Processes`, so that a node can be (re)started with its own environment:
  the test-only wall-clock offset `ENGRAM_TEST_WALL_CLOCK_OFFSET_S`; every node also records
  where its fsyncs left the WAL, `ENGRAM_TEST_DURABLE_MARKS`, for power cuts). Each gets
  PR_SET_PDEATHSIG, so a dying test run never leaves sidecars behind.
- The control loop is `engram_operator.local.ControlLoop`, ticking every check interval in a
  task. Its nodes advertise the routers of `links.LinkMatrix`, so its HTTP (heartbeats, lease
  grants, assignments) and the nodes' replication and fork-check traffic all cross a FaultProxy.
- One node's data directory may be a small tmpfs (mounted here, as root), so that a full disk is
  a real ENOSPC; without permission to mount, that fault kind is skipped with the reason printed.

The harness talks to the processes only through their public interfaces: HTTP, signals, the
proxies, the files the WAL reader reads. Every wait is bounded; `close` (and the synchronous
`kill_all`, for a teardown after a timeout) always SIGCONTs then kills every process and unmounts
the tmpfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from tests.chaos.links import CP, LinkMatrix

from engram_contract.ids import NodeName, SpaceId
from engram_contract.launcher import die_with_parent, stable_port
from engram_operator.local.loop import TIMING, ControlLoop
from engram_operator.local.store import ClusterFiles
from engram_operator.local.supervisor import LocalNode
from engram_operator.model import Placement, SpaceSpec
from engram_sidecar.log import durable_marks

CLOCK_ENV: Final = "ENGRAM_TEST_WALL_CLOCK_OFFSET_S"
MARKS_ENV: Final = durable_marks.ENV
READY_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 8.0
TICK_TIMEOUT: Final = 20.0
TMPFS_BYTES: Final = 64 * 1024 * 1024

# Fast failure handling on the data plane (as in tests/integration/test_partition.py), small
# segments so rotation happens, and a low catch-up threshold so a restarted node often gets a
# snapshot. Equal on every node: replicas' segments must match the primary's byte for byte.
NODE_FLAGS: Final = (
    # A SIGTERM drains (the control loop switches the node's spaces away) within the
    # harness's STOP_TIMEOUT.
    "--drain-timeout",
    "5",
    "--heartbeat-interval",
    "0.1",
    "--lag-monitor-interval",
    "0.5",
    "--ack-timeout",
    "2",
    "--io-timeout",
    "1",
    "--connect-timeout",
    "1",
    "--backoff-steps",
    "0.05,0.1,0.2,0.4",
    "--segment-bytes",
    str(1024 * 1024),
    "--catchup-threshold",
    "200",
    "--kube-enabled",
    "false",
    "--log-level",
    "INFO",
)

# Node ports below the ephemeral range: nodes restart on the same ports while routers, proxies
# and outgoing connections take ephemeral ones (engram_contract.launcher.stable_port).
free_port = stable_port


@dataclass
class ChaosNode(LocalNode):
    """A local node as the control loop sees it: its advertised addresses are routers."""

    adv_http: str = ""
    adv_repl: str = ""
    skew: float = 0.0  # the wall-clock offset of the running process
    log_path: Path = Path()
    starts: int = 0

    @property
    def http(self) -> str:
        return self.adv_http or f"127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return self.adv_repl or f"127.0.0.1:{self.replication_port}"

    @property
    def direct(self) -> str:
        """The real HTTP address (clients and the harness use it; never faulted)."""
        return f"127.0.0.1:{self.http_port}"


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the cluster started
    source: str  # "nemesis", "control", "harness", "writer"
    text: str

    def __str__(self) -> str:
        return f"{self.t:8.2f}s  {self.source:<8} {self.text}"


@dataclass
class ChaosCluster:
    root: Path
    size: int
    spaces: Mapping[str, SpaceSpec]
    seed: int = 0
    disk_node: bool = True
    nodes: dict[str, ChaosNode] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    tmpfs: Path | None = None
    tmpfs_skip_reason: str = ""
    expected_down: set[str] = field(default_factory=set)
    loop: ControlLoop | None = None
    links: LinkMatrix | None = None
    session: aiohttp.ClientSession | None = None
    _t0: float = field(default_factory=time.monotonic)
    _control: asyncio.Task[None] | None = None
    _control_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _ticks: int = 0
    _filler: Path | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._t0

    def note(self, source: str, text: str) -> None:
        self.events.append(Event(round(self.now(), 3), source, text))

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        files = ClusterFiles(self.root)
        token = files.ensure_secret()
        names = [f"node-{i}" for i in range(self.size)]
        for name in names:
            self.nodes[name] = ChaosNode(
                NodeName(name),
                free_port(),
                free_port(),
                self.root / name,
                log_path=self.root / f"{name}.log",
            )
        if self.disk_node:
            self._mount_tmpfs(self.nodes[names[-1]])
        self.links = LinkMatrix(names, self._real_port, self._owners, seed=self.seed)
        await self.links.start()
        for n in self.nodes.values():
            n.adv_http = self.links.address(n.name, "http")
            n.adv_repl = self.links.address(n.name, "repl")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=10)
        )
        self.loop = ControlLoop(
            files=files,
            nodes=list(self.nodes.values()),
            spaces={SpaceId(s): spec for s, spec in self.spaces.items()},
            token=token,
            say=lambda s: self.note("control", s),
        )
        self._t0 = time.monotonic()
        self.note("harness", f"cluster of {self.size} nodes under {self.root}")
        ok = await asyncio.gather(*(self.start_node(n) for n in names))
        if not all(ok):
            raise AssertionError(f"nodes failed to start: {self.problems[-3:]}")
        self._control = asyncio.create_task(self._control_loop())
        await self.wait_for(self.steady, 40.0, "every space placed, leased and streaming")

    async def close(self) -> None:
        await self.stop_control()
        await asyncio.gather(*(self.terminate(n) for n in self.nodes), return_exceptions=True)
        self.kill_all()
        if self.loop is not None:
            await self.loop.close()
        if self.session is not None:
            await self.session.close()
        if self.links is not None:
            await self.links.stop()
        self._unmount_tmpfs()

    def kill_all(self) -> None:
        """Synchronous last resort: SIGCONT and SIGKILL every node process, unmount the tmpfs."""
        for n in self.nodes.values():
            p = n.proc
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=STOP_TIMEOUT)
        self._unmount_tmpfs()

    # ---- the tmpfs of the disk-full fault ------------------------------------------------------

    def _mount_tmpfs(self, node: ChaosNode) -> None:
        mnt = self.root / f"{node.name}-disk"
        mnt.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.tmpfs_skip_reason = "mounting a tmpfs needs root"
            return
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(mnt)],
                check=True,
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            self.tmpfs_skip_reason = f"mount failed: {err} {detail.decode(errors='replace')}"
            return
        self.tmpfs = mnt
        node.data_dir = mnt / "data"

    def _unmount_tmpfs(self) -> None:
        if self.tmpfs is None:
            return
        done = subprocess.run(
            ["umount", str(self.tmpfs)], capture_output=True, timeout=10, check=False
        )
        if done.returncode != 0:
            subprocess.run(
                ["umount", "-l", str(self.tmpfs)], capture_output=True, timeout=10, check=False
            )
        self.tmpfs = None

    @property
    def disk_victim(self) -> str | None:
        if self.tmpfs is None:
            return None
        return next(n.name for n in self.nodes.values() if n.data_dir.parent == self.tmpfs)

    def fill_disk(self) -> int:
        """Fill the tmpfs until ENOSPC (bounded); returns the bytes written."""
        assert self.tmpfs is not None
        self._filler = self.tmpfs / "filler"
        block = b"\xa5" * (256 * 1024)
        written = 0
        with contextlib.suppress(OSError), self._filler.open("wb") as f:
            for _ in range(TMPFS_BYTES // len(block) + 8):
                f.write(block)
                f.flush()
                written += len(block)
        # Whatever the last partial block left: fill it with small writes.
        with contextlib.suppress(OSError), self._filler.open("ab") as f:
            for _ in range(len(block) // 4096 + 8):
                f.write(block[:4096])
                f.flush()
                written += 4096
        return written

    def free_disk(self) -> None:
        if self._filler is not None:
            self._filler.unlink(missing_ok=True)
            self._filler = None

    # ---- processes -----------------------------------------------------------------------------

    def _real_port(self, node: str, kind: str) -> int:
        n = self.nodes[node]
        return n.replication_port if kind == "repl" else n.http_port

    def _owners(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                out[n.proc.pid] = n.name
        out[os.getpid()] = CP
        return out

    def running(self, name: str) -> bool:
        p = self.nodes[name].proc
        return p is not None and p.poll() is None

    def _spawn(self, n: ChaosNode, skew: float) -> None:
        n.data_dir.mkdir(parents=True, exist_ok=True)
        n.starts += 1
        n.skew = skew
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"
        # So that a power cut knows what was fsynced, and finds something that was not: each
        # fsync starts 3 ms late (durable_marks).
        env[MARKS_ENV] = "3"

        if skew:
            env[CLOCK_ENV] = repr(skew)
        cmd = [
            sys.executable,
            "-m",
            "engram_sidecar",
            "--node",
            n.name,
            "--data-dir",
            str(n.data_dir),
            "--http-port",
            str(n.http_port),
            "--replication-port",
            str(n.replication_port),
            "--secret-file",
            str(self.root / "secret"),
            *NODE_FLAGS,
        ]
        with n.log_path.open("ab") as log:
            log.write(f"==== chaos harness: start #{n.starts}, clock skew {skew:+g} s\n".encode())
            log.flush()
            n.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call
            )

    async def start_node(self, name: str, *, skew: float = 0.0) -> bool:
        """Start the node (if not running) and wait until it is ready; False if it never was."""
        n = self.nodes[name]
        if self.running(name):
            return True
        for attempt in range(3):
            self._spawn(n, skew)
            if await self._ready(n):
                self.expected_down.discard(name)
                return True
            self.problems.append(
                f"{self.now():.2f}s {name} not ready (attempt {attempt + 1}): "
                f"{self.log_tail(name, 5)}"
            )
            await self.kill(name)
            await asyncio.sleep(0.5)
        return False

    async def _ready(self, n: ChaosNode) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if n.proc is None or n.proc.poll() is not None:
                return False
            got = await self.get(n.name, "/healthz", timeout=1.0)
            if got is not None and got[0] == 200:
                return True
            await asyncio.sleep(0.05)
        return False

    def signal(self, name: str, sig: signal.Signals) -> None:
        p = self.nodes[name].proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    async def kill(self, name: str) -> None:
        """SIGCONT, SIGKILL and reap (bounded)."""
        self.expected_down.add(name)
        p = self.nodes[name].proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
        deadline = time.monotonic() + STOP_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def lose_unsynced(self, name: str) -> tuple[int, int]:
        """After a kill: take from the node's disk what a power loss could, every WAL byte
        written after the last fsync that covered it (`durable_marks`). Returns (segments
        changed, bytes lost) over all its spaces."""
        assert not self.running(name), "a power cut needs the process gone"
        changed = lost = 0
        for space_dir in sorted(self.nodes[name].data_dir.iterdir()):
            wal = space_dir / "wal"
            if wal.is_dir():
                c, b = durable_marks.lose_unsynced(wal)
                changed, lost = changed + c, lost + b
        return changed, lost

    async def terminate(self, name: str) -> None:
        """SIGCONT, SIGTERM; SIGKILL after STOP_TIMEOUT."""
        self.expected_down.add(name)
        p = self.nodes[name].proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if p.poll() is None:
            self.problems.append(f"{name} ignored SIGTERM for {STOP_TIMEOUT} s")
            await self.kill(name)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.nodes[name].log_path
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def tracebacks(self) -> list[str]:
        out = []
        for n in self.nodes.values():
            text = n.log_path.read_text(errors="replace") if n.log_path.exists() else ""
            count = text.count("Traceback (most recent call last)")
            if count:
                at = text.index("Traceback (most recent call last)")
                out.append(f"{n.name}: {count} traceback(s); first:\n{text[at : at + 1500]}")
        return out

    # ---- the control loop, in a task ----------------------------------------------------------

    @property
    def lp(self) -> ControlLoop:
        assert self.loop is not None
        return self.loop

    async def _control_loop(self) -> None:
        while not self._control_stop.is_set():
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.lp.tick(), TICK_TIMEOUT)
                self._ticks += 1
            except TimeoutError:
                self.problems.append(
                    f"{self.now():.2f}s a control-loop tick took > {TICK_TIMEOUT}s"
                )
            except Exception as err:  # the loop must go on; the failure is reported
                self.problems.append(f"{self.now():.2f}s control-loop tick raised {err!r}")
            self._supervise()
            spent = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._control_stop.wait(), max(0.0, TIMING.check_interval - spent)
                )

    def _supervise(self) -> None:
        """A node that exited on its own is a crash: report it (the next heal restarts it)."""
        for name, n in self.nodes.items():
            if name in self.expected_down or n.proc is None:
                continue
            code = n.proc.poll()
            if code is not None:
                self.expected_down.add(name)
                self.crashes.append(f"{self.now():.2f}s {name} exited with code {code}")
                self.note("harness", f"{name} exited on its own with code {code}")

    async def stop_control(self) -> None:
        self._control_stop.set()
        if self._control is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._control, TICK_TIMEOUT + 5)
            self._control = None

    def placement(self, space: str) -> Placement | None:
        rec = self.lp.spaces.get(SpaceId(space))
        return None if rec is None else rec.placement

    def primary(self, space: str) -> str | None:
        p = self.placement(space)
        return None if p is None else str(p.primary)

    def decisions(self, space: str) -> list[dict[str, Any]]:
        """Every promotion decision record of the space: the control loop's list, and what
        cluster.json holds (it keeps the last 20), merged."""
        out: dict[tuple[Any, Any], dict[str, Any]] = {}
        state = self.root / "cluster.json"
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(state.read_text())
            for d in doc.get("spaces", {}).get(space, {}).get("decisions", []):
                out[(d.get("newEpoch"), d.get("winner"))] = d
        rec = self.lp.spaces.get(SpaceId(space))
        for d in rec.decisions if rec is not None else []:
            out[(d.get("newEpoch"), d.get("winner"))] = d
        return [out[k] for k in sorted(out, key=lambda k: (k[0] or 0, str(k[1])))]

    # ---- HTTP, direct to the real ports --------------------------------------------------------

    async def get(self, node: str, path: str, *, timeout: float = 2.0) -> tuple[int, Any] | None:
        assert self.session is not None
        try:
            async with self.session.get(
                f"http://{self.nodes[node].direct}{path}",
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                text = await r.text()
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, text
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def view(self, node: str, space: str) -> dict[str, Any] | None:
        if not self.running(node):
            return None
        got = await self.get(node, f"/v1/spaces/{space}")
        if got is None or got[0] != 200 or not isinstance(got[1], dict):
            return None
        return got[1]

    async def steady(self) -> bool:
        """Every space placed; its primary holds the lease and every replica is connected."""
        for sid in self.spaces:
            p = self.placement(sid)
            if p is None:
                return False
            v = await self.view(p.primary, sid)
            if v is None or v.get("role") != "primary" or v.get("write_lease") is not True:
                return False
            reps = v.get("replicas", {})
            if not all(reps.get(r, {}).get("connected") for r in p.replicas):
                return False
        return True

    async def converged(self, space: str) -> str | None:
        """None when every member holds the primary's whole log; otherwise what is missing."""
        p = self.placement(space)
        if p is None:
            return "not placed"
        pv = await self.view(p.primary, space)
        if pv is None:
            return f"primary {p.primary} does not answer"
        if pv.get("role") != "primary" or pv.get("epoch") != p.epoch:
            return f"{p.primary} is {pv.get('role')} at epoch {pv.get('epoch')}, not primary"
        if pv.get("write_lease") is not True:
            return f"primary {p.primary} holds no write lease"
        last = pv.get("last_sequence")
        for r in p.replicas:
            rv = await self.view(r, space)
            acked = pv.get("replicas", {}).get(r, {}).get("acked_sequence")
            if rv is None:
                return f"replica {r} does not answer"
            if (rv.get("role"), rv.get("epoch")) != ("replica", p.epoch):
                return f"{r} is {rv.get('role')} at epoch {rv.get('epoch')}"
            if rv.get("last_sequence") != last or acked != last:
                return (
                    f"replica {r} at {rv.get('last_sequence')} (acked {acked}), primary at {last}"
                )
        return None

    async def wait_for(
        self, cond: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.1
    ) -> float:
        t0 = time.monotonic()
        while True:
            got = cond()
            if asyncio.iscoroutine(got):
                got = await got
            if got:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                said = [str(e) for e in self.events[-5:]]
                raise AssertionError(f"{what}: not within {timeout} s; last events {said}")
            await asyncio.sleep(interval)
