"""A harness of real sidecar processes on 127.0.0.1 for the integration tests.

`Cluster` starts each node with the launcher's process harness (`engram_contract.launcher`:
the command line, free ports, the shared secret, dying with the test process), waits for
``/readyz``, sends assignments (the document from `engram_contract.assignment`), grants write
leases as a control plane does (`engram_contract.client.SidecarClient`), writes entries and reads
views and metrics over HTTP (aiohttp), and stops, kills, pauses (SIGSTOP), resumes (SIGCONT) or
restarts nodes. Each node's stdout and stderr go to ``<tmp>/<node>.log``; `Cluster.log_tails` is
printed when a test fails.

Every wait is bounded: each HTTP request has a total timeout, each poll loop a deadline, and each
process stop falls back to SIGKILL. Node processes also get ``PR_SET_PDEATHSIG`` (SIGKILL), so a
test run that dies (timeout, crash) never leaves sidecars behind.
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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from engram_contract.assignment import AckPolicy, assignment_document
from engram_contract.client import SidecarClient, SidecarError
from engram_contract.formats.entry import Entry
from engram_contract.ids import SpaceId
from engram_contract.launcher import (
    HOST,  # noqa: F401 - other test modules import it from here
    LOG_TAIL_LINES,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    SidecarProcess,
    SidecarStartError,
    clean_env,
    die_with_parent,
    free_port,
    write_secret,
)
from engram_sidecar.log.verify import Problem, dump, verify_space

REQUEST_TIMEOUT: Final = 15.0  # default bound on one HTTP request
LEASE_EVERY: Final = 0.2  # seconds between the harness's write-lease grants
LEASE_SECONDS: Final = 1.5  # the write lease each grant offers

# Settings that make failure detection and recovery fast enough for tests (all are flags).
FAST_FLAGS: Final[Mapping[str, str]] = {
    "backoff_steps": "0.05,0.1,0.2,0.4",
    "heartbeat_interval": "0.1",
    "lag_monitor_interval": "0.2",
    "log_level": "INFO",
    # Never pick up a pod's service account: these nodes are local processes.
    "kube_enabled": "false",
    # The harness plays a control plane that moves no spaces on SIGTERM: stop at once.
    "drain_timeout": "0",
}

T = TypeVar("T")

# Other test modules take the launcher's helpers from here (HOST, free_port, write_secret, and
# this for the processes they start themselves).
_die_with_parent = die_with_parent


class IntegrationError(AssertionError):
    """A harness wait or check failed; the message says what was expected and what was seen."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: Any  # parsed JSON, or the text when the body is not JSON
    elapsed: float

    def __str__(self) -> str:
        return f"HTTP {self.status} in {self.elapsed:.3f} s: {self.body!r}"


