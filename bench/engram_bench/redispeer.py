"""The Redis peer: redis-server processes on 127.0.0.1, started and cleaned up by the harness.

`RedisServer` runs Debian's `redis-server` in a temporary directory on a free port, with the
settings the comparison needs (the `SETTINGS` below) and nothing persisted outside that
directory; `RedisPair` is a primary and one replica (``replicaof``), up once the replica's link
is up. `RedisSide` and `OursSide` give the comparison one interface over both systems: a send of
N entries (one HTTP request of N NDJSON lines for us, one pipeline of N XADDs for Redis), a no-op
round trip, and a lag probe.

Redis's replication lag is in bytes of its replication stream: `master_repl_offset` on the
primary against `slave_repl_offset` on the replica (INFO replication, both sampled at once).
`offset_lag` converts it to entries (stream bytes per XADD, measured in the same run) and to
seconds, by the definition our sidecar uses: the age of the oldest entry the replica lacks, i.e.
how long ago the primary's offset first passed the replica's (linear between samples).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engram_bench.load import OK, Send, http_send
from engram_bench.resp import (
    RespConnection,
    RespPool,
    command,
    config_args,
    info_fields,
    xadd_pipeline,
)
from engram_bench.sidecars import BenchCluster, BenchError, binary_body, ndjson_body, rss_bytes
from engram_contract.formats.records import CONTENT_TYPE
from engram_contract.launcher import HOST, READY_TIMEOUT, STOP_TIMEOUT, die_with_parent, free_port

# Durability equal to our `fsync always` + ackPolicy async: the primary answers only after its
# AOF write is fsynced; the replica fsyncs its own AOF too; replication is asynchronous.
SETTINGS: Final = {
    "bind": HOST,
    "protected-mode": "no",
    "daemonize": "no",
    "save": "",  # no RDB snapshots: the AOF is the only persistence, as the WAL is ours
    "appendonly": "yes",
    "appendfsync": "always",
    "auto-aof-rewrite-percentage": "0",  # no background rewrite: our WAL never compacts either
    "repl-diskless-sync": "yes",
    "repl-diskless-sync-delay": "0",
    "loglevel": "warning",
}


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def redis_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else "unknown"


class RedisServer:
    def __init__(self, binary: str, root: Path, *, replica_of: int | None = None) -> None:
        self.binary = binary
        self.root = root
        self.replica_of = replica_of
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        settings = dict(SETTINGS)
        settings.update({"port": str(self.port), "dir": str(self.root)})
        settings["logfile"] = str(self.root / "redis.log")
        args = [self.binary, *config_args(settings)]
        if self.replica_of is not None:
            args += ["--replicaof", HOST, str(self.replica_of)]
        return args

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call, nothing else
        )

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = free_port()
            self.proc = self._spawn()
            deadline = time.monotonic() + READY_TIMEOUT
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ConnectionError):
                    conn = await RespConnection.open(HOST, self.port)
                    try:
                        if await conn.call("PING") == "PONG":
                            return
                    finally:
                        conn.close()
                await asyncio.sleep(0.02)
            await self.stop()
        raise BenchError(f"redis-server did not start:\n{self.log_tail()}")

    def log_tail(self) -> str:
        log = self.root / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-10:]) if log.exists() else ""

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc is not None else 0

    async def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while p.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


class RedisPair:
    """A primary and one replica, with control connections for INFO and XLEN."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary, self.root = binary, root
        self.primary = RedisServer(binary, root / "primary")
        self.replica: RedisServer | None = None
        self.ctl_p: RespConnection | None = None
        self.ctl_r: RespConnection | None = None

    async def __aenter__(self) -> RedisPair:
        try:
            await self.primary.start()
            self.replica = RedisServer(self.binary, self.root / "replica", replica_of=0)
            self.replica.replica_of = self.primary.port
            await self.replica.start()
            self.ctl_p = await RespConnection.open(HOST, self.primary.port)
            self.ctl_r = await RespConnection.open(HOST, self.replica.port)
            deadline = time.monotonic() + READY_TIMEOUT
            while (await self.info(self.ctl_r)).get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise BenchError("the Redis replica never linked to its primary")
                await asyncio.sleep(0.02)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conn in (self.ctl_p, self.ctl_r):
            if conn is not None:
                conn.close()
        if self.replica is not None:
            await self.replica.stop()
        await self.primary.stop()

    @staticmethod
    async def info(conn: RespConnection | None) -> dict[str, str]:
        assert conn is not None
        raw = await conn.call("INFO", "replication")
        return info_fields(raw if isinstance(raw, bytes) else b"")

    async def offsets(self) -> tuple[int, int]:
        """(primary master_repl_offset, replica slave_repl_offset), asked at the same time.

        A replica still (re)syncing answers INFO without its offset for a moment: ask again,
        bounded (2 s), rather than fail the run on a KeyError."""
        p: dict[str, str] = {}
        r: dict[str, str] = {}
        for _ in range(40):
            p, r = await asyncio.gather(self.info(self.ctl_p), self.info(self.ctl_r))
            if "master_repl_offset" in p and "slave_repl_offset" in r:
                return int(p["master_repl_offset"]), int(r["slave_repl_offset"])
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"redis INFO replication lacks the offsets after 2 s: primary {p}, replica {r}"
        )

    async def xlen(self, key: str) -> int:
        assert self.ctl_p is not None
        n = await self.ctl_p.call("XLEN", key)
        return n if isinstance(n, int) else 0


