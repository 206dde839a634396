"""The fault-injecting test proxy (tests/faultproxy.py) against a real echo/sink server."""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from tests.faultproxy import FaultProxy, _address, _parser, configure

from engram_contract.formats.frame import BODY_LENGTH_OFFSET, HEADER_SIZE

WAIT = 2.0  # bound on anything that should happen
QUIET = 0.2  # how long "nothing arrives" is watched


def make_frame(body: bytes, tag: int = 0) -> bytes:
    """A frame as the proxy sees one: a frame header, noise but for its body length (u32 LE at
    BODY_LENGTH_OFFSET), then the body."""
    header = bytearray((tag * 7 + i) & 0xFF for i in range(HEADER_SIZE))
    struct.pack_into("<I", header, BODY_LENGTH_OFFSET, len(body))
    return bytes(header) + body


def frames(count: int, body_size: int = 32) -> list[bytes]:
    return [make_frame(bytes([n & 0xFF]) * body_size, tag=n) for n in range(count)]


class Target:
    """A loopback server that records what it receives and, if ``echo``, sends it back."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.received = bytearray()
        self.connections = 0
        self.closed = 0  # connections that ended (EOF or reset)
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), WAIT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()

    async def wait_received(self, size: int) -> bytes:
        await until(lambda: len(self.received) >= size)
        return bytes(self.received)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition`` holds."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - plain counters have no event to wait on
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), WAIT)


@pytest.fixture
async def echo() -> AsyncIterator[Target]:
    target = Target(echo=True)
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Target]:
    target = Target(echo=False)
    await target.start()
    yield target
    await target.stop()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await asyncio.wait_for(writer.drain(), WAIT)


async def receive(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), WAIT)


async def assert_quiet(reader: asyncio.StreamReader) -> None:
    """Nothing arrives, and the connection is not closed either."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """Everything up to the close; a reset counts as a close."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def test_proxy_passes_frames_split_across_writes(echo: Target) -> None:
    sent = make_frame(b"") + make_frame(b"x" * 100, tag=1) + make_frame(bytes(range(256)) * 20, 2)
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        h = HEADER_SIZE  # cut inside, at and after the first header, then inside the second
        cuts = [0, 1, h - 1, h, h + 6, 2 * h + 42, 2 * h + 43, 1000, len(sent)]
        for start, end in itertools.pairwise(cuts):
            await send(writer, sent[start:end])
            await asyncio.sleep(0.002)
        assert await receive(reader, len(sent)) == sent
        assert proxy.stats["frames_up"] == 3
        assert proxy.stats["frames_down"] == 3
        close(writer)


async def test_proxy_passes_raw_bytes_when_not_framed(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port, framed=False) as proxy:
        reader, writer = await connect(proxy)
        await send(writer, b"not a frame")  # shorter than a header: framed mode would hold it
        assert await receive(reader, 11) == b"not a frame"
        close(writer)


async def test_proxy_forwards_incomplete_frame_at_eof(sink: Target) -> None:
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        _, writer = await connect(proxy)
        partial = make_frame(b"y" * 50)[:80]
        await send(writer, partial)
        writer.write_eof()
        assert await sink.wait_received(80) == partial
        await until(lambda: sink.closed == 1)
        close(writer)


async def test_stats_count_connections_frames_and_bytes(echo: Target) -> None:
    sent = b"".join(frames(5))
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        for _ in range(2):
            reader, writer = await connect(proxy)
            await send(writer, sent)
            assert await receive(reader, len(sent)) == sent
            close(writer)
        assert proxy.stats["connections"] == 2
        assert proxy.stats["frames_up"] == proxy.stats["frames_down"] == 10
        assert proxy.stats["bytes_up"] == proxy.stats["bytes_down"] == 2 * len(sent)
        faults = ("dropped", "corrupted", "duplicated", "reordered", "truncated", "blackholed")
        assert all(proxy.stats[key] == 0 for key in faults)


async def test_delay_adds_at_least_the_delay_and_keeps_order(echo: Target) -> None:
    sent = frames(5)
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.set_delay(0.1, "up")
        loop = asyncio.get_running_loop()
        began = loop.time()
        await send(writer, sent[0])
        assert await receive(reader, len(sent[0])) == sent[0]
        assert loop.time() - began >= 0.1

        proxy.set_delay(0.1)  # both directions: a round trip pays it twice
        began = loop.time()
        for frame in sent:
            await send(writer, frame)
        assert await receive(reader, sum(map(len, sent))) == b"".join(sent)
        assert loop.time() - began >= 0.2
        close(writer)


