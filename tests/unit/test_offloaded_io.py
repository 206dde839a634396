"""Snapshot installs and sealed-segment scans run off the event loop (issue 13, "No stalls").

Each test records which thread did the blocking file work (fsyncs, the snapshot swap, the
segment scans) and which callables went through the node's injected `Offload`, and fails if the
event loop's own thread did any of it. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from engram_contract.assignment import Assignment, Member
from engram_contract.formats.batch import encode_snapshot_chunk
from engram_contract.formats.frame import FrameDecoder
from engram_contract.formats.messages import (
    SnapshotAck,
    SnapshotBegin,
    SnapshotEnd,
    decode_message,
)
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_sidecar import api
from engram_sidecar.config import SidecarConfig
from engram_sidecar.log import segment, snapshot, wal
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.offload import prepare_read
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.metrics import Metrics
from engram_sidecar.node import Node
from engram_sidecar.replication.catchup import TokenBucket
from engram_sidecar.replication.stream import Stream
from engram_sidecar.space.hosted import Space

T = TypeVar("T")


class Recorder:
    """An `Offload` that runs the work in a thread, as the default does, and names it."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def __call__(self, fn: Callable[[], T]) -> T:
        self.ran.append(getattr(fn, "__name__", repr(fn)))
        return await asyncio.to_thread(fn)


def _threads_of(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Wrap `module.name` to record the thread of each call."""
    seen: list[int] = []
    real = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def _config(tmp_path: Path, **extra: Any) -> SidecarConfig:
    """Node n0's settings under `tmp_path`, with a shared secret written there."""
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    return SidecarConfig(
        node="n0", data_dir=tmp_path / "data", replication_port=0, secret_file=secret, **extra
    )


def _member(n: str) -> Member:
    i = int(n[1])
    return Member(NodeName(n), f"127.0.0.1:{1000 + i}", f"127.0.0.1:{2000 + i}")


async def test_snapshot_install_swaps_files_and_opens_the_new_log_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path)
    rec = Recorder()
    node = Node(cfg, offload=rec)
    await node.start()
    try:
        a = Assignment(1, _member("n1"), (_member("n0"),), "async")
        _, sp = node.assign("space-s", a)
        sp.log.append([(1, b"old")] * 10, epoch=1)  # the live log the snapshot replaces
        primary = SpaceLog(tmp_path / "p", space=SpaceId("space-s"), segment_bytes=4096)
        primary.append([(1, b"p" * 50)] * 300, epoch=1)
        b = snapshot.SnapshotBuilder(
            sp.path,
            space=sp.id,
            first=1,
            last=300,
            epoch=1,
            history=primary.history,
            segment_bytes=4096,
        )
        seq = 1
        while seq <= 300:
            r = primary.read(seq, max_entries=300)
            b.append(r.data)
            seq = r.last_sequence + 1
        b.finish()
        loop_thread = threading.get_ident()
        fsyncs = _threads_of(monkeypatch, os, "fsync")
        swaps = _threads_of(monkeypatch, snapshot, "install")
        scans = _threads_of(monkeypatch, wal, "scan")
        old = sp.log

        await node.install_snapshot(sp)

        assert swaps and fsyncs and scans, "the install did no file work at all?"
        assert loop_thread not in swaps, "the snapshot swap ran on the event loop"
        assert loop_thread not in fsyncs, "an fsync of the install ran on the event loop"
        assert loop_thread not in scans, "the new log's recovery scan ran on the event loop"
        assert rec.ran == ["swap"]
        assert sp.log is not old and node.store.get(sp.id) is sp.log
        assert (sp.log.first_sequence, sp.log.last_sequence) == (1, 300)
        assert not sp.installing_snapshot
        sp.log.append([(1, b"next")], epoch=1)  # the new log is the one written to
        assert sp.log.last_sequence == 301
    finally:
        await node.stop()


