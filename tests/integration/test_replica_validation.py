"""A real replica checks each entry of a BATCH once, as the frame is parsed (issue 13), and
refuses a bad one with the protocol's NACK codes, writing nothing of it.

This test plays the primary on an authenticated replication connection to a real sidecar
process (the wire modules directly), so it can send what a healthy primary never would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from tests.integration.cluster import HOST, Cluster

from engram_contract.assignment import Member, assignment_document
from engram_contract.formats.batch import encode_batch
from engram_contract.formats.entry import HEADER_SIZE, encode_entries
from engram_contract.formats.frame import FrameDecoder
from engram_contract.formats.messages import Ack, Nack, NackReason, decode_message
from engram_contract.ids import NodeName, SpaceId, space_wire_id
from engram_sidecar.replication.transport import client_handshake, next_frames

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SPACE = "checks"
WIRE = space_wire_id(SpaceId(SPACE))
PRIMARY = NodeName("fake-primary")


def _entries(first: int, count: int, *, epoch: int = 1) -> bytes:
    data, _ = encode_entries(
        [(1, b"entry-%d" % (first + i)) for i in range(count)],
        first_sequence=first,
        timestamp_ns=1_700_000_000_000_000_000,
        epoch=epoch,
    )
    return data


def _batch(first: int, entries: bytes, count: int, *, epoch: int = 1, prev: int = 1) -> bytes:
    return encode_batch(
        space=WIRE,
        epoch=epoch,
        first_seq=first,
        last_seq=first + count - 1,
        count=count,
        entries=entries,
        prev_epoch=0 if first == 1 else prev,
    )


class Link:
    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.decoder = r, w, FrameDecoder()

    async def send(self, frame: bytes) -> Ack | Nack:
        """Send one frame; the replica's first ACK or NACK for it."""
        self.w.write(frame)
        await self.w.drain()
        while True:
            for f in await next_frames(self.r, self.decoder, 10.0):
                msg = decode_message(f)
                if isinstance(msg, Ack | Nack):
                    return msg


@asynccontextmanager
async def _link(cluster: Cluster) -> AsyncIterator[Link]:
    node = cluster["n1"]
    r, w = await asyncio.wait_for(asyncio.open_connection(HOST, node.replication_port), 5.0)
    try:
        await client_handshake(
            r,
            w,
            FrameDecoder(),
            secret=cluster.secret_file.read_bytes().strip(),
            node=PRIMARY,
            expect=NodeName("n1"),
            timeout=5.0,
        )
        yield Link(r, w)
    finally:
        w.close()


async def _assign(cluster: Cluster, epoch: int) -> None:
    # The primary is this test (it dials and never listens: port 9 is discard).
    doc = assignment_document(epoch, [Member(PRIMARY, f"{HOST}:9"), cluster["n1"].member()])
    r = await cluster.put_assignment("n1", SPACE, doc)
    assert r.status == 200, r


async def test_replica_refuses_bad_batches_with_the_nack_codes(cluster: Cluster) -> None:
    await cluster.start_nodes(2)  # n1 is the replica under test
    await _assign(cluster, 1)
    held = _entries(1, 3)
    async with _link(cluster) as link:
        ack = await link.send(_batch(1, held, 3))
        assert isinstance(ack, Ack) and ack.sequence == 3

        # A gap: entries 5..6 don't follow entry 3.
        nack = await link.send(_batch(5, _entries(5, 2), 2))
        assert isinstance(nack, Nack) and nack.reason == NackReason.GAP
        assert nack.resend_from == 4

    # A payload CRC broken under a valid frame CRC (encode_batch computes it over the bad
    # bytes): the replica's own per-entry check catches it.
    bad = bytearray(_entries(4, 2))
    bad[HEADER_SIZE + 2] ^= 0x20
    async with _link(cluster) as link:
        nack = await link.send(_batch(4, bytes(bad), 2))
        assert isinstance(nack, Nack) and nack.reason == NackReason.CHECKSUM
        assert "payload CRC32C" in nack.message

    # An entry written at an epoch above the frame's: no primary ships that.
    async with _link(cluster) as link:
        nack = await link.send(_batch(4, _entries(4, 2, epoch=2), 2))
        assert isinstance(nack, Nack) and nack.reason == NackReason.CHECKSUM
        assert "epoch 2 above" in nack.message

    # A sequence jump inside the batch (4, then 6), the frame header claiming 4..5.
    async with _link(cluster) as link:
        nack = await link.send(_batch(4, _entries(4, 1) + _entries(6, 1), 2))
        assert isinstance(nack, Nack) and nack.reason == NackReason.CHECKSUM
        assert "sequence 6, expected 5" in nack.message

    # A frame of an epoch older than the replica accepted.
    await _assign(cluster, 2)
    async with _link(cluster) as link:
        nack = await link.send(_batch(4, _entries(4, 2), 2, epoch=1))
        assert isinstance(nack, Nack) and nack.reason == NackReason.STALE_EPOCH
        # ...and at the current epoch, the same entries go in after all that.
        ack = await link.send(_batch(4, _entries(4, 2), 2, epoch=2))
        assert isinstance(ack, Ack) and ack.sequence == 5, ack

    # Nothing of the refused batches was written: the log is the good entries, byte for byte.
    assert cluster["n1"].wal_bytes(SPACE) == held + _entries(4, 2)