def offset_lag(points: list[tuple[float, int, int]]) -> list[tuple[float, float, int]]:
    """(t, primary offset, replica offset) samples → (t, lag seconds, lag bytes).

    Lag seconds at t = t − the moment the primary's offset first passed the replica's (the
    oldest byte the replica lacks was written then), interpolated linearly between samples;
    0 when the replica has everything. Before the first sample the time is unknown, so a lag
    reaching back past it is counted from the first sample (an underestimate, never more).
    """
    ts = [p[0] for p in points]
    ms = [p[1] for p in points]
    # Offsets only grow; a sampling reorder must not make the search see a dip.
    for i in range(1, len(ms)):
        ms[i] = max(ms[i], ms[i - 1])
    out: list[tuple[float, float, int]] = []
    for t, m, r in points:
        lag_bytes = max(0, m - r)
        if lag_bytes == 0:
            out.append((t, 0.0, 0))
            continue
        j = bisect.bisect_right(ms, r)  # first sample whose primary offset is past r
        if j == 0:
            since = ts[0]
        else:
            m0, m1 = ms[j - 1], ms[j]
            since = ts[j - 1] + (ts[j] - ts[j - 1]) * (r - m0) / (m1 - m0)
        out.append((t, max(0.0, t - since), lag_bytes))
    return out


@dataclass
class LagPoint:
    t: float
    seconds: float
    entries: float


class OursSide:
    """Writes to our primary in the binary format (`engram_contract.writes`), or, with
    `binary=False`, as NDJSON: the same payload bytes either way."""

    def __init__(
        self,
        c: BenchCluster,
        primary: str,
        replicas: str | Sequence[str],
        payload: int,
        *,
        binary: bool = True,
    ) -> None:
        self.c, self.primary, self.payload, self.binary = c, primary, payload, binary
        self.replicas = [replicas] if isinstance(replicas, str) else list(replicas)
        self.replica = self.replicas[0]
        self.name = "engram sidecar, " + ("binary" if binary else "NDJSON")

    def send(self, space: str, entries: int) -> Send:
        if self.binary:
            body, ctype = binary_body(entries, self.payload, tag=space), CONTENT_TYPE
        else:
            body, ctype = ndjson_body(entries, self.payload, tag=space), "application/x-ndjson"
        return http_send(
            self.c.http(self.primary),
            "POST",
            f"/v1/spaces/{space}/entries",
            body,
            content_type=ctype,
        )

    def noop(self) -> Send:
        return http_send(self.c.http(self.primary), "GET", "/healthz")

    async def entries(self, space: str) -> int:
        return int((await self.c.space_view(self.primary, space))["last_sequence"])

    async def replicated_at(self, space: str, timeout: float = 120.0) -> float:
        last = await self.entries(space)
        return await self.c.wait_applied(space, self.replicas, last, timeout=timeout)

    async def lag_probe(self, space: str) -> tuple[float, float]:
        rep = (await self.c.space_view(self.primary, space))["replicas"][self.replica]
        return float(rep["lag_seconds"]), float(rep["lag_entries"])

    def rss(self) -> tuple[int, int]:
        return self.c[self.primary].rss(), self.c[self.replica].rss()


class RedisSide:
    name = "Redis"

    def __init__(self, pair: RedisPair, payload: int) -> None:
        self.pair, self.payload = pair, payload
        self.pool = RespPool(HOST, pair.primary.port)

    def send(self, key: str, entries: int) -> Send:
        lines = ndjson_body(entries, self.payload, tag=key).splitlines()
        data = xadd_pipeline(key, lines)

        async def send() -> str:
            errors = await self.pool.bulk_pipeline(data, entries)
            return OK if errors == 0 else "redis error reply"

        return send

    def noop(self) -> Send:
        data = command("PING")

        async def ping() -> str:
            (reply,) = await self.pool.pipeline(data, 1)
            return OK if reply == "PONG" else "redis error reply"

        return ping

    async def entries(self, key: str) -> int:
        return await self.pair.xlen(key)

    async def replicated_at(self, key: str, timeout: float = 120.0) -> float:
        target, _ = await self.pair.offsets()
        deadline = time.monotonic() + timeout
        while True:
            _, r = await self.pair.offsets()
            if r >= target:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchError(f"the Redis replica did not reach offset {target} in {timeout} s")
            await asyncio.sleep(0.01)

    def rss(self) -> tuple[int, int]:
        return self.pair.primary.rss(), self.pair.replica.rss() if self.pair.replica else 0

    async def close(self) -> None:
        await self.pool.close()
