"""Starting a sidecar process: its command line, free ports, and dying with its parent.

The one copy, used by local mode (`engram-replication up`), the benchmark and the tests. A
sidecar is always started as `python -m engram_sidecar`, so nothing here imports the data plane.

`SidecarProcess` is the one process harness of the integration tests and the benchmark: a node's
settings, log and process, its readiness wait, and a stop bounded at every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import aiohttp

from engram_contract.assignment import Member
from engram_contract.ids import NodeName
from engram_contract.tokens import parse_keys

HOST: Final = "127.0.0.1"

_handed_out: set[int] = set()
_LIBC = ctypes.CDLL(None, use_errno=True)  # the running process's libc (Linux)
_PR_SET_PDEATHSIG: Final = 1


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nothing listens on now (and that this process hasn't handed
    out before: two calls in a row never return the same port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def stable_port(host: str = HOST, *, rng: random.Random | None = None) -> int:
    """A port for a listener restarted on the same port, *below* the kernel's ephemeral range.

    Outgoing connections and bind-to-0 listeners take ephemeral ports: a node port from that
    range could be taken by one of them while the node is down, and its restart would fail.
    Checked bindable now, and never handed out twice by this process.
    """
    low, _ = _ephemeral_range()
    lo, hi = (10000, low - 1) if low > 12000 else (low // 2, low - 1)
    pick = rng or random.Random()
    for _ in range(1000):
        port = pick.randint(lo, hi)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {lo}..{hi}")


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the parent goes away.

    Only one libc call, resolved before the fork: nothing that could take a lock. Linux only.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class SidecarSpec:
    """What a sidecar process is started with. `flags` are further settings, by their name in
    the sidecar's config (`heartbeat_interval` becomes `--heartbeat-interval`)."""

    node: str
    data_dir: Path
    http_port: int
    replication_port: int
    secret_file: Path
    flags: Mapping[str, object] = field(default_factory=dict)
    python: str = sys.executable

    def command(self) -> list[str]:
        args = [
            self.python,
            "-m",
            "engram_sidecar",
            "--node",
            self.node,
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            str(self.http_port),
            "--replication-port",
            str(self.replication_port),
            "--secret-file",
            str(self.secret_file),
        ]
        for k, v in self.flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        return args


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ENGRAM_* settings (a child takes its settings from
    its command line only), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def spawn(
    spec: SidecarSpec,
    log: IO[bytes],
    *,
    env: Mapping[str, str] | None = None,
    tie_to_parent: bool = True,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the sidecar `spec` describes, its output appended to `log`.

    `tie_to_parent`: SIGKILL it when this process dies (tests, the benchmark), so nothing is
    left running after a crash. `new_session`: its own process group, so a Ctrl-C in the
    terminal reaches only the supervisor (local mode), which stops the nodes in order.
    """
    spec.data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        spec.command(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else clean_env(),
        preexec_fn=die_with_parent if tie_to_parent else None,  # noqa: PLW1509 - one prctl call
        start_new_session=new_session,
    )


# ---- a sidecar run by a harness: the integration tests and the benchmark -----------------------

READY_TIMEOUT: Final = 20.0  # start-up of one node: imports, WAL recovery, listeners
STOP_TIMEOUT: Final = 10.0  # SIGTERM to exit before the caller escalates
LOG_TAIL_LINES: Final = 40


class SidecarStartError(RuntimeError):
    """A sidecar exited during start-up or did not answer `/healthz` in time; the message ends
    with the tail of its log."""


def write_secret(path: Path, secret: str | None = None) -> Path:
    """The secret file a cluster's sidecars share (replication HMAC key and admin token), mode
    0600: `secret`, else a new random one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write((secret or secrets.token_hex(24)) + "\n")
    path.chmod(0o600)  # a file that existed keeps its mode through os.open
    return path


@dataclass
class SidecarProcess:
    """One sidecar a harness runs on `HOST` (the integration tests' `Node`, the benchmark's
    `BenchNode`): what it starts with, its log file, and its process once started.

    `flags` are further settings by config name, as in `SidecarSpec`. The ports may change
    before the node first comes up (`wait_ready_or_new_ports`), never after: assignments name
    them. Every wait is bounded; escalation past SIGTERM (SIGKILL, a stack dump) is the
    caller's choice.
    """

    name: str
    data_dir: Path
    http_port: int
    replication_port: int
    secret_file: Path
    log_path: Path
    flags: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        """host:port of its replication listener."""
        return f"{HOST}:{self.replication_port}"

    @property
    def http(self) -> str:
        """host:port of its HTTP API."""
        return f"{HOST}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def token(self) -> str:
        """The admin bearer token it accepts: its secret file's (first) key."""
        return parse_keys(self.secret_file.read_bytes())[0].decode()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessLookupError(f"node {self.name} was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def member(self, *, address: str | None = None) -> Member:
        """This node in an assignment; `address` replaces its replication listener (a proxy)."""
        return Member(NodeName(self.name), address or self.address, self.http)

    def spec(self) -> SidecarSpec:
        return SidecarSpec(
            node=self.name,
            data_dir=self.data_dir,
            http_port=self.http_port,
            replication_port=self.replication_port,
            secret_file=self.secret_file,
            flags=self.flags,
        )

    def command(self) -> list[str]:
        return self.spec().command()

    def spawn(self, *, env: Mapping[str, str] | None = None) -> None:
        """Start it (tied to this process), its output appended to `log_path` after a line
        that says which start this is and its command."""
        if self.running():
            raise RuntimeError(f"node {self.name} is already running (pid {self.pid})")
        self.starts += 1
        spec = self.spec()
        with self.log_path.open("ab") as log:
            log.write(f"==== start #{self.starts}: {' '.join(spec.command())}\n".encode())
            log.flush()
            self.proc = spawn(spec, log, env=env)

    async def wait_ready(self, session: aiohttp.ClientSession, *, timeout: float) -> None:
        """Until `/healthz` answers 200 (the node serves HTTP only once its replication
        listener is bound; `/readyz` waits for its spaces to catch up too, which a harness
        that restarts a node may not want); SidecarStartError if the process exits or
        `timeout` passes first."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running():
                code = self.proc.returncode if self.proc is not None else None
                raise SidecarStartError(
                    f"node {self.name} exited with code {code} during start-up:\n{self.log_tail()}"
                )
            try:
                async with session.get(
                    self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=1.0)
                ) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                last = repr(err)
            await asyncio.sleep(0.05)
        raise SidecarStartError(
            f"node {self.name} not ready within {timeout} s ({last}):\n{self.log_tail()}"
        )

    async def wait_ready_or_new_ports(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        attempts: int = 3,
    ) -> None:
        """`wait_ready` after a `spawn`; on the node's first start only, start it again on new
        ports when one was taken between `free_port` and the bind (other processes on this
        machine pick ports too)."""
        first = self.starts
        for attempt in range(attempts):
            try:
                await self.wait_ready(session, timeout=timeout)
                return
            except SidecarStartError as err:
                taken = "address already in use" in str(err).lower()
                if not taken or first > 1 or attempt == attempts - 1:
                    raise
            self.http_port, self.replication_port = free_port(), free_port()
            self.spawn(env=env)

    async def terminate(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM (after a SIGCONT: a stopped process can't act on it), then wait up to
        `timeout` for the exit. True when it is gone; False when it is still running."""
        p = self.proc
        if p is None or p.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
        deadline = time.monotonic() + timeout
        while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # a child's exit has no event to await without a thread
        return p.poll() is not None

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGKILL (synchronous: safe in finalizers), and reap the process, bounded."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)  # a stopped process dies either way
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_text().splitlines()[-lines:])
