"""Real sidecar processes on 127.0.0.1 for the benchmarks, and what the scenarios share.

`BenchCluster` starts sidecars (`engram_contract.launcher`: the command line local mode runs,
free ports, dying with the bench), waits for ``/readyz``, sends assignments as a control plane
does (`engram_contract.client.SidecarClient`, the document from `engram_contract.assignment`),
renews write leases (``POST /v1/lease`` every 0.25 s, through a lean client: see `_lease_loop`),
and stops everything at the end, SIGKILL as the fallback.

The process harness itself (`SidecarProcess`) is the one the integration tests use too; the
benchmarks don't import the tests. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from engram_bench.leanhttp import HttpError, LeanHttp
from engram_contract import writes
from engram_contract.assignment import AckPolicy, assignment_document
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import SpaceId
from engram_contract.launcher import (
    HOST,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    SidecarProcess,
    SidecarStartError,
    free_port,
    write_secret,
)

LEASE_EVERY: Final = 0.25  # the local control plane's heartbeat cadence
LEASE_SECONDS: Final = 1.5  # the write lease each renewal (and each assignment) grants


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


def binary_body(entries: int, payload_bytes: int = 100, tag: str = "b") -> bytes:
    """The same payloads as `ndjson_body`, as a binary write body (`engram_contract.writes`,
    sent with `Content-Type: writes.CONTENT_TYPE`): the two paths store the same bytes."""
    return writes.encode_body(ndjson_body(entries, payload_bytes, tag).splitlines())


class BenchError(RuntimeError):
    """A harness wait or request failed; the message says what was expected and what was seen."""


@dataclass
class BenchNode(SidecarProcess):
    """A sidecar of a benchmark: the launcher's process harness, plus what the scenarios read."""

    @property
    def fsync(self) -> str:
        return self.flags.get("fsync", "always")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    async def stop(self) -> None:
        """SIGTERM; SIGKILL after STOP_TIMEOUT."""
        if not await self.terminate(STOP_TIMEOUT):
            self.kill()


class BenchCluster:
    """Sidecar processes under `root`, plus a control-plane-like lease renewer. Async context."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file = write_secret(root / "secret")
        self.nodes: dict[str, BenchNode] = {}
        # space -> (primary, epoch): what the lease renewer vouches for.
        self.leads: dict[str, tuple[str, int]] = {}
        # Assignments go through the control plane's own client; the lease renewer speaks for
        # the same control plane (one id, one send clock), so the nodes judge both grants alike.
        self.control = SidecarClient(self.token, probe_timeout=1.0, lease_seconds=LEASE_SECONDS)
        self.control_plane_id = self.control.control_plane
        self._session: aiohttp.ClientSession | None = None
        self._lean: dict[str, LeanHttp] = {}
        self._lease_task: asyncio.Task[None] | None = None
        self._closing = False

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
        try:
            await asyncio.gather(
                *(n.wait_ready_or_new_ports(self.session, timeout=READY_TIMEOUT) for n in chosen)
            )
        except SidecarStartError as err:
            raise BenchError(str(err)) from None
        if self._lease_task is None:
            self._lease_task = asyncio.create_task(self._lease_loop())

    async def wait_ready(self, node: BenchNode) -> None:
        try:
            await node.wait_ready(self.session, timeout=READY_TIMEOUT)
        except SidecarStartError as err:
            raise BenchError(str(err)) from None

    async def close(self) -> None:
        if self._lease_task is not None:
            self._closing = True  # the loop also ends by itself, should a cancel get lost
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
            self._lease_task = None
        for lean in self._lean.values():
            await lean.close()
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))
        await self.control.close()
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

    async def assign(
        self,
        space: str,
        primary: str,
        replicas: Sequence[str],
        *,
        ack_policy: AckPolicy = "async",
        epoch: int = 1,
        compression: bool = False,
        via: Mapping[str, str] | None = None,
    ) -> None:
        """PUT the assignment to every member; raises unless each answers 200.

        `via` maps a replica's name to the host:port the primary should dial instead of the
        replica's own listener (a delay proxy in front of it).
        """
        members = [
            self.nodes[primary].member(),
            *(self.nodes[r].member(address=(via or {}).get(r)) for r in replicas),
        ]
        doc = assignment_document(epoch, members, ack_policy=ack_policy, compression=compression)
        for n in (primary, *replicas):
            await self.put_assignment(space, n, doc)
        self.leads[space] = (primary, epoch)

    async def put_assignment(self, space: str, node: str, doc: Mapping[str, object]) -> None:
        """PUT one assignment document to one node, as the control plane does (with its send
        stamp: the document grants a write lease); raises unless the node answers 200."""
        try:
            await self.control.assign(
                self.nodes[node].http, SpaceId(space), doc, sent_mono_ns=time.monotonic_ns()
            )
        except SidecarError as err:
            raise BenchError(f"assignment of {space} to {node}: {err}") from None

    async def _lease_loop(self) -> None:
        """Renew every primary's write lease, as the control plane's heartbeat does.

        Through lean clients of its own, answers unparsed: the bench process also measures
        latencies, and an aiohttp round trip plus a JSON parse of a node's whole status every
        0.25 s would show up in them.
        """
        lean: dict[str, LeanHttp] = {}
        try:
            while not self._closing:
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
                            "lease_seconds": LEASE_SECONDS,
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
