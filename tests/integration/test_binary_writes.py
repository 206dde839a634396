"""Binary writes (`application/x-engram-entries`, issue 13) through real sidecar processes.

Written with the package's own clients (`engram_contract.writes`), replicated under quorum
byte-identically, mixed with NDJSON writes on the same space, and refused whole when malformed.
Every wait is bounded; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from tests.integration.cluster import Cluster, encoded

from engram_contract.formats import records
from engram_contract.formats.entry import EntryType
from engram_contract.writes import EntriesClient, SyncEntriesClient, WriteError, WriteResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SPACE = "bin"


def _payload(tag: str, i: int) -> bytes:
    # Not JSON on purpose for some: a binary write stores opaque bytes.
    return f"{tag}-{i:05d}".encode() + (b"\x00\xff" if i % 3 == 0 else b"") + b"." * (i % 50)


async def test_binary_writes_replicate_byte_identical_under_quorum(cluster: Cluster) -> None:
    await cluster.start_nodes(3, segment_bytes=64 * 1024)  # rotation inside the run
    await cluster.assign(SPACE, "n0", ["n1", "n2"], ack_policy="quorum")
    sent: dict[int, tuple[int, bytes]] = {}
    async with EntriesClient(cluster["n0"].url) as client:
        for b in range(40):
            batch = [
                (
                    int(EntryType.MEMORY_UPDATE) if i % 2 else int(EntryType.EPISODE_STORE),
                    _payload(f"b{b}", i),
                )
                for i in range(25)
            ]
            res = await client.write(SPACE, batch)
            assert res.last_sequence - res.first_sequence + 1 == len(batch)
            assert res.epoch == 1
            for k, rec in enumerate(batch):
                sent[res.first_sequence + k] = rec
    # The sync client, from a thread (it blocks), on the same space.
    with SyncEntriesClient(cluster["n0"].url) as sync:
        tail = await asyncio.to_thread(sync.write, SPACE, [b"sync-1", b"sync-2"])
    sent[tail.first_sequence] = (int(EntryType.EPISODE_STORE), b"sync-1")
    sent[tail.last_sequence] = (int(EntryType.EPISODE_STORE), b"sync-2")
    assert sorted(sent) == list(range(1, len(sent) + 1))

    view = await cluster.wait_replicated(SPACE, "n0", timeout=30)
    assert view["last_sequence"] == len(sent)
    assert cluster.assert_wal_identical(SPACE, "n0", ["n1", "n2"]) > 64 * 1024
    entries = cluster["n1"].wal_entries(SPACE)
    assert [(e.entry_type, e.payload) for e in entries] == [sent[s] for s in sorted(sent)]
    assert {e.epoch for e in entries} == {1}

    # Read back through the API: opaque payloads come back as base64, and the types by name.
    r = await cluster.request("GET", "n0", f"/v1/spaces/{SPACE}/entries?from=1&limit=2")
    assert r.status == 200, r
    assert r.body["entries"][1]["type"] == "update"
    assert "payload_b64" in r.body["entries"][0]


async def test_binary_and_ndjson_writes_interleave(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    await cluster.assign(SPACE, "n0", ["n1"], ack_policy="one")
    acked: list[tuple[int, int, list[bytes]]] = []

    async def binary(w: int) -> None:
        async with EntriesClient(cluster["n0"].url) as client:
            for b in range(15):
                batch = [_payload(f"w{w}b{b}", i) for i in range(20)]
                res = await client.write(SPACE, batch)
                acked.append((res.first_sequence, res.last_sequence, batch))

    async def ndjson(w: int) -> None:
        for b in range(15):
            docs = [{"w": w, "b": b, "i": i} for i in range(20)]
            r = await cluster.write_ndjson("n0", SPACE, docs)
            assert r.status == 200, r
            acked.append(
                (r.body["first_sequence"], r.body["last_sequence"], [encoded(d) for d in docs])
            )

    await asyncio.wait_for(asyncio.gather(binary(0), binary(1), ndjson(2), ndjson(3)), 60)
    acked.sort()
    assert [a[0] for a in acked] == [1 + 20 * k for k in range(len(acked))]  # tiles, no gaps
    last = acked[-1][1]
    await cluster.wait_replicated(SPACE, "n0", timeout=30)
    cluster.assert_wal_identical(SPACE, "n0", ["n1"])
    by_seq = {e.sequence: e.payload for e in cluster["n1"].wal_entries(SPACE)}
    assert len(by_seq) == last
    for first, end, payloads in acked:
        assert [by_seq[s] for s in range(first, end + 1)] == payloads


def _rec(etype: int, payload: bytes, *, length: int | None = None) -> bytes:
    return struct.pack("<II", etype, len(payload) if length is None else length) + payload


MALFORMED = {
    "empty": (b"", records.EMPTY),
    "truncated header": (_rec(1, b"ok") + b"\x01\x00\x00", records.TRUNCATED),
    "length past end": (_rec(1, b"ok") + _rec(1, b"abc", length=4), records.PAST_END),
    "unknown type": (_rec(1, b"ok") + _rec(7, b"x"), records.UNKNOWN_TYPE),
    "type zero": (_rec(0, b"x"), records.UNKNOWN_TYPE),
}


async def test_malformed_binary_bodies_write_nothing(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    await cluster.assign(SPACE, "n0", ["n1"])
    async with EntriesClient(cluster["n0"].url) as client:
        good = await client.write(SPACE, [b"before"])
        assert good == WriteResult(1, 1, 1)
        for name, (body, code) in MALFORMED.items():
            with pytest.raises(WriteError) as err:
                await client.write_body(SPACE, body)
            assert err.value.status == 400, name
            assert err.value.code == code, name
            assert isinstance(err.value.body, dict)
            assert err.value.body["message"], name
        # More records than a request may carry: refused whole as well.
        many = records.encode_records([(1, b"x")] * 10_001)
        with pytest.raises(WriteError) as err:
            await client.write_body(SPACE, many)
        assert (err.value.status, err.value.code) == (400, records.TOO_MANY)
        after = await client.write(SPACE, [b"after"])
        assert after.first_sequence == 2  # nothing in between was written
    await cluster.wait_replicated(SPACE, "n0", timeout=30)
    assert [e.payload for e in cluster["n1"].wal_entries(SPACE)] == [b"before", b"after"]


async def test_client_reports_not_primary(cluster: Cluster) -> None:
    await cluster.start_nodes(2)
    await cluster.assign(SPACE, "n0", ["n1"])
    async with EntriesClient(cluster["n1"].url) as client:
        with pytest.raises(WriteError) as err:
            await client.write(SPACE, [b"x"])
    assert (err.value.status, err.value.code) == (421, "not_primary")
    assert err.value.primary == cluster["n0"].http  # where to retry
    with SyncEntriesClient(cluster["n1"].url) as sync, pytest.raises(WriteError) as serr:
        await asyncio.to_thread(sync.write, SPACE, [b"x"])
    assert (serr.value.status, serr.value.code) == (421, "not_primary")