async def test_drop_with_probability_one_drops_every_frame(sink: Target) -> None:
    sent = frames(4)
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        _, writer = await connect(proxy)
        proxy.set_drop(1.0, "up")
        await send(writer, b"".join(sent[:3]))
        await until(lambda: proxy.stats["frames_up"] == 3)
        await asyncio.sleep(QUIET)
        assert sink.received == b""
        assert proxy.stats["dropped"] == 3

        proxy.clear()
        await send(writer, sent[3])
        assert await sink.wait_received(len(sent[3])) == sent[3]
        close(writer)


async def test_drop_applies_to_its_direction_only(echo: Target) -> None:
    frame = make_frame(b"ping")
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.set_drop(1.0, "down")
        await send(writer, frame)
        assert await echo.wait_received(len(frame)) == frame  # up passed
        await assert_quiet(reader)  # the echo was dropped
        assert proxy.stats["dropped"] == 1
        close(writer)


async def test_corrupt_with_probability_one_flips_exactly_one_bit_per_frame(sink: Target) -> None:
    sent = frames(40, body_size=HEADER_SIZE)  # header and body the same size: both get hit
    async with FaultProxy("127.0.0.1", sink.port, seed=3) as proxy:
        _, writer = await connect(proxy)
        proxy.set_corrupt(1.0, "up")
        await send(writer, b"".join(sent))
        got = await sink.wait_received(sum(map(len, sent)))
        assert len(got) == sum(map(len, sent))
        positions = []
        offset = 0
        for frame in sent:
            out = got[offset : offset + len(frame)]
            offset += len(frame)
            diff = [a ^ b for a, b in zip(frame, out, strict=True)]
            assert sum(bin(d).count("1") for d in diff) == 1
            positions.append(next(i for i, d in enumerate(diff) if d))
        assert any(p < HEADER_SIZE for p in positions)
        assert any(p >= HEADER_SIZE for p in positions)
        assert proxy.stats["corrupted"] == 40
        close(writer)


async def test_duplicate_with_probability_one_sends_each_frame_twice(sink: Target) -> None:
    sent = frames(3)
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        _, writer = await connect(proxy)
        proxy.set_duplicate(1.0, "up")
        await send(writer, b"".join(sent))
        expected = b"".join(frame + frame for frame in sent)
        assert await sink.wait_received(len(expected)) == expected
        assert proxy.stats["duplicated"] == 3
        close(writer)


async def test_reorder_with_probability_one_swaps_adjacent_frames(sink: Target) -> None:
    f0, f1, f2, f3 = frames(4)
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        _, writer = await connect(proxy)
        proxy.set_reorder(1.0, "up")
        for frame in (f0, f1, f2, f3):
            await send(writer, frame)
        expected = f1 + f0 + f3 + f2
        assert await sink.wait_received(len(expected)) == expected
        assert proxy.stats["reordered"] == 2
        close(writer)


async def test_reorder_releases_a_held_frame_without_successor(sink: Target) -> None:
    frame = make_frame(b"alone")
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        _, writer = await connect(proxy)
        proxy.set_reorder(1.0, "up", max_hold=0.05)
        await send(writer, frame)
        assert await sink.wait_received(len(frame)) == frame
        assert proxy.stats["reordered"] == 0
        close(writer)


async def test_truncate_sends_a_prefix_then_cuts_the_connection(sink: Target) -> None:
    frame = make_frame(b"z" * 100)
    async with FaultProxy("127.0.0.1", sink.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.set_truncate(1.0, "up")
        await send(writer, frame)
        assert await read_to_close(reader) == b""  # the client's side is closed
        await until(lambda: sink.closed == 1)  # and so is the target's
        assert 0 < len(sink.received) < len(frame)
        assert frame.startswith(sink.received)
        assert proxy.stats["truncated"] == 1
        assert proxy.active_connections == 0
        close(writer)


async def test_blackhole_swallows_traffic_and_keeps_connection_open(echo: Target) -> None:
    first, second = frames(2)
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.blackhole(True)
        await send(writer, first)
        await assert_quiet(reader)
        assert echo.received == b""
        assert proxy.active_connections == 1

        proxy.blackhole(False)
        await send(writer, second)
        assert await receive(reader, len(second)) == second  # the first was swallowed
        assert proxy.stats["blackholed"] == 1
        close(writer)


async def test_blackhole_down_only_lets_traffic_up(echo: Target) -> None:
    frame = make_frame(b"one way")
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.blackhole(True, "down")
        await send(writer, frame)
        assert await echo.wait_received(len(frame)) == frame
        await assert_quiet(reader)
        close(writer)


async def test_cut_closes_every_connection_on_both_sides(echo: Target) -> None:
    frame = make_frame(b"hello")
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        clients = [await connect(proxy) for _ in range(2)]
        for reader, writer in clients:
            await send(writer, frame)
            assert await receive(reader, len(frame)) == frame
        await proxy.cut()
        for reader, _ in clients:
            assert await read_to_close(reader) == b""
        await until(lambda: echo.closed == 2)
        assert proxy.active_connections == 0
        assert proxy.stats["cuts"] == 2

        reader, writer = await connect(proxy)  # the proxy still accepts
        await send(writer, frame)
        assert await receive(reader, len(frame)) == frame
        close(writer)
        for _, old in clients:
            close(old)


async def test_cut_with_reset_resets_the_client(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        await until(lambda: proxy.active_connections == 1)
        await proxy.cut(reset=True)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), WAIT)
        close(writer)


