"""Load generators and samplers shared by the scenario modules, for any request kind.

A *send* is an async callable that performs one request (an HTTP write of N entries, a Redis
pipeline of N XADDs, a no-op round trip) and returns "200" when it was acknowledged, or an error
label. The drivers know nothing of the protocol, so our sidecar and the Redis peer are loaded by
exactly the same schedule and measured by exactly the same code.

- `open_loop`: requests leave on a fixed schedule (`schedule`) whatever happened to the earlier
  ones, and each latency runs from the request's *intended* send time. A stall (server, client,
  or this process's event loop) is charged to every request it delayed, so the percentiles are
  free of coordinated omission. The clock and sleep are injectable: tests drive it on virtual
  time. This process's garbage collector is paused for the window (`gc_paused`): a full
  collection over everything the benchmark has accumulated by then (earlier scenarios' results)
  can stop this process for hundreds of milliseconds, and open-loop timing would charge that
  stall of the load generator to the server under test.
- `closed_loop`: `concurrency` workers, each sending its next request when the previous one is
  answered, for a fixed time: the most a server takes.
- `Sampler`: calls a probe every `interval` seconds on a fixed schedule and keeps
  (time, value) pairs: lag over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from engram_bench.leanhttp import HttpError, LeanHttp
from engram_bench.report import percentile
from engram_contract.formats.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from engram_contract.launcher import HOST

Send = Callable[[], Awaitable[str]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")
OK = "200"


def schedule(start: float, rate: float, n: int) -> list[float]:
    """Intended send times of `n` requests at `rate` per second from `start`."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    return [start + i / rate for i in range(n)]


def http_send(
    client: LeanHttp,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    timeout: float = 10.0,
    messages: dict[str, str] | None = None,
    content_type: str = "application/x-ndjson",
) -> Send:
    """A send that makes one HTTP request through `client`; its status code is the label.

    With `messages`, the first answer body of each non-200 status is kept there (for notes).
    """

    async def send() -> str:
        try:
            code, answer = await client.request(
                method, path, body, timeout=timeout, content_type=content_type
            )
        except HttpError:
            return "HttpError"
        status = str(code)
        if messages is not None and code != 200 and status not in messages:
            messages[status] = answer[:300].decode(errors="replace")
        return status

    return send


@dataclass
class LoadResult:
    offered_per_s: float
    entries_per_request: int
    request_rate: float
    scheduled: int
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # from the intended send time
    achieved_per_s: float = 0.0
    unfinished: int = 0
    messages: dict[str, str] = field(default_factory=dict)  # first answer body per error status
    p99_runs: list[float] = field(default_factory=list)  # set by `median_of`: every run's P99

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def sustained(self) -> bool:
        return self.achieved_per_s >= 0.95 * self.offered_per_s and not self.errors

    def summary(self) -> dict[str, Any]:
        return {
            "offered_per_s": self.offered_per_s,
            "entries_per_request": self.entries_per_request,
            "request_rate": self.request_rate,
            "scheduled": self.scheduled,
            "ok": self.ok,
            "errors": dict(self.errors),
            "unfinished": self.unfinished,
            "messages": self.messages,
            "achieved_per_s": self.achieved_per_s,
            "sustained": self.sustained,
            "p50_s": self.p(50),
            "p99_s": self.p(99),
            "p999_s": self.p(99.9),
            "max_s": max(self.latencies, default=float("nan")),
            **({"p99_runs_s": list(self.p99_runs)} if self.p99_runs else {}),
        }