async def test_snapshot_install_finishes_even_if_the_connection_is_cancelled(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    gate = threading.Event()

    async def held(fn: Callable[[], T]) -> T:
        def run() -> T:
            gate.wait(10.0)
            return fn()

        return await asyncio.to_thread(run)

    node = Node(cfg, offload=held)
    await node.start()
    try:
        a = Assignment(1, _member("n1"), (_member("n0"),), "async")
        _, sp = node.assign("space-s", a)
        b = snapshot.SnapshotBuilder(
            sp.path, space=sp.id, first=1, last=0, epoch=1, history=[], segment_bytes=4096
        )
        b.finish()
        asking = asyncio.create_task(node.install_snapshot(sp))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sp.installing_snapshot  # the old log is closed, the new one not yet open
        assert sp.log.delete_before(1 << 40) == 0  # retention leaves a closed log's files alone
        asking.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asking
        for _ in range(200):
            if not sp.installing_snapshot:
                break
            await asyncio.sleep(0.01)
        assert not sp.installing_snapshot
        assert node.store.get(sp.id) is sp.log
        sp.log.append([(1, b"x")], epoch=1)
    finally:
        gate.set()
        await node.stop()


async def test_a_sealed_segment_is_opened_and_indexed_off_the_loop_before_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    log = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)
    log.append([(1, b"p" * 50)] * 300, epoch=1)
    log.close()
    log = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)  # sealed segments: no index yet
    sealed = log.segments[:-1]
    assert len(sealed) >= 2 and all(s.index is None for s in sealed)
    loop_thread = threading.get_ident()
    scans = _threads_of(monkeypatch, segment, "scan")
    scans_w = _threads_of(monkeypatch, wal, "scan")
    rec = Recorder()
    for seg in sealed:
        mid = seg.first_sequence + 5
        assert log.index_job(mid) is not None
        assert await prepare_read(log, mid, rec)
        assert log.index_job(mid) is None  # indexed, and its fd open
        r = log.read(mid, max_entries=3)
        assert (r.first_sequence, r.count) == (mid, 3)
    assert rec.ran == ["run"] * len(sealed)
    assert scans + scans_w, "no scan ran at all?"
    assert loop_thread not in scans + scans_w, "a sealed segment was scanned on the event loop"
    log.close()


async def test_an_index_scanned_across_a_truncation_is_not_adopted(tmp_path: Path) -> None:
    d = tmp_path / "s"
    log = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)
    log.append([(1, b"p" * 50)] * 300, epoch=1)
    log.close()
    log = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)
    job = log.index_job(1)
    assert job is not None
    fd, index = await asyncio.to_thread(job.run)
    log.truncate_after(20)  # cuts the very segment the job scanned
    log.adopt_index(job, fd, index)
    assert log.segments[0].index is None  # the stale index was dropped, its fd closed
    assert log.read(1, max_entries=100).last_sequence == 20
    log.close()


async def test_a_snapshot_stream_stops_at_an_unindexed_segment_until_the_link_indexes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    d = tmp_path / "s"
    first = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)
    first.append([(1, b"p" * 50)] * 300, epoch=1)
    first.close()
    log = SpaceLog(d, space=SpaceId("s"), segment_bytes=4096)
    sp = Space(
        space=SpaceId("s"),
        node=NodeName("n0"),
        wal=log,
        commit=GroupCommit(log, policy="none"),
        batch_max_entries=100,
        batch_max_delay=0.01,
    )
    sp.membership.accepted_epoch = 1
    sp.apply_assignment(Assignment(1, _member("n0"), (_member("n1"),), "async"))
    assert sp.role == "primary"
    s = Stream(
        sp,
        NodeName("n1"),
        metrics=Metrics(CollectorRegistry()),
        bucket=TokenBucket(rate=1e12, burst=1e12),
        threshold=10,
        heartbeat_interval=60.0,
        window=4,
    )
    sent: list[bytes] = []
    s._begin_snapshot(sent.append, "test", 0.0)
    s.snap_started = True  # the replica answered SNAPSHOT_BEGIN
    loop_thread = threading.get_ident()
    on_read = _threads_of(monkeypatch, segment, "scan")  # a read's own scan (seek_offset)
    offloaded = _threads_of(monkeypatch, wal, "scan")  # IndexJob.run's
    begun = len(sent)
    assert s.read_ahead() == 1
    assert s.fill(sent.append, 0.0) == 0.0  # a retry right away, once indexed
    assert len(sent) == begun, "a chunk was read from an unindexed segment on the loop"
    prepared = 0
    while (seq := s.read_ahead()) is not None and prepared < 10:
        assert await prepare_read(sp.log, seq)
        prepared += 1
        s.fill(sent.append, 0.0)
    assert prepared >= 1 and len(sent) > begun
    assert not on_read, "a read scanned its segment itself"
    assert offloaded and loop_thread not in offloaded, "a segment scan ran on the event loop"
    log.close()


