"""`engram-replication sidecar`: settings in, a running node out, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from aiohttp import web

from engram_sidecar.api import make_app
from engram_sidecar.config import SidecarConfig, load_config
from engram_sidecar.errors import ConfigError, EngramError
from engram_sidecar.kube.agent import KubeSidecar, advertised_addresses
from engram_sidecar.kube.client import resolve as resolve_kube
from engram_sidecar.node import Node

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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    kube = None
    kube_settings = resolve_kube(cfg)
    if kube_settings is not None:
        http, repl = advertised_addresses(node, runner.addresses[0][1])
        kube = KubeSidecar(node, kube_settings, http_address=http, replication_address=repl)
        await kube.start()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("node %s: shutting down", cfg.node)
        if kube is not None:
            await kube.stop()
        await runner.cleanup()
        await node.stop()


def main(args: argparse.Namespace) -> int:
    flags = {f.name: getattr(args, f.name) for f in fields(SidecarConfig) if f.name != "extra"}
    cfg_file = args.config or (
        Path(os.environ["ENGRAM_CONFIG"]) if os.environ.get("ENGRAM_CONFIG") else None
    )
    try:
        cfg = load_config(flags=flags, config_file=cfg_file)
        cfg.secret()
        cfg.admin_token()
        resolve_kube(cfg)
    except ConfigError as err:
        print(f"engram-replication sidecar: configuration error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level, format=f"%(asctime)s {cfg.node} %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(cfg))
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
