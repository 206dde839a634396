"""Local mode's file store: the stand-in for MemorySpace status is `<data>/cluster.json`.

Owns the data folder's layout (`ClusterFiles`: the shared secret, cluster.json, node logs, the
switchover requests that `engram-replication switchover` leaves), what the control loop keeps per
space (`SpaceRecord`), and `FileStore`, the executor's store for one space: a placement, a
promotion or a failover's epoch is written to cluster.json (temp file, fsync, rename, fsync the
folder) before anyone acts on it, so after a power cut the file holds the old state or the new,
whole, never an epoch that was handed out and then forgotten.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from engram_contract.ids import Epoch, NodeName, SpaceId
from engram_contract.kubernetes import NodeAddresses
from engram_operator.election import DecisionRecord
from engram_operator.model import Placement, SpaceSpec, SwitchoverProgress
from engram_operator.reconcile import FenceAndElect
from engram_operator.status import Phase

# cluster.json keeps this many decision records per space (the newest).
DECISIONS_KEPT: Final = 20


@dataclass
class ClusterFiles:
    """The local cluster's data folder."""

    root: Path

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def state(self) -> Path:
        return self.root / "cluster.json"

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    def log(self, node: str) -> Path:
        return self.root / f"{node}.log"

    def ensure_secret(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.secret.exists():
            fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return self.secret.read_text().strip()

    def switchover_request(self, space: str) -> Path:
        return self.requests / f"switchover-{space}.json"

    def switchover_requests(self) -> Iterator[tuple[SpaceId, NodeName]]:
        """The `engram-replication switchover` requests waiting (malformed ones are dropped)."""
        if not self.requests.is_dir():
            return
        for f in self.requests.glob("switchover-*.json"):
            try:
                doc = json.loads(f.read_text())
                yield SpaceId(doc["space"]), NodeName(doc["to"])
            except (ValueError, KeyError, TypeError):
                f.unlink(missing_ok=True)


@dataclass
class SpaceRecord:
    """What the control loop keeps for one space (placement and decisions in cluster.json)."""

    spec: SpaceSpec
    placement: Placement | None = None
    switchover: SwitchoverProgress | None = None
    last_promotion_epoch: Epoch | None = None
    # The epoch of a failover whose fence round ran but that promoted nobody yet (see
    # `reconcile.FenceAndElect`); recorded in `decisions` (so in cluster.json) before any fence.
    pending_epoch: Epoch | None = None
    last_sentence: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)


def pending_epoch(placement: Placement | None, decisions: list[dict[str, Any]]) -> Epoch | None:
    """The epoch of an unfinished failover in a space's decision log: a record without a winner
    at an epoch above the placement's (a fence round was recorded, nobody was promoted)."""
    floor = placement.epoch if placement is not None else 0
    pending = [
        int(d["newEpoch"])
        for d in decisions
        if d.get("winner") is None and isinstance(d.get("newEpoch"), int) and d["newEpoch"] > floor
    ]
    return Epoch(max(pending)) if pending else None


class ClusterState:
    """cluster.json: every space's record, and where the nodes listen (for `status`)."""

    def __init__(
        self,
        files: ClusterFiles,
        spaces: Mapping[SpaceId, SpaceRecord],
        addresses: Callable[[], Mapping[str, NodeAddresses]],
    ) -> None:
        self.files = files
        self.spaces = spaces
        self.addresses = addresses

    def load(self) -> None:
        """Take placements and decision logs from the file, for the spaces we run."""
        if not self.files.state.exists():
            return
        doc = json.loads(self.files.state.read_text())
        for sid, saved in doc.get("spaces", {}).items():
            rec = self.spaces.get(SpaceId(sid))
            p = saved.get("placement")
            if rec is None or not p:
                continue
            rec.placement = Placement(
                primary=NodeName(p["primary"]),
                replicas=tuple(NodeName(r) for r in p["replicas"]),
                epoch=Epoch(p["epoch"]),
            )
            rec.decisions = saved.get("decisions", [])
            rec.pending_epoch = pending_epoch(rec.placement, rec.decisions)

    def save(self) -> None:
        doc = {
            "nodes": {
                name: {"http": a["http"], "address": a["address"]}
                for name, a in self.addresses().items()
            },
            "spaces": {
                sid: {
                    "placement": None
                    if r.placement is None
                    else {
                        "primary": r.placement.primary,
                        "replicas": list(r.placement.replicas),
                        "epoch": r.placement.epoch,
                    },
                    "ackPolicy": r.spec.ack_policy,
                    "decisions": r.decisions[-DECISIONS_KEPT:],
                    "lastSentence": r.last_sentence,
                }
                for sid, r in self.spaces.items()
            },
        }
        # Temp file, fsync, rename, fsync the folder: the file is the old state or the new.
        path = self.files.state
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = memoryview(json.dumps(doc, indent=2).encode())
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def store(self, space: SpaceId) -> FileStore:
        return FileStore(self, space, self.spaces[space])


class FileStore:
    """An `executor.SpaceStore` for one space of cluster.json."""

    def __init__(self, state: ClusterState, space: SpaceId, record: SpaceRecord) -> None:
        self.state = state
        self.space = space
        self.rec = record

    @property
    def placement(self) -> Placement | None:
        return self.rec.placement

    @property
    def pending_epoch(self) -> Epoch | None:
        return self.rec.pending_epoch

    @property
    def switchover(self) -> SwitchoverProgress | None:
        return self.rec.switchover

    @switchover.setter
    def switchover(self, progress: SwitchoverProgress | None) -> None:
        self.rec.switchover = progress
        if progress is None or progress.aborted_at is not None:
            # Over (done, withdrawn or aborted): the request that asked for it is answered.
            # Local mode does not retry an aborted switchover; ask again to retry.
            self.rec.spec = replace(self.rec.spec, target_primary=None)
            with contextlib.suppress(FileNotFoundError):
                self.state.files.switchover_request(self.space).unlink()

    def retryable(self, err: Exception) -> bool:
        return isinstance(err, OSError)

    def fence_timeout(self, planned: float) -> float:
        return planned

    async def record(
        self, placement: Placement, *, phase: Phase, promotion: DecisionRecord | None = None
    ) -> None:
        rec = self.rec
        with self._saving():
            rec.placement = placement
            if promotion is not None:
                rec.last_promotion_epoch = placement.epoch
                rec.decisions.append(dict(promotion.to_dict()))
            if rec.pending_epoch is not None and placement.epoch >= rec.pending_epoch:
                rec.pending_epoch = None

    async def record_pending(self, plan: FenceAndElect) -> None:
        # A restarted loop must not hand out the same epoch again with another winner
        # (`pending_epoch` reads it back from the decision log).
        with self._saving():
            self.rec.pending_epoch = plan.epoch
            self.rec.decisions.append(dict(plan.record.to_dict()))

    @contextlib.contextmanager
    def _saving(self) -> Iterator[None]:
        """Change the record, then save it; if the save fails, the record is as it was (what
        is not on disk must not be acted on, not even by the next tick)."""
        rec = self.rec
        before = (rec.placement, rec.last_promotion_epoch, rec.pending_epoch, list(rec.decisions))
        try:
            yield
            self.state.save()
        except BaseException:
            rec.placement, rec.last_promotion_epoch, rec.pending_epoch, rec.decisions = before
            raise