async def test_a_replica_builds_finishes_and_installs_a_snapshot_through_its_offload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SNAPSHOT_BEGIN, chunks and SNAPSHOT_END as the replica's receiver decodes them: creating
    the snapshot's files, its fsyncs, its completion and its install all go through the node's
    offload, never the loop's thread."""
    cfg = _config(tmp_path)
    rec = Recorder()
    node = Node(cfg, offload=rec)
    await node.start()
    try:
        _, sp = node.assign("space-s", Assignment(1, _member("n1"), (_member("n0"),), "async"))
        sp.log.append([(1, b"old")] * 5, epoch=1)
        primary = SpaceLog(tmp_path / "p", space=SpaceId("space-s"), segment_bytes=4096)
        primary.append([(1, b"p" * 50)] * 200, epoch=1)
        frames = [
            SnapshotBegin(
                sp.wire_id,
                Epoch(1),
                Sequence(1),
                Sequence(200),
                tuple(primary.history),
                primary.size_bytes,
                4096,
            ).encode()
        ]
        seq = 1
        while seq <= 200:
            r = primary.read(seq, max_entries=200)
            frames.append(
                encode_snapshot_chunk(
                    space=sp.wire_id,
                    epoch=1,
                    prev_epoch=0 if seq == 1 else 1,
                    first_seq=r.first_sequence,
                    last_seq=r.last_sequence,
                    count=r.count,
                    entries=r.data,
                )
            )
            seq = r.last_sequence + 1
        frames.append(SnapshotEnd(sp.wire_id, Epoch(1), Sequence(1), Sequence(200)).encode())
        loop_thread = threading.get_ident()
        fsyncs = _threads_of(monkeypatch, os, "fsync")
        decoder = FrameDecoder()
        answers = []
        for raw in frames:
            for frame in decoder.feed(raw):
                msg = decode_message(frame)
                answers.append(await node.receiver._snapshot(sp, frame, msg))
        last = decode_message(FrameDecoder().feed(answers[-1])[0])
        assert isinstance(last, SnapshotAck) and last.installed and last.sequence == 200
        assert (sp.log.first_sequence, sp.log.last_sequence) == (1, 200)
        assert fsyncs and loop_thread not in fsyncs, "a snapshot fsync ran on the event loop"
        assert rec.ran[0] == "begin" and rec.ran[-2:] == ["finish", "swap"]
        assert rec.ran.count("durable") == len(frames) - 2
    finally:
        await node.stop()


async def test_reading_entries_over_http_indexes_old_segments_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, segment_bytes=4096)
    a = Assignment(1, _member("n1"), (_member("n0"),), "async")
    first = Node(cfg)
    _, sp = first.assign("space-s", a)
    sp.log.append([(1, b'{"p":"' + b"x" * 40 + b'"}')] * 300, epoch=1)
    first.store.close()
    rec = Recorder()
    node = Node(cfg, offload=rec)  # reopened: its sealed segments have no index yet
    node.assign("space-s", a)
    loop_thread = threading.get_ident()
    on_read = _threads_of(monkeypatch, segment, "scan")
    client: TestClient[Any, Any] = TestClient(TestServer(api.make_app(node), host="127.0.0.1"))
    await client.start_server()
    try:
        r = await client.get("/v1/spaces/space-s/entries", params={"from": "1", "limit": "300"})
        body = await r.json()
        assert r.status == 200, body
        assert [e["sequence"] for e in body["entries"]][:3] == [1, 2, 3]
        assert rec.ran and set(rec.ran) == {"run"}
        assert loop_thread not in on_read, "a page of entries scanned a segment on the loop"
    finally:
        await client.close()
        await node.stop()
