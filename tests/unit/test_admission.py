"""The replication port before authentication: connection caps (`replication.admission`), the
handshake's small body limit and single deadline (`replication.transport`), and the listener that
applies them (Receiver), on real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engram_contract.errors import ConfigError, FrameTooLarge, WireError
from engram_contract.formats.frame import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from engram_contract.formats.messages import (
    MAX_NACK_MESSAGE,
    MAX_NODE_NAME,
    NONCE_SIZE,
    PROOF_SIZE,
    Challenge,
    Hello,
    Nack,
    NackReason,
)
from engram_contract.ids import NodeName
from engram_sidecar.config import SidecarConfig, load_config
from engram_sidecar.metrics import Metrics
from engram_sidecar.replication.admission import Admission, Refused
from engram_sidecar.replication.receiver import Receiver
from engram_sidecar.replication.transport import (
    HANDSHAKE_MAX_BODY,
    ClosedSilently,
    HandshakeTimeout,
    client_handshake,
    next_frames,
    read_frame,
    server_handshake,
)

HOST = "127.0.0.1"
SECRET = b"s" * 32
C, S = NodeName("n-client"), NodeName("n-server")
WAIT = 5.0  # bound on every wait in these tests


# ---- Admission: the caps, pure -----------------------------------------------------------------


def test_admission_caps_handshakes_per_source() -> None:
    adm = Admission(max_connections=10, max_handshakes_per_source=2)
    adm.admit("10.0.0.1")
    adm.admit("10.0.0.1")
    with pytest.raises(Refused) as err:
        adm.admit("10.0.0.1")
    assert err.value.reason == "max_handshakes_per_source"
    adm.admit("10.0.0.2")  # another source has its own budget
    assert (adm.open, adm.handshaking) == (3, 3)


def test_admission_caps_connections_in_total() -> None:
    adm = Admission(max_connections=3, max_handshakes_per_source=3)
    tickets = [adm.admit(f"10.0.0.{i}") for i in range(3)]
    with pytest.raises(Refused) as err:
        adm.admit("10.0.0.9")
    assert err.value.reason == "max_connections"
    adm.release(tickets[0])
    adm.admit("10.0.0.9")


def test_admission_authenticated_connections_leave_the_source_count_not_the_total() -> None:
    adm = Admission(max_connections=3, max_handshakes_per_source=1)
    first = adm.admit("127.0.0.1")
    adm.authenticated(first)
    second = adm.admit("127.0.0.1")  # the same address may hold several proven peers
    assert (adm.open, adm.handshaking, adm.handshaking_from("127.0.0.1")) == (2, 1, 1)
    adm.authenticated(second)
    adm.admit("127.0.0.1")
    with pytest.raises(Refused, match="max_peer_connections"):
        adm.admit("10.0.0.1")


def test_admission_release_is_idempotent_and_forgets_idle_sources() -> None:
    adm = Admission(max_connections=2, max_handshakes_per_source=2)
    t = adm.admit("10.0.0.1")
    adm.release(t)
    adm.release(t)
    adm.authenticated(t)  # late: changes nothing
    assert (adm.open, adm.handshaking, adm.handshaking_from("10.0.0.1")) == (0, 0, 0)
    assert adm._handshaking == {}  # no entry kept per address ever seen


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"max_peer_connections": "0"}, "max_peer_connections=0: must be greater than 0"),
        ({"max_peer_handshakes_per_source": "0"}, "must be greater than 0"),
        ({"handshake_timeout": "0"}, "handshake_timeout=0.0: must be greater than 0"),
        (
            {"max_peer_connections": "8", "max_peer_handshakes_per_source": "9"},
            "must be at most max_peer_connections",
        ),
    ],
)
def test_config_refuses_bad_connection_caps(flags: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(flags={"node": "n0", **flags}, env={})


def test_config_connection_cap_defaults() -> None:
    cfg = load_config(flags={"node": "n0"}, env={})
    assert (cfg.max_peer_connections, cfg.max_peer_handshakes_per_source) == (256, 32)
    assert cfg.handshake_timeout == 5.0


# ---- transport: handshake frames, exactly and under one deadline -----------------------------


def _header(msg_type: MessageType, body_length: int) -> bytes:
    """A well-formed frame header declaring `body_length` (its CRC is never reached)."""
    return HEADER.pack(MAGIC, VERSION, msg_type, 0, 0, bytes(16), 0, 0, 0, body_length, 0, 0)


def test_handshake_limit_holds_the_largest_legitimate_handshake_frames() -> None:
    longest = NodeName("n" * MAX_NODE_NAME)
    nack = Nack(NackReason.UNAUTHENTICATED, message="x" * MAX_NACK_MESSAGE).encode()
    challenge = Challenge(longest, bytes(NONCE_SIZE), bytes(PROOF_SIZE)).encode()
    hello = Hello(longest, bytes(NONCE_SIZE)).encode()
    for frame in (nack, challenge, hello):
        assert len(frame) - HEADER_SIZE <= HANDSHAKE_MAX_BODY
        FrameDecoder(max_body=HANDSHAKE_MAX_BODY).feed(frame)


@contextlib.asynccontextmanager
async def _server(
    handler: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> AsyncIterator[int]:
    """A listener on 127.0.0.1 that hands its first connection to `handler`; yields the port."""

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not handler.done():
            handler.set_result((r, w))

    server = await asyncio.start_server(accept, HOST, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        if handler.done():
            handler.result()[1].transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), WAIT)


async def _accepted(
    port: int, got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]:
    cr, cw = await asyncio.wait_for(asyncio.open_connection(HOST, port), WAIT)
    sr, sw = await asyncio.wait_for(got, WAIT)
    return cr, cw, sr, sw


async def test_server_handshake_refuses_a_large_declared_body_at_its_header() -> None:
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    async with _server(got) as port:
        _, cw, sr, sw = await _accepted(port, got)
        cw.write(_header(MessageType.HELLO, 16 * 1024 * 1024))  # and never a body byte
        t0 = time.monotonic()
        with pytest.raises(FrameTooLarge, match="over the 1024-byte limit"):
            await server_handshake(sr, sw, secret=SECRET, node=S, timeout=WAIT)
        assert time.monotonic() - t0 < WAIT / 2  # at the header, not at the deadline
        cw.close()


async def test_server_handshake_has_one_deadline_that_trickling_cannot_extend() -> None:
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    async with _server(got) as port:
        _, cw, sr, sw = await _accepted(port, got)
        header = _header(MessageType.HELLO, 100)

        async def trickle() -> None:
            for b in header + bytes(100):
                cw.write(bytes([b]))
                await asyncio.sleep(0.05)  # always well within any per-read timeout

        feeder = asyncio.create_task(trickle())
        t0 = time.monotonic()
        with pytest.raises(HandshakeTimeout):
            await server_handshake(sr, sw, secret=SECRET, node=S, timeout=0.5)
        took = time.monotonic() - t0
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        cw.close()
    assert 0.4 < took < 2.0, took


async def test_server_handshake_tells_a_bare_connect_from_a_cut_handshake() -> None:
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    async with _server(got) as port:
        _, cw, sr, sw = await _accepted(port, got)
        cw.close()
        with pytest.raises(ClosedSilently):
            await server_handshake(sr, sw, secret=SECRET, node=S, timeout=WAIT)
    got = asyncio.Future()
    async with _server(got) as port:
        _, cw, sr, sw = await _accepted(port, got)
        cw.write(_header(MessageType.HELLO, 100)[:10])
        cw.close()
        with pytest.raises(WireError) as err:
            await server_handshake(sr, sw, secret=SECRET, node=S, timeout=WAIT)
        assert not isinstance(err.value, ClosedSilently)


async def test_handshake_reads_nothing_past_itself_so_the_next_decoder_gets_every_frame() -> None:
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Future()
    async with _server(got) as port:
        cr, cw, sr, sw = await _accepted(port, got)
        server = asyncio.create_task(server_handshake(sr, sw, secret=SECRET, node=S, timeout=WAIT))
        early = await client_handshake(
            cr, cw, FrameDecoder(), secret=SECRET, node=C, expect=S, timeout=WAIT
        )
        assert early == []
        assert await asyncio.wait_for(server, WAIT) == C
        # A large frame right after the handshake: allowed now, under the connection's limit.
        big = encode_frame(
            MessageType.BATCH,
            bytes(64 * 1024),
            space=b"\x01" * 16,
            first_seq=1,
            last_seq=1,
            count=1,
        )
        cw.write(Nack(NackReason.INTERNAL, message="after").encode() + big)
        decoder = FrameDecoder(max_body=1 << 20)
        frames = await next_frames(sr, decoder, WAIT)
        while len(frames) < 2:
            frames += await next_frames(sr, decoder, WAIT)
        assert [f.msg_type for f in frames] == [MessageType.NACK, MessageType.BATCH]
        cw.close()


async def test_read_frame_refuses_a_body_over_its_limit_before_reading_it() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(_header(MessageType.HELLO, HANDSHAKE_MAX_BODY + 1))
    with pytest.raises(FrameTooLarge):
        await asyncio.wait_for(read_frame(reader, max_body=HANDSHAKE_MAX_BODY), WAIT)


# ---- Receiver: the caps on a real listener ---------------------------------------------------


def _cfg(tmp_path: Path, **flags: str) -> SidecarConfig:
    return load_config(flags={"node": "n-server", "data_dir": str(tmp_path), **flags}, env={})


@contextlib.asynccontextmanager
async def _receiver(cfg: SidecarConfig) -> AsyncIterator[tuple[Receiver, int, Metrics]]:
    metrics = Metrics(CollectorRegistry())
    rec = Receiver(cfg=cfg, node=S, secret=lambda: SECRET, metrics=metrics, lookup=lambda _: None)
    port = await rec.start(HOST, 0)
    try:
        yield rec, port, metrics
    finally:
        await rec.stop()


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), WAIT) == b""
    except ConnectionError:
        return True


async def test_receiver_closes_sockets_over_the_per_source_cap_at_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_peer_connections="8", max_peer_handshakes_per_source="2")
    async with _receiver(cfg) as (_, port, metrics):
        held = [await asyncio.open_connection(HOST, port) for _ in range(2)]
        gauge = "engram_replication_peer_connections"
        await _until(lambda: _sample(metrics, gauge, state="handshake") == 2, "2 handshakes")
        r, w = await asyncio.open_connection(HOST, port)
        t0 = time.monotonic()
        assert await _closed_by_server(r)
        assert time.monotonic() - t0 < cfg.handshake_timeout / 2  # at once, not at the deadline
        refused = "engram_replication_connections_refused_total"
        assert _sample(metrics, refused, reason="max_handshakes_per_source") == 1
        assert _sample(metrics, gauge, state="handshake") == 2
        for _, hw in [*held, (r, w)]:
            hw.close()
        await _until(lambda: _sample(metrics, gauge, state="handshake") == 0, "sockets released")


async def test_receiver_caps_connections_in_total(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_peer_connections="3", max_peer_handshakes_per_source="3")
    async with _receiver(cfg) as (_, port, metrics):
        held = [await asyncio.open_connection(HOST, port) for _ in range(3)]
        gauge = "engram_replication_peer_connections"
        await _until(lambda: _sample(metrics, gauge, state="handshake") == 3, "3 handshakes")
        r, w = await asyncio.open_connection(HOST, port)
        assert await _closed_by_server(r)
        refused = "engram_replication_connections_refused_total"
        assert _sample(metrics, refused, reason="max_connections") == 1
        for _, hw in [*held, (r, w)]:
            hw.close()


async def test_receiver_lets_authenticated_peers_past_the_per_source_cap(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, max_peer_connections="8", max_peer_handshakes_per_source="1")
    async with _receiver(cfg) as (_, port, metrics):
        peers = []
        for _ in range(3):  # three proven peers from one address, one at a time
            r, w = await asyncio.open_connection(HOST, port)
            await client_handshake(
                r, w, FrameDecoder(), secret=SECRET, node=C, expect=S, timeout=WAIT
            )
            peers.append(w)
        gauge = "engram_replication_peer_connections"
        await _until(lambda: _sample(metrics, gauge, state="authenticated") == 3, "3 peers")
        assert (
            _sample(
                metrics,
                "engram_replication_connections_refused_total",
                reason="max_handshakes_per_source",
            )
            == 0
        )
        for w in peers:
            w.close()


async def test_receiver_drops_a_trickling_handshake_at_the_deadline(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, handshake_timeout="0.5")
    async with _receiver(cfg) as (_, port, metrics):
        r, w = await asyncio.open_connection(HOST, port)
        header = _header(MessageType.HELLO, 200)
        t0 = time.monotonic()
        closed = asyncio.create_task(_closed_by_server(r))
        for b in header:
            if closed.done():
                break
            w.write(bytes([b]))
            with contextlib.suppress(ConnectionError):
                await w.drain()
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(closed, WAIT)
        assert time.monotonic() - t0 < 2.0
        assert _sample(metrics, "engram_replication_auth_failures_total") == 1
        w.close()
