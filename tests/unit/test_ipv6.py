"""IPv6 addresses: what the sidecar publishes and what the control plane dials are bracketed,
so `$(POD_IP):8080` on an IPv6 pod (`fd00::5:8080`) still makes a URL and a dialable address."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from engram_contract.assignment import bracketed, join_hostport, split_hostport
from engram_contract.client import SidecarClient
from engram_sidecar.config import SidecarConfig
from engram_sidecar.kube.agent import advertised_addresses


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("fd00::5:7070", "[fd00::5]:7070"),
        ("[fd00::5]:7070", "[fd00::5]:7070"),
        ("10.0.0.5:7070", "10.0.0.5:7070"),
        ("engram-0.engram-nodes:7070", "engram-0.engram-nodes:7070"),
        ("::1:8080", "[::1]:8080"),
        ("no-port", "no-port"),
    ],
)
def test_addresses_are_bracketed_when_ipv6(given: str, want: str) -> None:
    assert bracketed(given) == want
    if ":" in given:
        host, port = split_hostport(want)
        assert join_hostport(host, port) == want


def test_the_sidecar_publishes_bracketed_addresses() -> None:
    cfg = SidecarConfig(
        node="n0",
        http_host="::",
        replication_host="::",
        advertise_address="fd00::5:7070",
        advertise_http_address="fd00::5:8080",
    )
    node: Any = SimpleNamespace(cfg=cfg, name="n0", replication_port=7070)
    assert advertised_addresses(node, 8080) == ("[fd00::5]:8080", "[fd00::5]:7070")
    assert cfg.address == "[fd00::5]:7070"
    bare = SidecarConfig(node="n0", replication_host="::1", replication_port=7070)
    assert bare.address == "[::1]:7070"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_the_control_plane_reaches_a_sidecar_on_ipv6_by_its_lease_address() -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": "n0"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "::1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = SidecarClient("token", probe_timeout=2.0)
    try:
        # As `$(POD_IP):PORT` expands on an IPv6 pod, unbracketed.
        assert await client.healthz(f"::1:{port}", expect="n0")
        assert await client.healthz(f"[::1]:{port}", expect="n0")
    finally:
        await client.close()
        await runner.cleanup()