def median_of(runs: Sequence[LoadResult]) -> LoadResult:
    """The run whose P99 is the median of `runs` (the upper one of an even count), with every
    run's P99 in run order in `p99_runs` (a copy: the runs are left as they were).

    One open-loop run's P99 on a shared 2-core machine swings several-fold from one minute to
    the next (Redis's too): a verdict read off one run is decided by the noise. The median run
    of a few, interleaved with the peer's, is the one reported; the spread is shown next to it.
    """
    if not runs:
        raise ValueError("no runs")
    chosen = copy.copy(sorted(runs, key=lambda r: r.p(99))[len(runs) // 2])
    chosen.p99_runs = [r.p(99) for r in runs]
    return chosen


def median_run(runs: Sequence[LoadResult]) -> dict[str, Any]:
    """`median_of(runs).summary()`: with every run's P99 under "p99_runs_s"."""
    return median_of(runs).summary()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect now, then no automatic collection until the block ends (a measured window of a
    few seconds allocates little; the collector is back on, as it was, afterwards)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def error_text(errors: Counter[str] | dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))


async def open_loop(
    send: Send,
    *,
    entries_per_request: int,
    request_rate: float,
    duration: float,
    timeout: float = 10.0,
    clock: Clock = time.perf_counter,
    sleep: Sleep = asyncio.sleep,
) -> LoadResult:
    """`request_rate` requests/s for `duration` s on a fixed schedule; see the module doc.

    A request that fails, or is still unanswered `timeout` s after the last one was due, counts
    as an error with the time it had taken. Achieved = acknowledged entries / (last
    acknowledgement − first intended send).
    """
    n = max(1, round(duration * request_rate))
    res = LoadResult(
        offered_per_s=request_rate * entries_per_request,
        entries_per_request=entries_per_request,
        request_rate=request_rate,
        scheduled=n,
    )
    last_ok = 0.0  # set with `start`, once the collection gc_paused begins with is done
    pending: set[int] = set()

    async def one(i: int, intended: float) -> None:
        nonlocal last_ok
        try:
            status = await send()
        except (OSError, TimeoutError, EOFError, ConnectionError) as err:
            status = type(err).__name__
        done = clock()
        pending.discard(i)
        res.latencies.append(done - intended)
        if status == OK:
            res.ok += 1
            last_ok = max(last_ok, done)
        else:
            res.errors[status] += 1

    tasks: list[asyncio.Task[None]] = []
    with gc_paused():  # the collection it starts with is before the first intended send
        start = clock() + 0.01
        last_ok = start
        times = schedule(start, request_rate, n)
        for i, intended in enumerate(times):
            delay = intended - clock()
            if delay > 0:
                await sleep(delay)
            pending.add(i)
            tasks.append(asyncio.create_task(one(i, intended)))
        _, late = await asyncio.wait(tasks, timeout=timeout)
    for t in late:
        t.cancel()
    if pending:
        gave_up = clock()
        res.unfinished = len(pending)
        res.errors["unfinished"] += len(pending)
        res.latencies.extend(gave_up - times[i] for i in sorted(pending))
    res.achieved_per_s = res.ok * entries_per_request / max(last_ok - start, 1e-9)
    return res


@dataclass
class ClosedResult:
    requests: int = 0
    ok_requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0


async def closed_loop(
    send: Send, *, concurrency: int, duration: float, clock: Clock = time.perf_counter
) -> ClosedResult:
    """`concurrency` workers send back to back for `duration` s (each finishes its last one)."""
    res = ClosedResult()
    t0 = clock()
    stop_at = t0 + duration

    async def worker() -> None:
        while clock() < stop_at:
            a = clock()
            try:
                status = await send()
            except (OSError, TimeoutError, EOFError, ConnectionError) as err:
                status = type(err).__name__
            res.latencies.append(clock() - a)
            res.requests += 1
            if status == OK:
                res.ok_requests += 1
            else:
                res.errors[status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed_s = clock() - t0
    return res


class Sampler(Generic[T]):
    """Runs `probe` every `interval` s (fixed schedule) until stopped; keeps (t, value) with t
    relative to `origin` (perf_counter). A probe that raises is counted, not kept."""

    def __init__(
        self, probe: Callable[[], Awaitable[T]], interval: float, origin: float | None = None
    ) -> None:
        self.probe = probe
        self.interval = interval
        self.origin = time.perf_counter() if origin is None else origin
        self.points: list[tuple[float, T]] = []
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        nxt = time.perf_counter()
        while True:
            try:
                value = await self.probe()
                self.points.append((time.perf_counter() - self.origin, value))
            except Exception:  # a failed sample is a gap in the series, counted
                self.failures += 1
            nxt += self.interval
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    def start(self) -> Sampler[T]:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> list[tuple[float, T]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        return self.points


def raw_fsync(path: Path, seconds: float, entry_bytes: int) -> list[float]:
    """The disk's floor for one durable append: os.write + os.fsync of one entry-sized record,
    repeated for `seconds`; the latency of each."""
    record = b"e" * entry_bytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lat: list[float] = []
    try:
        os.write(fd, record)
        os.fsync(fd)
        stop = time.perf_counter() + seconds
        while True:
            a = time.perf_counter()
            os.write(fd, record)
            os.fsync(fd)
            b = time.perf_counter()
            lat.append(b - a)
            if b >= stop:
                return lat
    finally:
        os.close(fd)


async def ping_rtts(port: int, n: int) -> list[float]:
    """Stop-and-wait round trips of a bare frame header (body length 0) to a
    `RawProcess("sink")` (or through a proxy to one), which answers one of the same size; the
    first is dropped (connection warm-up)."""
    r, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5.0)
    frame = bytes(FRAME_HEADER_SIZE)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            w.write(frame)
            await asyncio.wait_for(r.readexactly(FRAME_HEADER_SIZE), 10.0)
            out.append(time.perf_counter() - t)
    finally:
        w.close()
    return out[1:]
