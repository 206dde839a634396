"""Every network link of a chaos cluster, one FaultProxy per directed pair of endpoints.

A node has one replication address and one HTTP address, and every peer dials the same ones
(they come from the assignment). To cut node A off from node B but not from node C, the proxy
must know who is dialling. So each advertised address is a `Router`: it accepts a connection,
finds which process opened it (the client's socket inode in /proc/net/tcp, then which of our
processes holds that inode: the same facts `ss -p` shows), and splices it to the FaultProxy of
that directed link (`tests/faultproxy.py`), which forwards to the node's real port:

    dialler ──► Router(dst, kind) ──► FaultProxy(src → dst, kind) ──► dst's real port

Endpoints are the node names and `CP`, the control plane (this test process: the control loop
heartbeats and pushes assignments over HTTP). Kinds are `repl` (the replication listener,
framed: faults act on whole wire frames) and `http` (the sidecar API as the control loop and the
peers' fork checks reach it; raw chunks). Clients of the test write to the real HTTP ports
directly: client ↔ node links are not faulted.

A connection whose opener can't be identified is refused (counted in `unidentified`): a fault
layer that let unknown traffic bypass a partition would hide bugs.

Faults are set per *direction of traffic*: `cut(a, b)` drops what a sends to b, on connections
a dialled (their "up" side) and on connections b dialled (their "down" side). A blackholed
connection stays open, as in a real partition. Healing first cuts (closes) every connection
that lost traffic, then clears the faults: TCP never delivers a stream with a hole in it, so
neither may the proxy.

Only 127.0.0.1 is used. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from tests.faultproxy import FaultProxy

HOST: Final = "127.0.0.1"
CP: Final = "cp"  # the control plane's endpoint name
Kind = Literal["repl", "http"]
KINDS: Final[tuple[Kind, Kind]] = ("repl", "http")
_LOOPBACK_HEX: Final = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)
_READ: Final = 64 * 1024
_CONNECT_TIMEOUT: Final = 2.0


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """Inode of the TCP socket 127.0.0.1:local_port → 127.0.0.1:remote_port, from /proc."""
    want_local = f"{_LOOPBACK_HEX}:{local_port:04X}"
    want_remote = f"{_LOOPBACK_HEX}:{remote_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)  # header
            for line in f:
                parts = line.split()
                if len(parts) > 9 and parts[1] == want_local and parts[2] == want_remote:
                    return int(parts[9]) or None
    except OSError:
        return None
    return None


def socket_owner(inode: int, pids: Mapping[int, str]) -> str | None:
    """Which of `pids` (pid -> endpoint name) holds the socket `inode` open."""
    target = f"socket:[{inode}]"
    for pid, name in pids.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return name
    return None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(_READ)
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        writer.transport.abort()


@dataclass
class Router:
    """The advertised address of one node's listener of one kind; see the module docstring."""

    dst: str
    kind: Kind
    owners: Callable[[], Mapping[int, str]]  # pid -> endpoint name, right now
    upstream: Callable[[str], int | None]  # src endpoint -> the FaultProxy port for it
    stats: dict[str, int] = field(default_factory=lambda: {"routed": 0, "unidentified": 0})
    _server: asyncio.Server | None = None
    _port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{HOST}:{self._port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        src: str | None = None
        if peer is not None:
            inode = socket_inode(int(peer[1]), self._port)
            if inode is not None:
                src = socket_owner(inode, self.owners())
        port = self.upstream(src) if src is not None and src != self.dst else None
        if port is None:
            self.stats["unidentified"] += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(HOST, port), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self.stats["routed"] += 1
        try:
            await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
        finally:
            up_w.transport.abort()
            writer.transport.abort()


@dataclass
class LinkFaults:
    """What is set on one directed link (for the timeline and for healing)."""

    blackhole_up: bool = False
    blackhole_down: bool = False
    delay: float = 0.0
    jitter: float = 0.0

    @property
    def faulty(self) -> bool:
        return self.blackhole_up or self.blackhole_down or self.delay > 0


class LinkMatrix:
    """Routers for every node, FaultProxies for every directed (src, dst, kind)."""

    def __init__(
        self,
        nodes: Iterable[str],
        real_ports: Callable[[str, Kind], int],
        owners: Callable[[], Mapping[int, str]],
        *,
        seed: int = 0,
    ) -> None:
        self.nodes = list(nodes)
        self.endpoints = [CP, *self.nodes]
        self._real_ports = real_ports
        self._owners = owners
        self._seed = seed
        self.routers: dict[tuple[str, Kind], Router] = {}
        self.proxies: dict[tuple[str, str, Kind], FaultProxy] = {}
        self.state: dict[tuple[str, str, Kind], LinkFaults] = {}

    async def start(self) -> None:
        i = 0
        for dst in self.nodes:
            for kind in KINDS:
                for src in self.endpoints:
                    if src == dst or (src == CP and kind == "repl"):
                        continue
                    i += 1
                    proxy = FaultProxy(
                        HOST,
                        self._real_ports(dst, kind),
                        seed=self._seed * 1000 + i,
                        framed=kind == "repl",
                    )
                    await proxy.start()
                    self.proxies[(src, dst, kind)] = proxy
                    self.state[(src, dst, kind)] = LinkFaults()
                router = Router(dst, kind, self._owners, self._upstream_of(dst, kind))
                await router.start()
                self.routers[(dst, kind)] = router

    def _upstream_of(self, dst: str, kind: Kind) -> Callable[[str], int | None]:
        def upstream(src: str) -> int | None:
            proxy = self.proxies.get((src, dst, kind))
            return proxy.port if proxy is not None else None

        return upstream

    async def stop(self) -> None:
        for r in self.routers.values():
            await r.stop()
        for p in self.proxies.values():
            await p.stop()

    def address(self, node: str, kind: Kind) -> str:
        return self.routers[(node, kind)].address

    def node_of_http(self, address: str) -> str | None:
        """The node whose advertised HTTP address this is (a 421 names it)."""
        for (node, kind), r in self.routers.items():
            if kind == "http" and r.address == address:
                return node
        return None

    # ---- faults --------------------------------------------------------------------------------

    def _legs(self, a: str, b: str) -> list[tuple[tuple[str, str, Kind], Literal["up", "down"]]]:
        """The (proxy, side) pairs that carry traffic from a to b."""
        out: list[tuple[tuple[str, str, Kind], Literal["up", "down"]]] = []
        for kind in KINDS:
            if (a, b, kind) in self.proxies:
                out.append(((a, b, kind), "up"))  # connections a dialled to b
            if (b, a, kind) in self.proxies:
                out.append(((b, a, kind), "down"))  # connections b dialled to a
        return out

    def drop(self, a: str, b: str) -> None:
        """Silently drop everything a sends to b (one direction of a partition)."""
        for key, side in self._legs(a, b):
            self.proxies[key].blackhole(True, side)
            st = self.state[key]
            if side == "up":
                st.blackhole_up = True
            else:
                st.blackhole_down = True

    def slow(self, a: str, b: str, seconds: float, jitter: float) -> None:
        """Delay everything a sends to b (order kept)."""
        for key, side in self._legs(a, b):
            self.proxies[key].set_delay(seconds, side, jitter=jitter)
            self.state[key].delay = seconds
            self.state[key].jitter = jitter

    async def heal(
        self,
        pairs: Iterable[tuple[str, str]] | None = None,
        *,
        drops: bool = True,
        delays: bool = True,
    ) -> None:
        """Undo the faults on the links between each (a, b) (both directions), or on all links:
        the dropped traffic (`drops`), the delays (`delays`), or both.

        Connections that lost traffic are closed before they carry any more (see the module
        docstring)."""
        keys: set[tuple[str, str, Kind]] = set()
        if pairs is None:
            keys = set(self.proxies)
        else:
            for a, b in pairs:
                keys.update(k for k, _ in self._legs(a, b))
                keys.update(k for k, _ in self._legs(b, a))
        for key in sorted(keys):
            st = self.state[key]
            proxy = self.proxies[key]
            if drops and (st.blackhole_up or st.blackhole_down):
                await proxy.cut()
                proxy.blackhole(False, "both")
                st.blackhole_up = st.blackhole_down = False
            if delays and st.delay > 0:
                proxy.set_delay(0.0, "both")
                st.delay = st.jitter = 0.0

    def faulty_links(self) -> list[str]:
        return [
            f"{src}->{dst}/{kind}"
            for (src, dst, kind), st in sorted(self.state.items())
            if st.faulty
        ]

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {"unidentified": 0, "routed": 0}
        for r in self.routers.values():
            for k, v in r.stats.items():
                out[k] = out.get(k, 0) + v
        for p in self.proxies.values():
            for k in ("blackholed", "cuts", "connections"):
                out[k] = out.get(k, 0) + p.stats.get(k, 0)
        return out