async def test_refuse_closes_new_connections_only(echo: Target) -> None:
    frame = make_frame(b"still here")
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        old_reader, old_writer = await connect(proxy)
        await until(lambda: proxy.active_connections == 1)
        proxy.refuse(True)
        reader, writer = await connect(proxy)
        assert await read_to_close(reader) == b""
        close(writer)
        assert proxy.stats["refused"] == 1

        await send(old_writer, frame)  # the existing connection is untouched
        assert await receive(old_reader, len(frame)) == frame

        proxy.refuse(False)
        reader, writer = await connect(proxy)
        await send(writer, frame)
        assert await receive(reader, len(frame)) == frame
        assert proxy.stats["connections"] == 2
        close(writer)
        close(old_writer)


async def test_stop_closes_connections_and_listener(echo: Target) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        await until(lambda: proxy.active_connections == 1)
        port = proxy.port
    assert await read_to_close(reader) == b""
    close(writer)
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)


async def test_proxy_closes_client_when_target_is_down() -> None:
    target = Target(echo=True)
    await target.start()
    port = target.port
    await target.stop()
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await connect(proxy)
        assert await read_to_close(reader) == b""
        close(writer)
        assert proxy.stats["connect_failed"] == 1


async def test_seed_makes_fault_pattern_reproducible(sink: Target) -> None:
    sent = frames(30)

    async def delivered(seed: int) -> bytes:
        sink.received.clear()
        async with FaultProxy("127.0.0.1", sink.port, seed=seed) as proxy:
            proxy.set_drop(0.5, "up")
            _, writer = await connect(proxy)
            await send(writer, b"".join(sent))
            await until(lambda: proxy.stats["frames_up"] == len(sent))
            kept = (len(sent) - proxy.stats["dropped"]) * len(sent[0])
            got = await sink.wait_received(kept)
            close(writer)
            return got

    first = await delivered(7)
    assert 0 < len(first) < len(b"".join(sent))
    assert await delivered(7) == first
    assert await delivered(8) != first


@pytest.mark.parametrize(
    ("setter", "value", "direction"),
    [
        ("set_drop", 1.5, "both"),
        ("set_corrupt", -0.1, "up"),
        ("set_duplicate", math.nan, "down"),
        ("set_reorder", 0.5, "sideways"),
        ("set_truncate", 0.5, "left"),
        ("set_delay", -1.0, "both"),
        ("set_delay", math.nan, "up"),
    ],
)
def test_fault_setters_reject_bad_arguments(setter: str, value: float, direction: str) -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError):
        getattr(proxy, setter)(value, direction)


def test_port_before_start_raises() -> None:
    with pytest.raises(RuntimeError):
        _ = FaultProxy("127.0.0.1", 1).port


def test_cli_parses_addresses_and_faults() -> None:
    assert _address("127.0.0.1:7001") == ("127.0.0.1", 7001)
    with pytest.raises(Exception, match="HOST:PORT"):
        _address("7001")
    args = _parser().parse_args(
        ["--target", "127.0.0.1:6001", "--delay", "0.05", "--drop", "0.25", "--direction", "up"]
    )
    assert args.target == ("127.0.0.1", 6001)
    proxy = FaultProxy(*args.target)
    configure(proxy, args)
    assert proxy._faults["up"].delay == 0.05
    assert proxy._faults["up"].drop == 0.25
    assert proxy._faults["down"].drop == 0.0
