"""A fault-injecting TCP proxy for integration tests (design.md §9).

`FaultProxy` listens on 127.0.0.1 and forwards every accepted connection to one target. Faults are
set per direction — ``"up"`` (client → target), ``"down"`` (target → client) or ``"both"`` — and
may be changed while traffic flows; they apply to what arrives after the change.

Units. In framed mode (the default) each direction's byte stream is split into wire frames using
nothing but the frame header's body-length field (a little-endian u32 at `BODY_LENGTH_OFFSET` of the
`HEADER_SIZE`-byte header, both from `engram_contract.formats.frame`; frame size = header + body
length); nothing else is parsed or validated, so the proxy works on frames that are deliberately
malformed. Every fault then acts on whole frames. With
``framed=False`` the unit is whatever one socket read returned (a chunk), so the same faults act on
arbitrary byte streams. A framed direction whose body length exceeds ``max_body`` (a stream that is
not made of frames) falls back to raw chunks for the rest of that connection (``desynced``).

Pipeline, per unit as it arrives: blackhole → drop → truncate → corrupt → duplicate → reorder →
delay. Delay is latency, not throughput: each unit is due ``delay`` (+ up to ``jitter``) seconds
after it arrived, and units leave strictly in order. A blackholed direction also swallows units
still in flight (delayed) when it is switched on, and an end-of-stream (FIN) that arrives while it
is on: the sockets stay open, as in a partition.

Determinism: connection *n* (counted from 1) draws its faults in direction *d* from
``random.Random(f"{seed}:{n}:{d}")``, so a fault pattern does not depend on how the two directions'
traffic interleaves.

Counters in `FaultProxy.stats`: ``connections`` (proxied), ``refused``, ``connect_failed``,
``frames_up`` / ``frames_down`` and ``bytes_up`` / ``bytes_down`` (what arrived at the proxy in
that direction; units in raw mode), ``dropped``, ``corrupted``, ``duplicated``, ``reordered``,
``truncated``, ``blackholed`` (units swallowed), ``desynced`` and ``cuts``.

Command line (runs until interrupted, prints the counters on exit)::

    python -m tests.faultproxy --listen 127.0.0.1:7001 --target 127.0.0.1:6001 --delay 0.05 \
        --drop 0.01 --direction up
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self

from engram_contract.formats.frame import BODY_LENGTH_OFFSET, HEADER_SIZE

_BODY_LENGTH: Final = struct.Struct("<I")  # the frame header's body-length field
_READ_SIZE: Final = 64 * 1024
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

Direction = Literal["up", "down", "both"]
_Side = Literal["up", "down"]
_SIDES: Final[tuple[_Side, _Side]] = ("up", "down")
_CloseMode = Literal["graceful", "abort", "reset"]

STAT_KEYS: Final = (
    "connections",
    "refused",
    "connect_failed",
    "frames_up",
    "frames_down",
    "bytes_up",
    "bytes_down",
    "dropped",
    "corrupted",
    "duplicated",
    "reordered",
    "truncated",
    "blackholed",
    "desynced",
    "cuts",
)


@dataclass(slots=True)
class _Faults:
    """The faults of one direction; read at every decision, so changes apply immediately."""

    delay: float = 0.0
    jitter: float = 0.0
    drop: float = 0.0
    corrupt: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_hold: float = 0.5
    truncate: float = 0.0
    blackhole: bool = False


@dataclass(slots=True)
class _Item:
    """One unit queued for sending: ``data``, a truncated prefix then a cut, or end-of-stream."""

    due: float
    data: bytes
    kind: Literal["data", "truncate", "eof"] = "data"


def _sides(direction: Direction) -> tuple[_Side, ...]:
    if direction == "both":
        return _SIDES
    if direction in _SIDES:
        return (direction,)
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} probability must be within [0, 1], not {p!r}")
    return float(p)


def _check_seconds(name: str, seconds: float) -> float:
    if not seconds >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number of seconds, not {seconds!r}")
    return float(seconds)


def _close_writer(writer: asyncio.StreamWriter, mode: _CloseMode) -> None:
    """Close one socket: ``graceful`` flushes and sends FIN, ``abort`` discards what is buffered,
    ``reset`` also makes the kernel answer with RST."""
    transport = writer.transport
    if mode == "reset":
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    if mode == "graceful":
        transport.close()
    else:
        transport.abort()


class _Pipe:
    """One direction of one connection: a reader that splits and faults, a sender that delays."""

    def __init__(
        self,
        proxy: FaultProxy,
        conn: _Conn,
        side: _Side,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._conn = conn
        self._side: _Side = side
        self._src = src
        self._dst = dst
        self._rng = random.Random(f"{proxy.seed}:{conn.number}:{side}")
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._framed = proxy.framed
        self._buf = bytearray()
        self._held: _Item | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._stopped = False  # set once a truncation was decided: nothing more is read

    @property
    def _faults(self) -> _Faults:
        return self._proxy._faults[self._side]

    def _count(self, key: str, n: int = 1) -> None:
        self._proxy.stats[key] += n

    def _chance(self, p: float) -> bool:
        return p > 0.0 and (p >= 1.0 or self._rng.random() < p)

    # -- reading side ---------------------------------------------------------------------------

    async def read_loop(self) -> None:
        while not self._stopped:
            data = await self._src.read(_READ_SIZE)
            if not data:
                break
            self._count(f"bytes_{self._side}", len(data))
            if self._framed:
                self._buf += data
                self._split_frames()
            else:
                self._unit(data)
        if self._stopped:
            return
        # End of stream: release a held frame, pass on an incomplete trailing frame as it is.
        self._release_held()
        now = self._loop.time()
        if self._buf:
            self._enqueue(_Item(now + self._faults.delay, bytes(self._buf)))
            self._buf.clear()
        self._enqueue(_Item(now + self._faults.delay, b"", "eof"))

    def _split_frames(self) -> None:
        buf = self._buf
        while not self._stopped and len(buf) >= HEADER_SIZE:
            (body_length,) = _BODY_LENGTH.unpack_from(buf, BODY_LENGTH_OFFSET)
            if body_length > self._proxy.max_body:
                self._count("desynced")
                self._framed = False
                data = bytes(buf)
                buf.clear()
                self._unit(data)
                return
            size = HEADER_SIZE + body_length
            if len(buf) < size:
                return
            frame = bytes(buf[:size])
            del buf[:size]
            self._unit(frame)

    def _unit(self, data: bytes) -> None:
        """Apply the faults to one arrived unit (a frame, or a chunk in raw mode)."""
        faults = self._faults
        self._count(f"frames_{self._side}")
        if faults.blackhole:
            self._count("blackholed")
            return
        if self._chance(faults.drop):
            self._count("dropped")
            return
        due = self._loop.time() + faults.delay
        if faults.jitter > 0.0:
            due += self._rng.uniform(0.0, faults.jitter)
        if len(data) > 0 and self._chance(faults.truncate):
            self._count("truncated")
            keep = self._rng.randrange(1, len(data)) if len(data) > 1 else 0
            self._cancel_hold()
            self._held = None
            self._stopped = True
            self._enqueue(_Item(due, data[:keep], "truncate"))
            return
        if len(data) > 0 and self._chance(faults.corrupt):
            self._count("corrupted")
            bit = self._rng.randrange(len(data) * 8)
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            data = bytes(flipped)
        copies = 1
        if self._chance(faults.duplicate):
            self._count("duplicated")
            copies = 2
        for _ in range(copies):
            self._reorder(_Item(due, data))

    def _reorder(self, item: _Item) -> None:
        if self._held is not None:
            held = self._held
            self._held = None
            self._cancel_hold()
            self._enqueue(item)
            self._enqueue(held)
            self._count("reordered")
        elif self._chance(self._faults.reorder):
            self._held = item
            self._hold_timer = self._loop.call_later(self._faults.reorder_hold, self._release_held)
        else:
            self._enqueue(item)

    def _release_held(self) -> None:
        """Send a held frame on its own: no successor came within ``reorder_hold``, or EOF."""
        self._cancel_hold()
        if self._held is not None:
            held = self._held
            self._held = None
            self._enqueue(held)

    def _cancel_hold(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _enqueue(self, item: _Item) -> None:
        self._queue.put_nowait(item)

    # -- sending side ---------------------------------------------------------------------------

    async def send_loop(self) -> None:
        while True:
            item = await self._queue.get()
            wait = item.due - self._loop.time()
            if wait > 0.0:
                await asyncio.sleep(wait)
            if item.kind == "eof":
                if not self._faults.blackhole and self._dst.can_write_eof():
                    self._dst.write_eof()
                return
            if self._faults.blackhole:
                self._count("blackholed")
            elif item.data:
                self._dst.write(item.data)
                await self._dst.drain()
            if item.kind == "truncate":
                self._conn.close("graceful")  # the prefix is flushed before the FIN
                return

    def close(self) -> None:
        self._cancel_hold()


class _Conn:
    """One proxied connection: client ↔ proxy ↔ target, two pipes, four tasks."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.number = number
        self._proxy = proxy
        self._writers = (client[1], target[1])
        self._pipes = (
            _Pipe(proxy, self, "up", client[0], target[1]),
            _Pipe(proxy, self, "down", target[0], client[1]),
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def run(self) -> None:
        for pipe in self._pipes:
            self._tasks.append(asyncio.create_task(self._guard(pipe.read_loop)))
            self._tasks.append(asyncio.create_task(self._guard(pipe.send_loop)))
        try:
            await asyncio.wait(self._tasks)
        except BaseException:  # cancelled by `stop`
            self.close("abort")
            raise
        self.close("graceful")  # both directions ended: flush what is still buffered

    async def _guard(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except OSError:  # a peer went away: end the whole connection
            self.close("abort")
        except Exception:
            self.close("abort")
            raise

    def close(self, mode: _CloseMode) -> None:
        if self._closed:
            return
        self._closed = True
        self._proxy._conns.discard(self)
        for pipe in self._pipes:
            pipe.close()
        for writer in self._writers:
            _close_writer(writer, mode)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A TCP proxy to one target with per-direction faults; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
        framed: bool = True,
        max_body: int = 256 * 1024 * 1024,
        connect_timeout: float = 5.0,
        settle_timeout: float = 2.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.seed = seed
        self.framed = framed
        self.max_body = max_body
        self.connect_timeout = connect_timeout
        self.settle_timeout = settle_timeout  # bound on waiting for connections to wind down
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._faults: dict[_Side, _Faults] = {side: _Faults() for side in _SIDES}
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._numbered = 0

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (valid after `start`)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FaultProxy is already started")
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.listen_port
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection; bounded by ``settle_timeout``."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.close("abort")
        for task in list(self._handlers):
            task.cancel()
        await self._settle()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), self.settle_timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _settle(self) -> None:
        """Wait (bounded) until the connection handlers have finished."""
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=self.settle_timeout)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # `stop` cancels handlers; nobody awaits this task, and asyncio's start_server (3.11)
            # would log a cancelled callback task as an error, so the cancellation ends here.
            pass
        finally:
            self._handlers.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats["refused"] += 1
            _close_writer(writer, "graceful")
            return
        try:
            target = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError):
            self.stats["connect_failed"] += 1
            _close_writer(writer, "abort")
            return
        except BaseException:
            _close_writer(writer, "abort")
            raise
        self._numbered += 1
        self.stats["connections"] += 1
        conn = _Conn(self, self._numbered, (reader, writer), target)
        self._conns.add(conn)
        await conn.run()

    # -- faults ---------------------------------------------------------------------------------

    def set_delay(
        self, seconds: float, direction: Direction = "both", *, jitter: float = 0.0
    ) -> None:
        """Add ``seconds`` (+ uniform ``[0, jitter]``) latency to every unit; order is kept."""
        seconds = _check_seconds("delay", seconds)
        jitter = _check_seconds("jitter", jitter)
        for side in _sides(direction):
            self._faults[side].delay = seconds
            self._faults[side].jitter = jitter

    def set_drop(self, probability: float, direction: Direction = "both") -> None:
        """Drop whole units (frames) with ``probability``."""
        p = _check_probability("drop", probability)
        for side in _sides(direction):
            self._faults[side].drop = p

    def set_corrupt(self, probability: float, direction: Direction = "both") -> None:
        """Flip one random bit, anywhere in the unit (header or body), with ``probability``."""
        p = _check_probability("corrupt", probability)
        for side in _sides(direction):
            self._faults[side].corrupt = p

    def set_duplicate(self, probability: float, direction: Direction = "both") -> None:
        """Send a unit twice in a row with ``probability``."""
        p = _check_probability("duplicate", probability)
        for side in _sides(direction):
            self._faults[side].duplicate = p

    def set_reorder(
        self, probability: float, direction: Direction = "both", *, max_hold: float = 0.5
    ) -> None:
        """Hold a unit with ``probability`` and send it right after the next one. A held unit
        with no successor within ``max_hold`` seconds (or at end of stream) goes out alone."""
        p = _check_probability("reorder", probability)
        max_hold = _check_seconds("max_hold", max_hold)
        for side in _sides(direction):
            self._faults[side].reorder = p
            self._faults[side].reorder_hold = max_hold

    def set_truncate(self, probability: float, direction: Direction = "both") -> None:
        """With ``probability``, send a strict prefix of a unit then close the connection."""
        p = _check_probability("truncate", probability)
        for side in _sides(direction):
            self._faults[side].truncate = p

    def blackhole(self, on: bool, direction: Direction = "both") -> None:
        """Silently swallow the traffic (a partition that keeps the sockets open)."""
        for side in _sides(direction):
            self._faults[side].blackhole = bool(on)

    def refuse(self, on: bool) -> None:
        """Accept then close at once every new connection (existing ones are untouched)."""
        self._refusing = bool(on)

    async def cut(self, *, reset: bool = False) -> None:
        """Close every current connection on both sides now, discarding anything in flight.
        ``reset`` makes both peers see a RST instead of a FIN. New connections still work."""
        conns = list(self._conns)
        self.stats["cuts"] += len(conns)
        for conn in conns:
            conn.close("reset" if reset else "abort")
        await self._settle()

    def clear(self) -> None:
        """Remove every fault (delay, drop, corrupt, duplicate, reorder, truncate, blackhole,
        refuse). Units already delayed or held keep their schedule."""
        for side in _SIDES:
            self._faults[side] = _Faults()
        self._refusing = False


