"""Where fsyncs run (engram_sidecar.log.fsync_engine): kernel AIO through caio, or worker threads.

The real engine is tried on this machine's disk (skipped, saying why, where caio or kernel AIO
is missing); the kernel's refusals and failures, which a healthy disk never produces, are played
by a fake context with the same interface as caio.linux_aio's.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engram_contract.errors import ConfigError
from engram_contract.formats.entry import EntryType
from engram_contract.ids import SpaceId
from engram_sidecar.config import load_config
from engram_sidecar.errors import StorageError
from engram_sidecar.log import fsync_engine
from engram_sidecar.log.fsync_engine import KernelAioFsyncer, ThreadFsyncer, open_engine
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import SpaceLog, SyncTicket

SPACE = SpaceId("aio-space")
REC = (EntryType.EPISODE_STORE, b"m" * 100)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _real_engine(tmp_path: Path, **kw: Any) -> KernelAioFsyncer:
    try:
        engine = KernelAioFsyncer.create(asyncio.get_running_loop(), **kw)
    except ImportError:
        pytest.skip("caio is not installed (the fast extra)")
    except OSError as err:
        pytest.skip(f"no kernel AIO here: {err}")
    try:
        await engine.probe(tmp_path)
    except OSError as err:
        engine.close()
        pytest.skip(f"kernel AIO refuses fsync on this file system: {err}")
    return engine


class RecordingThreads(ThreadFsyncer):
    """The fallback: runs tickets in threads as usual, and remembers them."""

    def __init__(self) -> None:
        super().__init__()
        self.tickets: list[SyncTicket] = []

    async def run(self, ticket: SyncTicket, *, space: str) -> None:
        self.tickets.append(ticket)
        await super().run(ticket, space=space)


async def test_aio_engine_group_commit_is_durable_and_leaks_no_fd(tmp_path: Path) -> None:
    fallback = RecordingThreads()
    before = _open_fds()
    engine = await _real_engine(tmp_path, fallback=fallback)
    # Small segments: the run rotates, and each rotation's ticket goes to the thread fallback.
    lg = SpaceLog(tmp_path / SPACE, space=SPACE, segment_bytes=16 * 1024)
    gc = GroupCommit(lg, policy="always", engine=engine)
    assert gc.engine is engine

    async def writer() -> None:
        for _ in range(25):
            _, last = await gc.append([REC], epoch=1)
            assert lg.durable_sequence >= last  # acknowledged only once durable

    await asyncio.wait_for(asyncio.gather(*(writer() for _ in range(16))), 30.0)
    assert lg.durable_sequence == lg.last_sequence == 400
    assert 1 <= gc.fsyncs < 400
    rotated = [t for t in fallback.tickets if t.sealed or t.directory is not None]
    assert len(lg.segments) > 1 and rotated, "the run should have rotated through the fallback"
    assert len(fallback.tickets) < gc.fsyncs, "plain fsyncs should have gone through the kernel"
    assert not engine.refused
    await gc.stop()
    lg.close()
    engine.close()
    del engine
    assert _open_fds() == before  # every duplicated fd closed, and the context's eventfd


async def test_groupcommit_with_an_injected_fsync_runs_it_in_a_thread(tmp_path: Path) -> None:
    """Tests hold fsyncs open through `fsync=`: that must win over any engine."""
    engine = await _real_engine(tmp_path)
    held: list[int] = []
    lg = SpaceLog(tmp_path / SPACE, space=SPACE)
    gc = GroupCommit(lg, policy="always", fsync=held.append, engine=engine)
    assert isinstance(gc.engine, ThreadFsyncer)
    await asyncio.wait_for(gc.append([REC], epoch=1), 10.0)
    assert len(held) == 1
    await gc.stop()
    lg.close()
    engine.close()


# ---- the kernel's refusals and failures, played by a fake context ----------------------------


class FakeOp:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.callback: Callable[[int], None] | None = None
        self.error = ""

    @classmethod
    def fsync(cls, fd: int) -> FakeOp:
        return cls(fd)

    def set_callback(self, cb: Callable[[int], None]) -> None:
        self.callback = cb

    def get_value(self) -> None:
        if self.error:
            raise SystemError(self.error)  # what caio raises: strerror of the errno


class FakeContext:
    """Completes operations when the test says (`finish`), signalling through a pipe as the
    kernel does through an eventfd."""

    def __init__(self, *, refuse: BaseException | None = None, accept: int = 1) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.refuse = refuse
        self.accept = accept
        self.submitted: list[FakeOp] = []
        self._done: list[FakeOp] = []

    @property
    def fileno(self) -> int:
        return self._r

    def submit(self, op: FakeOp) -> int:
        if self.refuse is not None:
            raise self.refuse
        if self.accept:
            self.submitted.append(op)
        return self.accept

    def finish(self, error: str = "") -> None:
        op = self.submitted.pop(0)
        op.error = error
        self._done.append(op)
        os.write(self._w, b"x")

    def poll(self) -> int:  # BlockingIOError when nothing was signalled, as caio's
        return len(os.read(self._r, 64))

    def process_events(self) -> int:
        done, self._done = self._done, []
        for op in done:
            assert op.callback is not None
            op.callback(0)
        return len(done)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def _ticket(tmp_path: Path, name: str = "seg") -> SyncTicket:
    path = tmp_path / name
    path.write_bytes(b"entries")
    fd = os.open(path, os.O_RDONLY)
    return SyncTicket(fd=fd, path=path, target=1, generation=0)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fake_engine(ctx: FakeContext, fallback: ThreadFsyncer) -> KernelAioFsyncer:
    return KernelAioFsyncer(
        asyncio.get_running_loop(), context=ctx, operation=FakeOp, fallback=fallback
    )


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def test_aio_completion_closes_the_fd_and_returns(tmp_path: Path) -> None:
    ctx, fallback = FakeContext(), RecordingThreads()
    engine = _fake_engine(ctx, fallback)
    ticket = _ticket(tmp_path)
    task = asyncio.ensure_future(engine.run(ticket, space="s"))
    await _until(lambda: bool(ctx.submitted))
    assert _is_open(ticket.fd) and not task.done()  # the kernel still owns it
    ctx.finish()
    await asyncio.wait_for(task, 5.0)
    assert not _is_open(ticket.fd) and not fallback.tickets
    engine.close()
    ctx.close()


FAILURES = [
    ("No space left on device", errno.ENOSPC),
    ("Input/output error", errno.EIO),
    ("a failure caio names oddly", errno.EIO),
]


@pytest.mark.parametrize(("message", "code"), FAILURES)
async def test_aio_failed_fsync_is_a_storage_error_and_never_retried(
    tmp_path: Path, message: str, code: int
) -> None:
    """A failed fsync may have dropped the dirty pages: retried elsewhere it would 'succeed'."""
    ctx, fallback = FakeContext(), RecordingThreads()
    engine = _fake_engine(ctx, fallback)
    ticket = _ticket(tmp_path)
    task = asyncio.ensure_future(engine.run(ticket, space="s"))
    await _until(lambda: bool(ctx.submitted))
    ctx.finish(error=message)
    with pytest.raises(StorageError) as got:
        await asyncio.wait_for(task, 5.0)
    assert got.value.errno == code and str(ticket.path) in str(got.value)
    assert not fallback.tickets, "a failed fsync must not be retried by another engine"
    assert not _is_open(ticket.fd) and not engine.refused
    engine.close()
    ctx.close()


@pytest.mark.parametrize(
    "refusing",
    [
        lambda: FakeContext(refuse=ValueError("invalid for the file descriptor [EINVAL]")),
        lambda: FakeContext(refuse=OSError(errno.EAGAIN, "no slot")),
        lambda: FakeContext(accept=0),
    ],
    ids=["einval", "eagain", "none-accepted"],
)
async def test_aio_refused_submission_falls_back_to_threads_for_good(
    tmp_path: Path, refusing: Callable[[], FakeContext]
) -> None:
    """A refused fsync never ran: running it in a thread is safe, and so is every later one."""
    ctx, fallback = refusing(), RecordingThreads()
    engine = _fake_engine(ctx, fallback)
    first, second = _ticket(tmp_path, "a"), _ticket(tmp_path, "b")
    await asyncio.wait_for(engine.run(first, space="s"), 5.0)
    assert engine.refused and fallback.tickets == [first]
    ctx.refuse, ctx.accept = None, 1
    await asyncio.wait_for(engine.run(second, space="s"), 5.0)
    assert fallback.tickets == [first, second] and not ctx.submitted
    assert not _is_open(first.fd) and not _is_open(second.fd)
    engine.close()
    ctx.close()


async def test_aio_rotation_tickets_run_in_threads(tmp_path: Path) -> None:
    ctx, fallback = FakeContext(), RecordingThreads()
    engine = _fake_engine(ctx, fallback)
    sealed = _ticket(tmp_path, "sealed")
    ticket = SyncTicket(
        fd=os.open(tmp_path / "sealed", os.O_RDONLY),
        path=tmp_path / "active",
        target=1,
        generation=0,
        sealed=((sealed.fd, sealed.path),),
        directory=tmp_path,
    )
    await asyncio.wait_for(engine.run(ticket, space="s"), 5.0)
    assert fallback.tickets == [ticket] and not ctx.submitted and not engine.refused
    engine.close()
    ctx.close()


async def test_aio_cancelled_waiter_still_closes_the_fd_when_the_kernel_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsync_engine, "MAX_IN_FLIGHT", 1)
    ctx = FakeContext()
    engine = _fake_engine(ctx, RecordingThreads())
    ticket, later = _ticket(tmp_path, "a"), _ticket(tmp_path, "b")
    task = asyncio.ensure_future(engine.run(ticket, space="s"))
    await _until(lambda: bool(ctx.submitted))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _is_open(ticket.fd)  # the kernel may still be using it
    # Its slot stays taken until the kernel is done: the context can't be overfilled.
    second = asyncio.ensure_future(engine.run(later, space="s"))
    await asyncio.sleep(0.05)
    assert len(ctx.submitted) == 1 and not second.done()
    ctx.finish()
    await _until(lambda: not _is_open(ticket.fd))
    await _until(lambda: len(ctx.submitted) == 1)  # the second one got the slot
    ctx.finish()
    await asyncio.wait_for(second, 5.0)
    assert not _is_open(later.fd)
    engine.close()
    ctx.close()


# ---- choosing the engine ----------------------------------------------------------------------


async def test_open_engine_thread_auto_and_aio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(await open_engine("thread", tmp_path), ThreadFsyncer)
    # Without caio: auto falls back to threads; an explicit aio is a configuration error.
    monkeypatch.setitem(sys.modules, "caio.linux_aio", None)  # import -> ImportError
    assert (await open_engine("auto", tmp_path)).name == "thread"
    with pytest.raises(ConfigError, match="fsync_engine aio: caio is not installed"):
        await open_engine("aio", tmp_path)
    monkeypatch.undo()
    # Kernel AIO that refuses the data directory's fsync: the same two answers.
    refusing = FakeContext(refuse=ValueError("[EINVAL]"))
    monkeypatch.setattr(
        KernelAioFsyncer,
        "create",
        classmethod(lambda cls, loop: cls(loop, context=refusing, operation=FakeOp)),
    )
    assert (await open_engine("auto", tmp_path)).name == "thread"
    with pytest.raises(ConfigError, match="kernel AIO does not work here"):
        await open_engine("aio", tmp_path)
    refusing.close()
    # Kernel AIO that never answers: the node starts anyway (auto) or says why (aio).
    silent = FakeContext()
    monkeypatch.setattr(
        KernelAioFsyncer,
        "create",
        classmethod(lambda cls, loop: cls(loop, context=silent, operation=FakeOp)),
    )
    engine = await asyncio.wait_for(open_engine("auto", tmp_path, probe_timeout=0.1), 5.0)
    assert engine.name == "thread" and len(silent.submitted) == 1
    with pytest.raises(ConfigError, match="no answer to an fsync"):
        await asyncio.wait_for(open_engine("aio", tmp_path, probe_timeout=0.1), 5.0)
    silent.close()


async def test_open_engine_auto_takes_kernel_aio_where_it_works(tmp_path: Path) -> None:
    (await _real_engine(tmp_path)).close()  # skips where it can't
    engine = await open_engine("auto", tmp_path)
    assert engine.name == "aio"
    engine.close()


def test_config_fsync_engine_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"ENGRAM_NODE": "n0"}
    assert load_config(env=env).fsync_engine == "auto"
    assert load_config(env={**env, "ENGRAM_FSYNC_ENGINE": "thread"}).fsync_engine == "thread"
    with pytest.raises(ConfigError, match="fsync_engine"):
        load_config(env={**env, "ENGRAM_FSYNC_ENGINE": "io_uring"})
    if importlib.util.find_spec("caio") is not None:  # the dev extra installs it on Linux
        assert load_config(env={**env, "ENGRAM_FSYNC_ENGINE": "aio"}).fsync_engine == "aio"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "caio" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="caio is not installed"):
        load_config(env={**env, "ENGRAM_FSYNC_ENGINE": "aio"})
