"""The peer pool: one `PeerLink` per peer this node ships to, shared by every space it leads there
(design-notes "One connection per direction per peer pair").

A space follows its assignment here: as primary, it gets a stream on the link to each replica;
otherwise it leaves every link. A peer whose address changed gets a new link, and every space
shipping to it moves over. A link no space uses any more is stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from engram_contract.ids import NodeName
from engram_sidecar.config import SidecarConfig
from engram_sidecar.metrics import Metrics
from engram_sidecar.replication.catchup import TokenBucket
from engram_sidecar.replication.peerlink import PeerLink
from engram_sidecar.space.hosted import Space


class PeerPool:
    def __init__(
        self,
        *,
        cfg: SidecarConfig,
        node: NodeName,
        secret: Callable[[], bytes],
        metrics: Metrics,
        bucket: TokenBucket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.secret = secret
        self.metrics = metrics
        self.bucket = bucket
        self.clock = clock
        self.links: dict[NodeName, PeerLink] = {}
        self._retired: set[asyncio.Task[None]] = set()

    def get(self, peer: NodeName) -> PeerLink | None:
        return self.links.get(peer)

    def follow(self, sp: Space, spaces: Iterable[Space]) -> None:
        """Ship `sp` to the replicas its assignment names if it leads here, else to nobody.

        `spaces`: every space of this node, for those that move with a peer's new link.
        """
        for lk in self.links.values():
            lk.remove(sp)
        sp.ring.inflight = lambda: False
        a = sp.assignment
        if sp.role == "primary" and a is not None:
            for r in a.replicas:
                found = self.links.get(r.node)
                if found is not None and found.address == r.address:
                    link = found
                else:
                    if found is not None:
                        self._retire(found)
                    link = PeerLink(
                        cfg=self.cfg,
                        node=self.node,
                        peer=r.node,
                        address=r.address,
                        secret=self.secret,
                        metrics=self.metrics,
                        bucket=self.bucket,
                        clock=self.clock,
                    )
                    self.links[r.node] = link
                    link.start()
                    # The peer moved: every other space shipping to it follows the new address,
                    # or its stream would die with the retired link.
                    for other in spaces:
                        if other is not sp and other.role == "primary" and r.node in other.replicas:
                            link.add(other)
                link.add(sp)
            sp.ring.on_sealed = self.wake_all
        self._retire_idle()

    def wake_all(self) -> None:
        for link in self.links.values():
            link.wake()

    async def stop(self) -> None:
        for link in self.links.values():
            await link.stop()

    def _retire(self, link: PeerLink) -> None:
        task = asyncio.get_running_loop().create_task(link.stop())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _retire_idle(self) -> None:
        """Stop links no space ships over any more, and drop their per-peer series."""
        for name, link in list(self.links.items()):
            if not link.streams:
                del self.links[name]
                self._retire(link)
                self.metrics.forget_peer(name)
