"""A small process harness for the benchmarks: real sidecars on 127.0.0.1, and raw baselines.

`BenchCluster` starts sidecars as ``sys.executable -m engram_sidecar ...`` (the same command the
local control plane runs), waits for ``/readyz``, sends assignments, renews write leases the way a
control plane does (``POST /v1/lease`` every 0.25 s), and stops everything at the end, SIGKILL as
the fallback. Node processes get ``PR_SET_PDEATHSIG`` so a bench that dies leaves nothing behind.

The raw helpers (`RawProcess`) are the baselines' other end: plain asyncio TCP servers in their own
processes that read 64-byte-header frames (body length at offset 52, as on the wire) and answer
each with 64 bytes, directly (`sink`) or after forwarding it to one or more sinks (`relay`).

The benchmarks must not import the tests, so this is deliberately a small cousin of
tests/integration/cluster.py, not a copy of it. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

HOST: Final = "127.0.0.1"
READY_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
LEASE_EVERY: Final = 0.25  # the local control plane's heartbeat cadence

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG: Final = 1
_handed_out: set[int] = set()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the bench process goes away."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


die_with_parent = _die_with_parent  # for other modules' preexec_fn


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (and not handed out before)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def bench_dir() -> Path:
    """Where benchmark data goes: $ENGRAM_BENCH_DIR, else the current directory (a real disk;
    never /dev/shm, where fsync costs nothing)."""
    base = Path(os.environ.get("ENGRAM_BENCH_DIR") or Path.cwd())
    base.mkdir(parents=True, exist_ok=True)
    return base


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status), 0 when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ndjson_body(entries: int, payload_bytes: int = 100, tag: str = "b") -> bytes:
    """`entries` NDJSON lines of exactly `payload_bytes` bytes each (the stored payload size)."""
    lines = []
    for i in range(entries):
        head = f'{{"t":"{tag}","i":{i},"pad":"'
        pad = payload_bytes - len(head) - 2
        if pad < 0:
            raise ValueError(f"payload_bytes {payload_bytes} too small")
        lines.append(head + "x" * pad + '"}')
    return ("\n".join(lines) + "\n").encode()


class BenchError(RuntimeError):
    """A harness wait or request failed; the message says what was expected and what was seen."""


@dataclass
class BenchNode:
    name: str
    data_dir: Path
    http_port: int
    replication_port: int
    secret_file: Path
    log_path: Path
    flags: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.replication_port}"

    @property
    def http(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"node {self.name} is not running")
        return self.proc.pid

    @property
    def fsync(self) -> str:
        return self.flags.get("fsync", "always")

    def member(self) -> dict[str, str]:
        return {"node": self.name, "address": self.address, "http": self.http}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "engram_sidecar",
            "--node",
            self.name,
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
            args += ["--" + k.replace("_", "-"), v]
        return args

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, nothing else
            )

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


class BenchCluster:
    """Sidecar processes under `root`, plus a control-plane-like lease renewer. Async context."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file = root / "secret"
        self.secret_file.write_text(secrets.token_hex(24) + "\n")
        self.secret_file.chmod(0o600)
        self.nodes: dict[str, BenchNode] = {}
        # space -> (primary, epoch): what the lease renewer vouches for.
        self.leads: dict[str, tuple[str, int]] = {}
        self.control_plane_id = f"bench-{os.getpid()}"
        self._session: aiohttp.ClientSession | None = None
        self._lean: dict[str, LeanHttp] = {}
        self._lease_task: asyncio.Task[None] | None = None

    @property
    def secret(self) -> bytes:
        return self.secret_file.read_bytes().strip()

    @property
    def token(self) -> str:
        return self.secret_file.read_text().strip()

    async def __aenter__(self) -> BenchCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getitem__(self, name: str) -> BenchNode:
        return self.nodes[name]

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512),
                timeout=aiohttp.ClientTimeout(total=15.0),
            )
        return self._session

    def http(self, node: str) -> LeanHttp:
        """The load generators' lean client to `node`'s HTTP API (one pool per node)."""
        n = self.nodes[node]
        lean = self._lean.get(node)
        if lean is None or lean.port != n.http_port:
            lean = self._lean[node] = LeanHttp(HOST, n.http_port)
        return lean

    def add_node(self, name: str, **flags: object) -> BenchNode:
        merged = {"log_level": "WARNING"}
        merged.update({k: str(v) for k, v in flags.items()})
        node = BenchNode(
            name=name,
            data_dir=self.root / name,
            http_port=free_port(),
            replication_port=free_port(),
            secret_file=self.secret_file,
            log_path=self.root / f"{name}.log",
            flags=merged,
        )
        self.nodes[name] = node
        return node

    async def start(self, *names: str) -> None:
        chosen = [self.nodes[n] for n in names] if names else list(self.nodes.values())
        for n in chosen:
            n.spawn()
        await asyncio.gather(*(self._ready(n) for n in chosen))
        if self._lease_task is None:
            self._lease_task = asyncio.create_task(self._lease_loop())

    async def _ready(self, node: BenchNode) -> None:
        for attempt in range(3):
            try:
                await self.wait_ready(node)
                return
            except BenchError as err:
                if "address already in use" not in str(err).lower() or attempt == 2:
                    raise
            node.http_port, node.replication_port = free_port(), free_port()
            node.spawn()

    async def wait_ready(self, node: BenchNode) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not node.running():
                raise BenchError(f"node {node.name} exited during start-up:\n{node.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(
                    node.url + "/readyz", timeout=aiohttp.ClientTimeout(total=1.0)
                ) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise BenchError(f"node {node.name} not ready in {READY_TIMEOUT} s:\n{node.log_tail()}")

    async def close(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
            self._lease_task = None
        for lean in self._lean.values():
            await lean.close()
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))
        if self._session is not None and not self._session.closed:
            await self._session.close()

    # ---- HTTP ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        node: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        body = data
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method,
            self.nodes[node].url + path,
            data=body,
            headers=hdrs,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            raw = await r.read()
            try:
                return r.status, json.loads(raw) if raw else None
            except ValueError:
                return r.status, raw.decode(errors="replace")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def grant_auth(self) -> dict[str, str]:
        """Auth plus the control plane's send stamp: an assignment so sent grants a lease."""
        return {
            **self.auth(),
            "X-Engram-Control-Plane": self.control_plane_id,
            "X-Engram-Sent-Mono-Ns": str(time.monotonic_ns()),
        }

    async def assign(
        self,
        space: str,
        primary: str,
        replicas: Sequence[str],
        *,
        ack_policy: str = "async",
        epoch: int = 1,
        compression: bool = False,
        via: Mapping[str, str] | None = None,
    ) -> None:
        """PUT the assignment to every member; raises unless each answers 200.

        `via` maps a replica's name to the host:port the primary should dial instead of the
        replica's own listener (a delay proxy in front of it).
        """
        reps = []
        for r in replicas:
            m = self.nodes[r].member()
            if via and r in via:
                m["address"] = via[r]
            reps.append(m)
        doc: dict[str, Any] = {
            "epoch": epoch,
            "primary": self.nodes[primary].member(),
            "replicas": reps,
            "ackPolicy": ack_policy,
        }
        if compression:
            doc["compression"] = True
        for n in (primary, *replicas):
            status, body = await self.request(
                "PUT", n, f"/v1/spaces/{space}/assignment", json_body=doc, headers=self.grant_auth()
            )
            if status != 200:
                raise BenchError(f"assignment of {space} to {n}: HTTP {status} {body}")
        self.leads[space] = (primary, epoch)

    async def assign_raw(self, space: str, node: str, doc: Mapping[str, Any]) -> None:
        status, body = await self.request(
            "PUT", node, f"/v1/spaces/{space}/assignment", json_body=doc, headers=self.grant_auth()
        )
        if status != 200:
            raise BenchError(f"assignment of {space} to {node}: HTTP {status} {body}")

    async def _lease_loop(self) -> None:
        """Renew every primary's write lease, as the control plane's heartbeat does.

        Through lean clients of its own, answers unparsed: the bench process also measures
        latencies, and an aiohttp round trip plus a JSON parse of a node's whole status every
        0.25 s would show up in them.
        """
        lean: dict[str, LeanHttp] = {}
        try:
            while True:
                by_node: dict[str, dict[str, int]] = {}
                for space, (primary, epoch) in self.leads.items():
                    by_node.setdefault(primary, {})[space] = epoch
                for node, epochs in by_node.items():
                    n = self.nodes[node]
                    if not n.running():
                        continue
                    client = lean.get(node)
                    if client is None or client.port != n.http_port:
                        client = lean[node] = LeanHttp(HOST, n.http_port)
                    body = json.dumps(
                        {
                            "control_plane": self.control_plane_id,
                            "sent_mono_ns": time.monotonic_ns(),
                            "lease_seconds": 1.5,
                            "epochs": epochs,
                        }
                    )
                    with contextlib.suppress(HttpError, OSError, TimeoutError):
                        await client.request(
                            "POST",
                            "/v1/lease",
                            body.encode(),
                            content_type="application/json",
                            headers=self.auth(),
                            timeout=1.0,
                        )
                await asyncio.sleep(LEASE_EVERY)
        finally:
            for client in lean.values():
                await client.close()

    # ---- process control and metrics ----------------------------------------------------------

    def pause(self, name: str) -> None:
        """SIGSTOP the node: its sockets stay open, it reads and answers nothing."""
        os.kill(self.nodes[name].pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        os.kill(self.nodes[name].pid, signal.SIGCONT)

    async def stop_node(self, name: str) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT): the node shuts down; its data stays."""
        await self.nodes[name].stop()

    async def restart(self, name: str) -> None:
        """Start a stopped node again on the same ports and data directory; wait for /readyz."""
        node = self.nodes[name]
        await node.stop()
        node.spawn()
        await self.wait_ready(node)

    async def metric(self, node: str, name: str, labels: Mapping[str, str] | None = None) -> float:
        """One sample from the node's /metrics (Prometheus text), summed over series matching
        `labels`; 0.0 when there is none yet."""
        async with self.session.get(
            self.nodes[node].url + "/metrics", timeout=aiohttp.ClientTimeout(total=5.0)
        ) as r:
            status = r.status
            text = await r.text()
        if status != 200:
            raise BenchError(f"GET /metrics on {node}: HTTP {status}")
        return metric_value(text, name, labels or {})

    async def space_view(self, node: str, space: str) -> dict[str, Any]:
        status, body = await self.request("GET", node, f"/v1/spaces/{space}", timeout=5.0)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"GET space {space} on {node}: HTTP {status} {body}")
        return body

    async def wait_applied(
        self, space: str, replicas: Sequence[str], sequence: int, *, timeout: float
    ) -> float:
        """Poll (every 10 ms) until every replica applied `sequence`; returns perf_counter()."""
        deadline = time.monotonic() + timeout
        pending = set(replicas)
        while True:
            for r in list(pending):
                with contextlib.suppress(BenchError, aiohttp.ClientError, TimeoutError):
                    v = await self.space_view(r, space)
                    # With fsync none nothing is ever fsynced, so applied_sequence (durable)
                    # stays put; what the replica holds (and acks) is its last_sequence.
                    key = "last_sequence" if self.nodes[r].fsync == "none" else "applied_sequence"
                    if int(v[key]) >= sequence:
                        pending.discard(r)
            if not pending:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"replicas {sorted(pending)} of {space} did not apply {sequence} "
                    f"within {timeout} s"
                )
            await asyncio.sleep(0.01)

    async def wait_streaming(self, space: str, primary: str, *, timeout: float = 15.0) -> None:
        """Until the primary reports every replica connected (the stream is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(BenchError, aiohttp.ClientError, TimeoutError):
                reps = (await self.space_view(primary, space)).get("replicas", {})
                if reps and all(r["connected"] for r in reps.values()):
                    return
            await asyncio.sleep(0.02)
        raise BenchError(f"replicas of {space} never connected to {primary}")


def metric_value(text: str, name: str, labels: Mapping[str, str]) -> float:
    """Sum of the samples of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, brace, rest = head.partition("{")
        if metric != name:
            continue
        have: dict[str, str] = {}
        if brace:
            for part in rest.rstrip("}").split(","):
                k, eq, v = part.partition("=")
                if eq:
                    have[k.strip()] = v.strip().strip('"')
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


# ---- a lean HTTP/1.1 client for load generation --------------------------------------------------


class HttpError(Exception):
    """The server answered something this client does not parse, or closed the connection."""


class LeanHttp:
    """A minimal HTTP/1.1 keep-alive client to one host:port, for the load generators.

    The sidecar's HTTP server is what the benchmarks measure; the client runs on the same few
    cores, so every microsecond it spends is stolen from the server. aiohttp's client costs
    several times more per request than writing the request line and reading a Content-Length
    response by hand, which is all a benchmark needs. One request per connection at a time;
    idle connections are reused, more are opened on demand (the time to open one counts against
    the request that needed it), up to `max_connections`.
    """

    def __init__(self, host: str, port: int, *, max_connections: int = 256) -> None:
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: set[asyncio.StreamWriter] = set()
        # A bound on open sockets (file descriptors): past it, requests wait for a connection,
        # and that wait counts in their latency like any other.
        self._slots = asyncio.Semaphore(max_connections)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/x-ndjson",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        async def bounded() -> tuple[int, bytes]:
            async with self._slots:
                return await self._request(method, path, body, content_type, headers or {})

        return await asyncio.wait_for(bounded(), timeout)

    async def _request(
        self, method: str, path: str, body: bytes, content_type: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        if self._idle:
            r, w = self._idle.pop()
        else:
            r, w = await asyncio.open_connection(self.host, self.port)
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._all.add(w)
        ok = False
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            if body:
                head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            w.write(head.encode() + b"\r\n" + body)
            raw = await r.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length, close = None, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                key = name.strip().lower()
                if key == "content-length":
                    length = int(value)
                elif key == "connection" and value.strip().lower() == "close":
                    close = True
                elif key == "transfer-encoding":
                    raise HttpError(f"unsupported Transfer-Encoding: {value.strip()}")
            if length is None:
                raise HttpError("response without Content-Length")
            data = await r.readexactly(length)
            ok = not close
            return status, data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise HttpError(f"{type(err).__name__}: {err}") from err
        finally:
            if ok:
                self._idle.append((r, w))
            else:
                self._all.discard(w)
                w.close()

    async def close(self) -> None:
        for w in self._all:
            w.close()
        self._all.clear()
        self._idle.clear()


# ---- raw asyncio TCP processes: the baselines' far end ------------------------------------------

_RAW_SCRIPT: Final = r"""
import asyncio, struct, sys
HDR = 64
ACK = bytes(64)
BODY_LEN = struct.Struct("<I")

async def read_frame(r):
    head = await r.readexactly(HDR)
    n = BODY_LEN.unpack_from(head, 52)[0]
    return head + (await r.readexactly(n) if n else b"")

async def sink(r, w):
    w.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY
    try:
        while True:
            await read_frame(r)
            w.write(ACK)
            if w.transport.get_write_buffer_size() > 65536:
                await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()

def relay_to(ports):
    async def relay(r, w):
        w.get_extra_info("socket").setsockopt(6, 1, 1)
        outs = [await asyncio.open_connection("127.0.0.1", p) for p in ports]
        for _, ow in outs:
            ow.get_extra_info("socket").setsockopt(6, 1, 1)
        counts = [0] * len(outs)
        acked = 0

        async def acks(i, orr):
            nonlocal acked
            while True:
                await orr.readexactly(HDR)
                counts[i] += 1
                low = min(counts)
                while acked < low:
                    w.write(ACK)
                    acked += 1

        tasks = [asyncio.create_task(acks(i, o[0])) for i, o in enumerate(outs)]
        try:
            while True:
                frame = await read_frame(r)
                for _, ow in outs:
                    ow.write(frame)
                for _, ow in outs:
                    if ow.transport.get_write_buffer_size() > 262144:
                        await ow.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for t in tasks:
            t.cancel()
        for _, ow in outs:
            ow.close()
        w.close()
    return relay

def delay_to(port, delay_us):
    delay = delay_us / 1e6

    async def pump(src, dst, loop):
        # One FIFO per direction and one writer task: every chunk leaves `delay` after it
        # arrived, in order (timer heaps do not order equal deadlines).
        queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                if data is None:
                    dst.close()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                if dst.transport.get_write_buffer_size() > 4194304:
                    await dst.drain()

        task = asyncio.create_task(deliver())
        try:
            while True:
                data = await src.read(262144)
                if not data:
                    break
                queue.put_nowait((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay, None))
        try:
            await task
        except (ConnectionError, OSError):
            pass

    async def proxy(r, w):
        w.get_extra_info("socket").setsockopt(6, 1, 1)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            w.close()
            return
        uw.get_extra_info("socket").setsockopt(6, 1, 1)
        loop = asyncio.get_running_loop()
        await asyncio.gather(pump(r, uw, loop), pump(ur, w, loop))
    return proxy

async def main():
    role = sys.argv[1]
    if role == "sink":
        handler = sink
    elif role == "delay":
        handler = delay_to(int(sys.argv[2]), int(sys.argv[3]))
    else:
        handler = relay_to([int(p) for p in sys.argv[2:]])
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class RawProcess:
    """One raw helper process: `sink` (answers each frame with 64 bytes), `relay` (forwards each
    frame to every sink port and answers once all of them have), or `delay` (a TCP proxy to the
    port given first that holds every chunk, both ways, for the microseconds given second:
    ``RawProcess("delay", target_port, delay_us)``)."""

    def __init__(self, role: str, *ports: int) -> None:
        self.role = role
        self.ports = ports
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> RawProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RAW_SCRIPT,
            self.role,
            *map(str, self.ports),
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), READY_TIMEOUT)
        if not line.strip():
            raise BenchError(f"raw {self.role} process did not start")
        self.port = int(line)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc is not None else 0