# -- command line -------------------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faultproxy", description="Fault-injecting TCP proxy for tests."
    )
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--direction", choices=["up", "down", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="act on chunks, not frames")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS")
    for name in ("drop", "corrupt", "duplicate", "reorder", "truncate"):
        parser.add_argument(f"--{name}", type=float, default=0.0, metavar="P")
    parser.add_argument("--blackhole", action="store_true")
    return parser


def configure(proxy: FaultProxy, args: argparse.Namespace) -> None:
    """Apply parsed command-line faults to ``proxy``."""
    direction: Direction = args.direction
    proxy.set_delay(args.delay, direction, jitter=args.jitter)
    proxy.set_drop(args.drop, direction)
    proxy.set_corrupt(args.corrupt, direction)
    proxy.set_duplicate(args.duplicate, direction)
    proxy.set_reorder(args.reorder, direction)
    proxy.set_truncate(args.truncate, direction)
    proxy.blackhole(args.blackhole, direction)


async def _serve(args: argparse.Namespace) -> None:
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    proxy = FaultProxy(
        target_host,
        target_port,
        listen_host=listen_host,
        listen_port=listen_port,
        seed=args.seed,
        framed=not args.raw,
    )
    configure(proxy, args)
    async with proxy:
        print(f"faultproxy {listen_host}:{proxy.port} -> {target_host}:{target_port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            print(json.dumps(proxy.stats), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
