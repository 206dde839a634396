"""Clients that write continuously, and the history of what each write was answered.

Each write is one `POST /v1/spaces/{space}/entries` in NDJSON (every line is stored byte for
byte, so the payload's hash is known before it is sent), to the node the control loop names as
the space's primary (a 421 names another: the next write goes there). Every entry's payload is
unique in the run. Writers share a token bucket, so the load is bounded (entries per second).

Every attempt is an `Op` in the history, with its outcome:

- `ok`: 200; the answer's epoch and first..last sequence are recorded with the payload hashes.
- `refused`: a definite no, documented as "nothing of this request is in the log": 400, 404, 409,
  413, 421, `503 unavailable`, or a connection that could not be opened.
- `indeterminate`: no answer (timeout, connection lost), `503 not_acknowledged`, `503 wal_error`,
  a 5xx: the entries may or may not be in the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import aiohttp

Outcome = Literal["ok", "refused", "indeterminate"]
REQUEST_TIMEOUT: Final = 4.0  # above the sidecar's ack timeout (2 s in NODE_FLAGS)


def payload_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:20]


@dataclass
class Op:
    id: int
    client: str
    space: str
    node: str
    t0: float
    hashes: tuple[str, ...]
    t1: float = 0.0
    outcome: Outcome = "indeterminate"
    status: int | None = None
    error: str = ""
    epoch: int | None = None
    first: int | None = None
    last: int | None = None

    @property
    def sequences(self) -> range:
        if self.first is None or self.last is None:
            return range(0)
        return range(self.first, self.last + 1)

    def describe(self) -> str:
        what = (
            f"acked seq {self.first}..{self.last} at epoch {self.epoch}"
            if self.outcome == "ok"
            else f"{self.outcome} ({self.status} {self.error})"
        )
        return (
            f"op #{self.id} by {self.client} to {self.node} ({self.space}), "
            f"sent at {self.t0:.2f}s, answered at {self.t1:.2f}s: {what}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)

    async def take(self, n: int, stop: asyncio.Event) -> bool:
        """Wait (bounded by `stop`) for `n` tokens; False when stopped."""
        for _ in range(10_000):
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return True
            if stop.is_set():
                return False
            await asyncio.sleep(min(0.2, (n - self.tokens) / self.rate))
        return False


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    by_hash: dict[str, Op] = field(default_factory=dict)

    def add(self, op: Op) -> None:
        self.ops.append(op)
        for h in op.hashes:
            self.by_hash[h] = op

    def count(self, space: str | None = None, outcome: Outcome | None = None) -> int:
        return sum(
            1
            for op in self.ops
            if (space is None or op.space == space) and (outcome is None or op.outcome == outcome)
        )

    def entries(self, space: str, outcome: Outcome = "ok") -> int:
        return sum(len(op.hashes) for op in self.ops if op.space == space and op.outcome == outcome)


def classify(status: int | None, body: Any) -> Outcome:
    if status == 200:
        return "ok"
    if status is None:
        return "indeterminate"
    code = body.get("error") if isinstance(body, dict) else None
    if status in (400, 404, 409, 413, 421):
        return "refused"
    if status == 503 and code == "unavailable":
        return "refused"
    return "indeterminate"


@dataclass
class Writers:
    """`per_space` sequential writers for every space, sharing one token bucket."""

    spaces: list[str]
    session: aiohttp.ClientSession
    primary_of: Callable[[str], str | None]  # the control loop's placement
    direct: Callable[[str], str]  # node -> its real HTTP address
    node_of_http: Callable[[str], str | None]  # an advertised HTTP address (421) -> node
    now: Callable[[], float]
    seed: int
    rate: float = 200.0
    per_space: int = 2
    history: History = field(default_factory=History)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _next_id: int = 0

    def start(self) -> None:
        bucket = TokenBucket(self.rate, burst=max(10.0, self.rate / 10))
        for sid in self.spaces:
            for k in range(self.per_space):
                rng = random.Random(f"{self.seed}:{sid}:{k}")
                self.tasks.append(asyncio.create_task(self._run(f"{sid}/w{k}", sid, bucket, rng)))

    async def finish(self, timeout: float = REQUEST_TIMEOUT + 5) -> None:
        self.stop.set()
        if self.tasks:
            done, pending = await asyncio.wait(self.tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise AssertionError(f"a writer failed: {t.exception()!r}")
        self.tasks.clear()

    async def _run(self, client: str, space: str, bucket: TokenBucket, rng: random.Random) -> None:
        redirect: str | None = None
        n = 0
        while not self.stop.is_set():
            count = rng.randint(1, 4)
            if not await bucket.take(count, self.stop):
                return
            node = redirect or self.primary_of(space)
            redirect = None
            if node is None:
                await asyncio.sleep(0.1)
                continue
            n += 1
            op, answer = await self.write(client, space, node, n, count)
            if op.status == 421 and isinstance(answer, dict):
                target = self.node_of_http(str(answer.get("primary", "")))
                if target is not None and target != node:
                    redirect = target
            if op.outcome != "ok":
                await asyncio.sleep(rng.uniform(0.02, 0.15))

    async def write(self, client: str, space: str, node: str, n: int, count: int) -> tuple[Op, Any]:
        """One write of `count` fresh entries to `node`; recorded in the history."""
        lines = [
            json.dumps(
                {"c": client, "n": n, "i": i, "s": self.seed, "pad": "x" * 40},
                separators=(",", ":"),
            ).encode()
            for i in range(count)
        ]
        self._next_id += 1
        op = Op(
            id=self._next_id,
            client=client,
            space=space,
            node=node,
            t0=round(self.now(), 3),
            hashes=tuple(payload_hash(x) for x in lines),
        )
        self.history.add(op)
        body: Any = None
        try:
            async with self.session.post(
                f"http://{self.direct(node)}/v1/spaces/{space}/entries",
                data=b"\n".join(lines) + b"\n",
                headers={"Content-Type": "application/x-ndjson"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            ) as r:
                op.status = r.status
                text = await r.text()
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
        except aiohttp.ClientConnectorError as err:
            op.outcome, op.error = "refused", f"connect: {err.os_error!r}"
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            op.outcome, op.error = "indeterminate", repr(err)[:120]
        op.t1 = round(self.now(), 3)
        if op.status is not None:
            op.outcome = classify(op.status, body)
            if isinstance(body, dict):
                op.error = str(body.get("error", ""))
        if op.outcome == "ok":
            try:
                op.epoch = int(body["epoch"])
                op.first = int(body["first_sequence"])
                op.last = int(body["last_sequence"])
            except (TypeError, KeyError, ValueError):
                op.outcome, op.error = "indeterminate", f"200 with an unreadable body {body!r}"
            else:
                if op.last - op.first + 1 != count:
                    op.error = f"200 for {count} entries names {op.last - op.first + 1} sequences"
        return op, body