@dataclass
class Node(SidecarProcess):
    """A sidecar of one test: the launcher's process harness, plus signals, a stop that dumps
    the stacks of a node that ignores SIGTERM, and its WAL on disk."""

    forced_kills: int = 0  # stops where SIGTERM was not honoured in time

    def spawn(self, *, env: Mapping[str, str] | None = None) -> None:
        if self.running():
            raise IntegrationError(f"node {self.name} is already running (pid {self.pid})")
        # PYTHONFAULTHANDLER: a SIGABRT (see `stop`) dumps every thread's stack to the log.
        super().spawn(env=env or clean_env({"PYTHONFAULTHANDLER": "1"}))

    def send(self, sig: signal.Signals) -> None:
        if not self.running():
            raise IntegrationError(f"node {self.name} is not running; cannot send {sig.name}")
        os.kill(self.pid, sig)

    def pause(self) -> None:
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait up to `timeout`; SIGKILL after that. Returns the exit code."""
        if self.proc is None:
            return None
        if not await self.terminate(timeout):
            # Hung on shutdown: SIGABRT makes faulthandler dump every thread's stack to the
            # log (PYTHONFAULTHANDLER is set), then SIGKILL.
            self.forced_kills += 1
            with self.log_path.open("a") as log:
                log.write(f"==== harness: no exit {timeout} s after SIGTERM; SIGABRT\n")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2.0)
            self.kill()
        return self.proc.returncode

    # ---- the node's WAL on disk --------------------------------------------------------------

    def space_dir(self, space: str) -> Path:
        return self.data_dir / space

    def wal_segments(self, space: str) -> dict[str, bytes]:
        """Segment file name -> bytes, for every segment under <data>/<space>/wal/."""
        wal = self.space_dir(space) / "wal"
        if not wal.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in sorted(wal.iterdir()) if p.suffix == ".wal"}

    def wal_bytes(self, space: str) -> bytes:
        return b"".join(self.wal_segments(space).values())

    def wal_entries(self, space: str, *, torn_tail_ok: bool = False) -> list[Entry]:
        """Every entry of the on-disk WAL, in order; raises on the first problem found.

        With `torn_tail_ok`, a problem in the last segment ends the list instead: a process
        SIGKILLed inside write(2) can leave part of an entry, which recovery cuts at restart.
        """
        out: list[Entry] = []
        segments = sorted((self.space_dir(space) / "wal").glob("*.wal"))
        for path, _offset, item in dump(self.space_dir(space)):
            if isinstance(item, Problem):
                if torn_tail_ok and segments and Path(path) == segments[-1]:
                    break
                raise IntegrationError(f"node {self.name}, space {space}: {item}")
            out.append(item)
        return out


class Cluster:
    """Nodes of one test, all under `root` (the test's tmp dir). Use as an async context."""

    def __init__(self, root: Path, *, secret: str | None = None) -> None:
        self.root = root
        self.secret_file = write_secret(root / "secret", secret)
        self.nodes: dict[str, Node] = {}
        self._session: aiohttp.ClientSession | None = None
        # The harness is the control plane: it grants write leases to the primaries it assigned
        # (node -> {space: epoch}), as the real one does, every LEASE_EVERY seconds.
        self.leads: dict[str, dict[str, int]] = {}
        self.lease_paused: set[str] = set()  # nodes the "control plane" can't reach
        self.control_plane_id = f"test-{os.getpid()}-{id(self)}"
        self._lease_tasks: dict[str, asyncio.Task[None]] = {}
        self._controls: dict[str, SidecarClient] = {}  # admin token -> the control plane's client
        self.assignments: dict[str, dict[str, Any]] = {}  # space -> the last one a node took

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, force_close=False),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            )
        return self._session

    # ---- nodes ---------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        secret_file: Path | None = None,
        data_dir: Path | None = None,
        fast: bool = True,
        **flags: object,
    ) -> Node:
        """Define a node (not started). `flags` are config fields (`lag_warning_seconds=0.5`)."""
        if name in self.nodes:
            raise IntegrationError(f"node {name} defined twice")
        merged: dict[str, str] = dict(FAST_FLAGS) if fast else {}
        merged.update({k: str(v) for k, v in flags.items()})
        node = Node(
            name=name,
            data_dir=data_dir or self.root / name / "data",
            http_port=free_port(),
            replication_port=free_port(),
            secret_file=secret_file or self.secret_file,
            log_path=self.root / f"{name}.log",
            flags=merged,
        )
        node.data_dir.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = node
        return node

    async def start(
        self, *names: str, timeout: float = READY_TIMEOUT, reassert: bool = True
    ) -> None:
        """Spawn the named nodes (default: every defined node not running) and wait until ready.

        A node that led spaces before is re-asserted at a newer epoch once up (`reassert`), as
        the real control plane does: a restarted primary never leads its old epoch again
        (design-notes "Entries ship before they are durable")."""
        chosen = [self.nodes[n] for n in names] if names else list(self.nodes.values())
        chosen = [n for n in chosen if not n.running()]
        for n in chosen:
            n.spawn()
        try:
            # On a node's first start, a port taken between `free_port` and the bind (other
            # processes on this machine pick ports too) means a start on new ones.
            await asyncio.gather(
                *(n.wait_ready_or_new_ports(self.session, timeout=timeout) for n in chosen)
            )
        except SidecarStartError as err:
            raise IntegrationError(str(err)) from None
        if reassert:
            for n in chosen:
                await self.reassert(n.name)

    async def reassert(self, name: str) -> None:
        """Give `name` a newer epoch for every space it led (the control plane's
        `reconcile._reassert`): one above the epoch it accepted itself at start-up."""
        for space in sorted(self.leads.get(name, {})):
            doc = self.assignments.get(space)
            if doc is None:
                continue
            r = await self.request("GET", name, f"/v1/spaces/{space}")
            if r.status != 200 or not isinstance(r.body, dict):
                continue
            if r.body.get("fenced") is None:
                continue
            again = {**doc, "epoch": int(r.body.get("accepted_epoch", doc["epoch"])) + 1}
            members = [str(doc["primary"]["node"])]
            members += [str(m["node"]) for m in doc.get("replicas", [])]
            for m in members:
                if m in self.nodes and self.nodes[m].running():
                    await self.put_assignment(m, space, again)

    async def start_nodes(self, count: int, **flags: object) -> list[Node]:
        nodes = [self.add_node(f"n{i}", **flags) for i in range(count)]
        await self.start(*(n.name for n in nodes))
        return nodes

    async def wait_ready(self, name: str, *, timeout: float = READY_TIMEOUT) -> None:
        try:
            await self.nodes[name].wait_ready(self.session, timeout=timeout)
        except SidecarStartError as err:
            raise IntegrationError(str(err)) from None

    async def restart(self, name: str, *, timeout: float = READY_TIMEOUT) -> None:
        node = self.nodes[name]
        if node.running():
            await node.stop()
        await self.start(name, timeout=timeout)

    def kill_all(self) -> None:
        """Synchronous last resort (finalizers): SIGKILL every node still running."""
        for n in self.nodes.values():
            n.kill()

    async def close(self) -> None:
        for t in self._lease_tasks.values():
            t.cancel()
        await asyncio.gather(*self._lease_tasks.values(), return_exceptions=True)
        self._lease_tasks.clear()
        await asyncio.gather(*(n.stop() for n in self.nodes.values() if n.running()))
        for control in self._controls.values():
            await control.close()
        self._controls.clear()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def problems(self) -> list[str]:
        """Tracebacks logged by any node, and nodes that ignored SIGTERM (after `close`)."""
        out = []
        for n in self.nodes.values():
            text = n.log_text()
            if "Traceback (most recent call last)" in text:
                at = text.index("Traceback (most recent call last)")
                start = text.rfind("\n", 0, max(0, at - 1)) + 1
                out.append(f"{n.name} logged a traceback:\n{text[start : at + 2000]}")
            if n.forced_kills:
                out.append(f"{n.name} did not exit within {STOP_TIMEOUT} s of SIGTERM")
        return out

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for n in self.nodes.values():
            parts.append(f"----- {n.name} ({n.log_path}), last {lines} lines -----")
            parts.append(n.log_tail(lines))
        return "\n".join(parts)

    # ---- HTTP ----------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        name: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        node = self.nodes[name]
        hdrs = dict(headers or {})
        body: bytes | str | None = data
        if json_body is not None:
            body = json.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        t0 = time.perf_counter()
        async with self.session.request(
            method,
            node.url + path,
            data=body,
            headers=hdrs,
            params=params,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            raw = await r.read()
            status = r.status
        elapsed = time.perf_counter() - t0
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Response(status, parsed, elapsed)

    async def assign(
        self,
        space: str,
        primary: str,
        replicas: Sequence[str],
        *,
        epoch: int = 1,
        ack_policy: AckPolicy = "async",
        compression: bool = False,
        addresses: Mapping[str, str] | None = None,
        to: Iterable[str] | None = None,
    ) -> dict[str, Response]:
        """PUT the assignment to every member (or `to`); `addresses` overrides replica addresses
        (point one at a FaultProxy). Raises unless every node answers 200."""
        doc = self.assignment_doc(
            primary,
            replicas,
            epoch=epoch,
            ack_policy=ack_policy,
            compression=compression,
            addresses=addresses,
        )
        targets = list(to) if to is not None else [primary, *replicas]
        out = {n: await self.put_assignment(n, space, doc) for n in targets}
        bad = {n: str(r) for n, r in out.items() if r.status != 200}
        if bad:
            raise IntegrationError(f"assignment of {space} refused: {bad}")
        return out

    def assignment_doc(
        self,
        primary: str,
        replicas: Sequence[str],
        *,
        epoch: int = 1,
        ack_policy: AckPolicy = "async",
        compression: bool = False,
        addresses: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The assignment document (`engram_contract.assignment`); `addresses` overrides
        members' replication addresses."""
        addr = dict(addresses or {})
        members = [self.nodes[n].member(address=addr.get(n)) for n in (primary, *replicas)]
        return assignment_document(epoch, members, ack_policy=ack_policy, compression=compression)

    async def put_assignment(
        self, name: str, space: str, doc: Any, *, token: str | None = None
    ) -> Response:
        tok = self.nodes[name].token if token is None else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        headers.update(self.grant_headers())
        r = await self.request(
            "PUT", name, f"/v1/spaces/{space}/assignment", json_body=doc, headers=headers
        )
        if r.status == 200 and isinstance(doc, dict) and isinstance(doc.get("primary"), dict):
            self._note_leader(space, str(doc["primary"].get("node")), int(doc.get("epoch", 0)))
            self.assignments[space] = doc
        return r

    # ---- write leases (the harness plays the control plane) -----------------------------------

    def grant_headers(self) -> dict[str, str]:
        return {
            "X-Engram-Control-Plane": self.control_plane_id,
            "X-Engram-Sent-Mono-Ns": str(time.monotonic_ns()),
        }

    def _note_leader(self, space: str, primary: str, epoch: int) -> None:
        for leads in self.leads.values():
            if leads.get(space, epoch) < epoch:
                leads.pop(space, None)
        if primary in self.nodes:
            self.leads.setdefault(primary, {})[space] = epoch
            if primary not in self._lease_tasks:
                self._lease_tasks[primary] = asyncio.get_running_loop().create_task(
                    self._lease_pump(primary)
                )

    def _control(self, token: str) -> SidecarClient:
        """The control plane's client for nodes with this admin token (a test may give nodes
        secrets of their own), speaking as this harness."""
        control = self._controls.get(token)
        if control is None:
            control = SidecarClient(
                token, probe_timeout=LEASE_EVERY * 2, lease_seconds=LEASE_SECONDS
            )
            control.control_plane = self.control_plane_id
            self._controls[token] = control
        return control

    async def _lease_pump(self, name: str) -> None:
        """Grant `name` its write leases every LEASE_EVERY s while it leads anything."""
        while True:
            epochs = self.leads.get(name, {})
            node = self.nodes[name]
            if epochs and name not in self.lease_paused and node.running():
                with contextlib.suppress(SidecarError):
                    await self._control(node.token).heartbeat(
                        node.http,
                        {SpaceId(sp): e for sp, e in epochs.items()},
                        sent_mono_ns=time.monotonic_ns(),
                    )
            await asyncio.sleep(LEASE_EVERY)

    async def write_json(
        self, name: str, space: str, entries: Sequence[Mapping[str, Any]], **kw: Any
    ) -> Response:
        return await self.request(
            "POST", name, f"/v1/spaces/{space}/entries", json_body={"entries": entries}, **kw
        )

    async def write_ndjson(
        self,
        name: str,
        space: str,
        payloads: Sequence[Any],
        *,
        entry_type: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        body = "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in payloads)
        return await self.request(
            "POST",
            name,
            f"/v1/spaces/{space}/entries",
            data=body.encode(),
            headers={"Content-Type": "application/x-ndjson"},
            params={"type": entry_type} if entry_type else None,
            timeout=timeout,
        )

    async def space_view(self, name: str, space: str) -> dict[str, Any]:
        r = await self.request("GET", name, f"/v1/spaces/{space}", timeout=5.0)
        if r.status != 200:
            raise IntegrationError(f"GET space {space} on {name}: {r}")
        body: dict[str, Any] = r.body
        return body

    async def metrics(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples of /metrics: (sample name, sorted labels) -> value."""
        r = await self.request("GET", name, "/metrics", timeout=5.0)
        if r.status != 200:
            raise IntegrationError(f"GET /metrics on {name}: {r}")
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(str(r.body)):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out

    async def metric(self, name: str, sample: str, **labels: str) -> float:
        """Sum of the samples named `sample` whose labels include `labels` (0 when absent)."""
        want = set(labels.items())
        return sum(
            v
            for (n, lab), v in (await self.metrics(name)).items()
            if n == sample and want <= set(lab)
        )

    # ---- waiting -------------------------------------------------------------------------------

    async def wait_until(
        self,
        check: Callable[[], Awaitable[T | None]],
        *,
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> T:
        """Poll `check` until it returns something other than None/False; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        last_err: BaseException | None = None
        while True:
            try:
                got = await check()
                if got is not None and got is not False:
                    return got
            except (aiohttp.ClientError, TimeoutError, IntegrationError) as err:
                last_err = err
            if time.monotonic() >= deadline:
                detail = f" (last error: {last_err!r})" if last_err else ""
                raise IntegrationError(f"timed out after {timeout} s waiting for {what}{detail}")
            await asyncio.sleep(interval)

    async def wait_replicated(
        self, space: str, primary: str, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Wait until every replica acked the primary's last sequence and applied it durably.

        Returns the primary's final view. The primary must be idle (no writes in flight).
        """
        state: dict[str, Any] = {}

        async def done() -> dict[str, Any] | None:
            view = await self.space_view(primary, space)
            state["primary"] = view
            last = view["last_sequence"]
            reps = view.get("replicas", {})
            if any(r["acked_sequence"] != last for r in reps.values()):
                return None
            for rep in reps:
                rv = await self.space_view(rep, space)
                state[rep] = rv
                if rv["applied_sequence"] != last or rv["last_sequence"] != last:
                    return None
            return view

        try:
            return await self.wait_until(
                done, timeout=timeout, what=f"replicas of {space} to catch up", interval=0.1
            )
        except IntegrationError as err:
            raise IntegrationError(f"{err}; last views: {json.dumps(state, indent=1)}") from None

    async def wait_healthy(self, space: str, primary: str, *, timeout: float = 15.0) -> None:
        """Wait until the primary reports every replica of `space` Healthy (the lag monitor
        re-evaluates states every `lag_monitor_interval`, so this trails `wait_replicated`)."""

        async def healthy() -> bool:
            reps = (await self.space_view(primary, space)).get("replicas", {})
            return all(r["state"] == "Healthy" for r in reps.values())

        await self.wait_until(healthy, timeout=timeout, what=f"replicas of {space} Healthy")

    def assert_wal_identical(self, space: str, primary: str, replicas: Iterable[str]) -> int:
        """Every replica's WAL for `space` is byte-identical to the primary's, segment by segment.

        Returns the number of WAL bytes compared.
        """
        want = self.nodes[primary].wal_segments(space)
        want_bytes = b"".join(want.values())
        if not want_bytes:
            raise IntegrationError(f"primary {primary} has no WAL bytes for {space}")
        for rep in replicas:
            got = self.nodes[rep].wal_segments(space)
            got_bytes = b"".join(got.values())
            if got_bytes != want_bytes:
                at = next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(want_bytes, got_bytes, strict=False))
                        if a != b
                    ),
                    min(len(want_bytes), len(got_bytes)),
                )
                raise IntegrationError(
                    f"space {space}: WAL of {rep} ({len(got_bytes)} bytes) differs from primary "
                    f"{primary}'s ({len(want_bytes)} bytes) at byte {at}"
                )
            if list(got) != list(want):
                raise IntegrationError(
                    f"space {space}: {rep} segments {list(got)} != {primary} segments {list(want)}"
                )
        return len(want_bytes)

    def wal_verify_cli(self, name: str, space: str) -> tuple[int, str]:
        """Run the operator's tool, `engram-replication wal verify`, on the node's data dir.

        Returns (exit code, output). It reads the files only, so it may run beside the node.
        """
        code = "import sys; from engram_operator.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["wal", "verify", "--data-dir", str(self.nodes[name].data_dir), "--space", space]
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    def assert_wal_valid(self, name: str, space: str, last: int) -> None:
        """The node's WAL for `space` verifies clean and holds exactly sequences 1..last."""
        report = verify_space(self.nodes[name].space_dir(space))
        if report.problems:
            raise IntegrationError(
                f"{name}/{space}: wal verify found {[str(p) for p in report.problems]}"
            )
        seqs = [e.sequence for e in self.nodes[name].wal_entries(space)]
        if seqs != list(range(1, last + 1)):
            raise IntegrationError(
                f"{name}/{space}: sequences are not 1..{last} contiguous "
                f"(got {len(seqs)} entries, first {seqs[:3]}, last {seqs[-3:]})"
            )


# ---- writers and their bookkeeping -----------------------------------------------------------


def payloads(tag: str, batch: int, count: int, pad: int = 48) -> list[dict[str, Any]]:
    """Distinct, recognisable payloads: every entry says which request and position it came from."""
    return [{"t": tag, "b": batch, "i": i, "pad": "x" * pad} for i in range(count)]


def encoded(p: Any) -> bytes:
    """A payload as the sidecar stores an NDJSON line (the line's own bytes)."""
    return json.dumps(p, separators=(",", ":")).encode()


@dataclass
class WriteLog:
    """What a writer sent and what the primary acknowledged."""

    acked: list[tuple[int, int, list[dict[str, Any]]]] = field(default_factory=list)
    refused: list[Response] = field(default_factory=list)
    slowest: float = 0.0

    def check_tiles(self, last: int) -> None:
        """Acknowledged ranges cover 1..last exactly once (no gap, no overlap)."""
        ranges = sorted((f, la) for f, la, _ in self.acked)
        expect = 1
        for f, la in ranges:
            assert f == expect, f"acknowledged ranges leave a gap or overlap at {expect}: {f}..{la}"
            expect = la + 1
        assert expect - 1 == last, f"acknowledged ranges end at {expect - 1}, log at {last}"


def check_payloads(cluster: Cluster, node: str, space: str, log: WriteLog) -> None:
    """The node's WAL holds each acknowledged request's payloads, in order, at its sequences."""
    entries = cluster[node].wal_entries(space)
    by_seq = {e.sequence: e.payload for e in entries}
    for first, last, sent in log.acked:
        got = [by_seq.get(s) for s in range(first, last + 1)]
        want = [encoded(p) for p in sent]
        assert got == want, f"{node}/{space}: entries {first}..{last} differ from what was sent"


async def write_batches(
    cluster: Cluster,
    primary: str,
    space: str,
    batches: Sequence[list[dict[str, Any]]],
    log: WriteLog,
    *,
    timeout: float = 20.0,
) -> None:
    for batch in batches:
        r = await cluster.write_ndjson(primary, space, batch, timeout=timeout)
        log.slowest = max(log.slowest, r.elapsed)
        if r.status != 200:
            log.refused.append(r)
            continue
        log.acked.append((r.body["first_sequence"], r.body["last_sequence"], batch))
