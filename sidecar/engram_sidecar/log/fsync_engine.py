"""Where the log's fsyncs run, off the event loop: the `fsync_engine` setting.

The loop also carries heartbeats and every other write, so an fsync never runs on it. Two
engines run it elsewhere (docs/configuration.md, docs/design-notes.md):

- `thread`: a worker thread of the default executor (`asyncio.to_thread`). The thread needs the
  GIL to start the call and again to hand the result back, and waits for it while the loop runs
  Python code. With writes arriving every millisecond that hand-off is a large part of a
  write's wait, and the executor's bookkeeping a large part of the primary's CPU.
- `aio`: Linux kernel AIO (io_submit of IOCB_CMD_FSYNC, through the `caio` package). The kernel
  runs the file system's fsync in its own worker, exactly as fsync(2) would (Linux >= 4.18),
  and signals an eventfd the loop watches: no Python thread, no GIL hand-off.

`auto` picks `aio` where caio is installed and an fsync of the data directory through it works
(some file systems and sandboxes refuse kernel AIO), else `thread`; the start-up log says which.
A ticket that also owes a rotation's fsyncs (sealed segments, then the directory) runs in a
thread either way: several fsyncs in order, once per segment.

A failed fsync is never retried by the other engine: after a failed fsync the kernel may have
dropped the dirty pages, and a second fsync would report success for data that is gone. Only a
submission the kernel refused, an fsync that never started, falls back to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from engram_sidecar.errors import ConfigError, StorageError
from engram_sidecar.log.wal import SyncTicket, run_ticket

log = logging.getLogger(__name__)

# In flight at once per node: one fsync per log at a time (GroupCommit), so this bounds how many
# logs sync concurrently through the kernel; more wait for a slot.
MAX_IN_FLIGHT = 64

# caio reports a failed operation as SystemError(strerror(errno)); this maps it back.
_ERRNO_OF = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


class Fsyncer(Protocol):
    name: str

    async def run(self, ticket: SyncTicket, *, space: str) -> None:
        """Carry out `ticket` (`run_ticket`'s contract): returns once its fsyncs are done,
        raises StorageError naming what failed. Closes every fd the ticket owns."""
        ...

    def close(self) -> None: ...


class ThreadFsyncer:
    """fsync in a worker thread. `fsync`: injectable so a test can hold one open."""

    name = "thread"

    def __init__(self, fsync: Callable[[int], None] | None = None) -> None:
        self._fsync = fsync

    async def run(self, ticket: SyncTicket, *, space: str) -> None:
        await asyncio.to_thread(run_ticket, ticket, self._fsync, space=space)

    def close(self) -> None:
        return None


class _Refused(Exception):
    """The kernel refused to start an fsync (it never ran): safe to run it another way."""


class KernelAioFsyncer:
    """fsync by Linux kernel AIO. `context` and `operation` are caio.linux_aio's Context and
    Operation classes (a test passes fakes); completions are read on `loop`."""

    name = "aio"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        context: Any,
        operation: Any,
        fallback: Fsyncer | None = None,
    ) -> None:
        self._loop = loop
        self._ctx = context
        self._operation = operation
        self._fallback = fallback or ThreadFsyncer()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        # Operations in flight, kept alive until the kernel is done with their iocb.
        self._ops: set[Any] = set()
        self.refused = False  # once the kernel refuses a submission, threads from then on
        self._fileno: int = context.fileno
        loop.add_reader(self._fileno, self._completions)

    @classmethod
    def create(
        cls, loop: asyncio.AbstractEventLoop, *, fallback: Fsyncer | None = None
    ) -> KernelAioFsyncer:
        """On caio's Linux AIO. Raises ImportError without caio, OSError without kernel AIO."""
        aio = importlib.import_module("caio.linux_aio")
        context = aio.Context(MAX_IN_FLIGHT)
        return cls(loop, context=context, operation=aio.Operation, fallback=fallback)

    def _completions(self) -> None:
        # The eventfd's count may lag the completions it signals: always drain the queue.
        with contextlib.suppress(BlockingIOError):
            self._ctx.poll()
        while self._ctx.process_events():
            pass

    async def _fsync(self, fd: int) -> None:
        """fsync `fd` through the kernel; closes it once the kernel is done with it (also when
        the caller is cancelled meanwhile: the fsync still runs to its end).

        Raises _Refused when the kernel would not start it (fd still open: the caller's), and
        OSError when it ran and failed."""
        # A slot stays taken until the kernel is done, even if the caller was cancelled: the
        # context holds at most MAX_IN_FLIGHT operations.
        await self._slots.acquire()
        op = self._operation.fsync(fd)
        done: asyncio.Future[None] = self._loop.create_future()

        def complete(_result: int) -> None:
            self._ops.discard(op)
            self._slots.release()
            try:
                os.close(fd)
            except OSError as err:  # the close, not the fsync: op's value says how that went
                log.warning("closing fd %d after its fsync: %s", fd, err)
            if not done.done():
                done.set_result(None)

        op.set_callback(complete)
        try:
            accepted = self._ctx.submit(op)
        except (ValueError, OSError) as err:
            self._slots.release()
            raise _Refused(str(err)) from err
        if accepted != 1:
            self._slots.release()
            raise _Refused("the kernel accepted no operation")
        self._ops.add(op)
        await done
        try:
            op.get_value()
        except SystemError as err:
            message = str(err)
            raise OSError(_ERRNO_OF.get(message, errno.EIO), message) from err

    async def run(self, ticket: SyncTicket, *, space: str) -> None:
        if self.refused or ticket.sealed or ticket.directory is not None:
            await self._fallback.run(ticket, space=space)
            return
        try:
            await self._fsync(ticket.fd)
        except _Refused as why:
            self.refused = True
            log.warning(
                "space %s: the kernel refused an AIO fsync of %s (%s); fsyncs run in worker"
                " threads from now on",
                space,
                ticket.path,
                why,
            )
            await self._fallback.run(ticket, space=space)
        except OSError as err:
            raise StorageError("fsync", ticket.path, err, space=space) from err

    async def probe(self, directory: Path) -> None:
        """fsync `directory` through the kernel: raises OSError (or _Refused) where kernel AIO
        can't do what the log needs here."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            await self._fsync(fd)
        except _Refused as why:
            os.close(fd)
            raise OSError(errno.EINVAL, f"kernel AIO refused an fsync: {why}") from why

    def close(self) -> None:
        """Stop reading completions and let the kernel context go (caio's io_destroy, which
        waits for any operation left; the group commits stopped first, so none is)."""
        if self._ctx is not None:
            self._loop.remove_reader(self._fileno)
            self._ctx = None


async def open_engine(setting: str, data_dir: Path, *, probe_timeout: float = 5.0) -> Fsyncer:
    """The engine `setting` names, on the running loop. `auto`: kernel AIO if it works on
    `data_dir`'s file system, else threads. `aio` where it doesn't: ConfigError. A probe that
    gets no answer within `probe_timeout` counts as not working: a node must not hang at start."""
    if setting == "thread":
        return ThreadFsyncer()
    loop = asyncio.get_running_loop()
    try:
        engine = KernelAioFsyncer.create(loop)
    except (ImportError, OSError) as err:
        return _unavailable(setting, err)
    try:
        await asyncio.wait_for(engine.probe(data_dir), probe_timeout)
    except TimeoutError:
        engine.close()
        return _unavailable(setting, OSError(errno.ETIMEDOUT, "no answer to an fsync"))
    except OSError as err:
        engine.close()
        return _unavailable(setting, err)
    return engine


def _unavailable(setting: str, err: BaseException) -> Fsyncer:
    why = (
        "caio is not installed (pip install 'engram-replication[fast]')"
        if isinstance(err, ImportError)
        else f"kernel AIO does not work here: {err}"
    )
    if setting == "aio":
        raise ConfigError(f"fsync_engine aio: {why}; use auto or thread")
    log.info("fsync engine: worker threads (%s)", why)
    return ThreadFsyncer()
