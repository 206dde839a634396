"""`engram-replication sidecar`: settings in, a running node out, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import fields
from pathlib import Path

# ---- test-only: a skewed wall clock --------------------------------------------------------------
# The chaos tests (tests/chaos) start a node with ENGRAM_TEST_WALL_CLOCK_OFFSET_S=<seconds> to
# give it a wrong wall clock: time.time and time.time_ns of this process read that many seconds
# ahead (negative: behind). It is applied here, before the sidecar's own modules are imported, so
# that every reader of the wall clock sees the same skewed time (some bind time.time_ns as a
# default argument at import). The monotonic clock is untouched. Not a setting: the variable is
# removed from the environment before the settings are read. Never set it in production
# (docs/configuration.md, "Test-only hooks").
TEST_WALL_CLOCK_OFFSET_ENV = "ENGRAM_TEST_WALL_CLOCK_OFFSET_S"


def apply_test_wall_clock_offset(environ: MutableMapping[str, str]) -> tuple[float, str | None]:
    """Pop the test-only offset from `environ` and skew this process's wall clock by it.

    Returns (offset in seconds, error): the error says why a value was refused (then the clock is
    left alone, and `main` exits with a configuration error).
    """
    raw = environ.pop(TEST_WALL_CLOCK_OFFSET_ENV, "").strip()
    if not raw:
        return 0.0, None
    try:
        offset = float(raw)
    except ValueError:
        offset = math.nan
    if not math.isfinite(offset) or abs(offset) > 365 * 86400:
        return 0.0, f"{TEST_WALL_CLOCK_OFFSET_ENV}={raw!r}: expected seconds, at most a year"
    if offset == 0.0:
        return 0.0, None
    offset_ns = round(offset * 1e9)
    real_time, real_time_ns = time.time, time.time_ns

    def skewed_time() -> float:
        return real_time() + offset

    def skewed_time_ns() -> int:
        return real_time_ns() + offset_ns

    time.time = skewed_time
    time.time_ns = skewed_time_ns
    return offset, None


TEST_WALL_CLOCK_OFFSET, TEST_WALL_CLOCK_ERROR = apply_test_wall_clock_offset(os.environ)
# Test-only, like the clock: record where each fsync left the WAL, so a chaos test can play a
# power loss (engram_sidecar.log.durable_marks). Removed from the environment before the
# settings are read.
TEST_DURABLE_MARKS = os.environ.pop("ENGRAM_TEST_DURABLE_MARKS", "").strip()

from aiohttp import web  # noqa: E402 - after the clock hook, on purpose

from engram_sidecar import eventloop, heap  # noqa: E402
from engram_sidecar.api import make_app  # noqa: E402
from engram_sidecar.config import SidecarConfig, load_config  # noqa: E402
from engram_sidecar.errors import ConfigError, EngramError  # noqa: E402
from engram_sidecar.kube.agent import KubeSidecar, advertised_addresses  # noqa: E402
from engram_sidecar.kube.client import resolve as resolve_kube  # noqa: E402
from engram_sidecar.log import durable_marks  # noqa: E402
from engram_sidecar.node import Node  # noqa: E402

log = logging.getLogger("engram_sidecar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="YAML file of settings (env ENGRAM_CONFIG)"
    )
    for f in fields(SidecarConfig):
        if f.name == "extra":
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"default {f.default!r}; env ENGRAM_{f.name.upper()}",
        )


async def serve(cfg: SidecarConfig, *, ready: asyncio.Event | None = None) -> None:
    node = Node(cfg)
    await node.start()
    runner = web.AppRunner(make_app(node), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.http_host, cfg.http_port)
    await site.start()
    log.info(
        "node %s: HTTP on %s:%d, replication on %s:%d, data in %s",
        cfg.node,
        cfg.http_host,
        cfg.http_port,
        cfg.replication_host,
        node.replication_port,
        cfg.data_dir,
    )
    stop = asyncio.Event()
    now = asyncio.Event()  # SIGINT: stop at once, even in the middle of a drain
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        # SIGTERM (Kubernetes, a supervisor) drains first; SIGINT (Ctrl-C) stops at once.
        if sig != signal.SIGTERM:
            now.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    kube = None
    kube_settings = resolve_kube(cfg)
    if kube_settings is not None:
        http, repl = advertised_addresses(node, runner.addresses[0][1])
        kube = KubeSidecar(node, kube_settings, http_address=http, replication_address=repl)
        await kube.start()
    frozen = heap.freeze_startup_heap()  # full collections skip the startup heap from here
    log.debug("node %s: froze %d startup objects out of full collections", cfg.node, frozen)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        if not now.is_set():
            await _drain(node, cfg, kube, interrupt=now)
    finally:
        log.info("node %s: shutting down", cfg.node)
        if kube is not None:
            await kube.stop()
        await runner.cleanup()
        await node.stop()


async def _drain(
    node: Node, cfg: SidecarConfig, kube: KubeSidecar | None, *, interrupt: asyncio.Event
) -> None:
    """SIGTERM: hand the spaces led here over before exiting, if a control plane will do it (on
    Kubernetes the operator acts on the node Lease's draining annotation; in local mode the
    control loop on the heartbeat's answer)."""
    if kube is None and not node.drain_handled():
        node.draining = True
        if node.led():
            log.warning("node %s: no control plane acts on drains; exiting at once", cfg.node)
        return

    async def announce() -> None:
        if kube is not None:
            await kube.renew(kube.wall_ns())

    await node.drain(cfg.drain_timeout, announce=announce, interrupt=interrupt)


def main(args: argparse.Namespace) -> int:
    if TEST_WALL_CLOCK_ERROR is not None:
        print(
            f"engram-replication sidecar: configuration error: {TEST_WALL_CLOCK_ERROR}",
            file=sys.stderr,
        )
        return 2
    flags = {f.name: getattr(args, f.name) for f in fields(SidecarConfig) if f.name != "extra"}
    cfg_file = args.config or (
        Path(os.environ["ENGRAM_CONFIG"]) if os.environ.get("ENGRAM_CONFIG") else None
    )
    try:
        cfg = load_config(flags=flags, config_file=cfg_file)
        cfg.secret()
        cfg.admin_tokens()
        resolve_kube(cfg)
    except ConfigError as err:
        print(f"engram-replication sidecar: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level, format=f"%(asctime)s {cfg.node} %(levelname)s %(name)s: %(message)s"
    )
    if TEST_WALL_CLOCK_OFFSET:
        log.warning(
            "test-only hook: this process's wall clock is offset by %+.3f s (%s)",
            TEST_WALL_CLOCK_OFFSET,
            TEST_WALL_CLOCK_OFFSET_ENV,
        )
    if TEST_DURABLE_MARKS:
        try:
            durable_marks.enable(TEST_DURABLE_MARKS)
        except ValueError as err:
            print(f"engram-replication sidecar: configuration error: {err}", file=sys.stderr)
            return 2
        log.warning(
            "test-only hook: every fsync records where it left the WAL, and starts %.1f ms late"
            " (%s)",
            durable_marks.delay * 1000,
            durable_marks.ENV,
        )
    loop_name, _ = eventloop.choose(cfg.event_loop)
    log.info("node %s: event loop %s (event_loop: %s)", cfg.node, loop_name, cfg.event_loop)
    try:
        eventloop.run(serve(cfg), cfg.event_loop)
    except EngramError as err:
        print(f"engram-replication sidecar: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"engram-replication sidecar: {err}", file=sys.stderr)
        return 1
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engram-replication sidecar")
    add_arguments(p)
    return main(p.parse_args(argv))
