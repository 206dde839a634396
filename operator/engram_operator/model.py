"""Plain data the control-plane deciders share: nodes, spec, placement, reports, observations.

This module owns shapes only, no decisions. Every class is a frozen, slotted dataclass so a decider
can never mutate what it was given, and ids are the `contract` NewTypes so a node name can't be
passed where a space id is expected. `member_reports` reads the sidecars' `/v1/status` answers
into `MemberReport`s, for both drivers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from engram_contract.assignment import NO_TUNING, AckPolicy, AssignmentError, Tuning
from engram_contract.ids import Epoch, NodeName, Sequence, SpaceId
from engram_operator.verdict import Verdict

Role = Literal["primary", "replica"]
# The replica states of design §7, as the primary sidecar reports them.
MemberState = Literal["Healthy", "Lagging", "Degraded", "Failed", "CatchingUp"]

# A space's first primary serves epoch 1; every promotion adds one. 0 is never a real epoch, so a
# sidecar that reports 0 has not received any assignment yet.
FIRST_EPOCH: Final = Epoch(1)
# The epoch of "no entry": a log's last entry is at epoch 0 only when the log is empty.
NO_EPOCH: Final = Epoch(0)
NO_SEQUENCE: Final = Sequence(0)

# Default for spec.maxLagOnFailover: the same 10,000 entries beyond which a replica needs a
# snapshot to catch up (design §7). A replica that far behind is no longer "in sync" by our own
# definition, so promoting it would lose more than a catch-up could ever repair.
DEFAULT_MAX_LAG_ON_FAILOVER: Final = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """A node that can host spaces: a StatefulSet pod, or a sidecar process in local mode."""

    name: NodeName
    address: str
    zone: str | None = None
    rack: str | None = None
    # Shutting down (SIGTERM): its spaces are switched over to other nodes, and it is never
    # chosen as a new primary or a new member.
    draining: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SpaceSpec:
    """What the user asked for (MemorySpace.spec). Only the user writes these fields."""

    replicas: int = 2
    ack_policy: AckPolicy = "async"
    max_lag_on_failover: int = DEFAULT_MAX_LAG_ON_FAILOVER
    allow_lagging_failover: bool = False
    failover_automatic: bool = True
    paused: bool = False
    target_primary: NodeName | None = None
    # Replication frames compressed with zstd (spec.compression: zstd); part of the assignment.
    compression: bool = False
    # spec.batch, spec.lag and spec.catchupThreshold: carried to the nodes in the assignment;
    # the lag thresholds also judge the status (None fields: the nodes' own settings).
    tuning: Tuning = NO_TUNING

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"spec.replicas must be 0 or more, got {self.replicas}")
        if self.max_lag_on_failover < 0:
            raise ValueError(
                f"spec.maxLagOnFailover must be 0 or more, got {self.max_lag_on_failover}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where a space lives, who leads it, at which epoch (status; written by the control plane)."""

    primary: NodeName
    replicas: tuple[NodeName, ...]
    epoch: Epoch

    def __post_init__(self) -> None:
        if self.primary in self.replicas or len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"placement members must be distinct: {self.members}")

    @property
    def members(self) -> tuple[NodeName, ...]:
        """The primary first, then the replicas in placement order."""
        return (self.primary, *self.replicas)

    def role_of(self, node: NodeName) -> Role | None:
        """The role `node` holds in this placement, or None when it is not a member."""
        if node == self.primary:
            return "primary"
        return "replica" if node in self.replicas else None


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberReport:
    """One member's progress as last reported (status.members, written by the sidecars).

    `applied_sequence` is the highest sequence the member holds durably; for the primary it is the
    last sequence it wrote. `last_epoch` is the epoch of the entry at that sequence: entries are
    identified by (epoch, sequence), and an election ranks members by that pair (design §4). 0
    means no entry, or a sidecar too old to say. `epoch` is the epoch of the member's role claim
    (its assignment); `accepted_epoch` the highest epoch it has accepted, which a fence raises
    above `epoch` (None: not reported). `lag_seconds` is the age of the oldest entry the member
    lacks, as the primary computes it (0 when caught up, so an idle space reads 0).
    """

    node: NodeName
    role: Role
    epoch: Epoch
    applied_sequence: Sequence
    lag_seconds: float = 0.0
    state: MemberState = "Healthy"
    last_epoch: Epoch = NO_EPOCH
    accepted_epoch: Epoch | None = None
    # The spec settings the member applies (None: not reported), compared with the spec's.
    tuning: Tuning | None = None

    @property
    def log_position(self) -> tuple[int, int]:
        """(epoch of the last entry, last sequence): how up to date the member's log is."""
        return (self.last_epoch, self.applied_sequence)


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverProgress:
    """The switchover the driver tracks for a space between ticks (monotonic seconds).

    The driver sets it on BeginSwitchover, marks it on AbortSwitchover, drops it on
    ClearSwitchover or once a handover's steps are done.
    """

    target: NodeName
    started_at: float
    aborted_at: float | None = None
    abort_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """Everything one reconcile tick may look at for one space. Times are monotonic seconds.

    `verdicts` covers every node the driver knows; `reports` holds the last report of each node
    that claims the space (a dead member's last report too: elections need it).
    """

    space: SpaceId
    spec: SpaceSpec
    placement: Placement | None
    nodes: tuple[NodeInfo, ...]
    verdicts: Mapping[NodeName, Verdict]
    reports: Mapping[NodeName, MemberReport]
    switchover: SwitchoverProgress | None = None
    # Spaces each node leads, over all spaces: steers the primary of a newly placed space.
    primary_load: Mapping[NodeName, int] = field(default_factory=dict)
    # newEpoch of status.lastPromotion: until the winner confirms, the phase stays FailingOver.
    last_promotion_epoch: Epoch | None = None
    # When this control plane last *sent* each node a write-lease grant for this space (its
    # monotonic seconds): a heartbeat naming the space's epoch, or an assignment that makes the
    # node primary. A driver that can't know (it just started, and an earlier process may have
    # granted) reports its own start time. No new primary before the old one's lease has run out.
    lease_grants: Mapping[NodeName, float] = field(default_factory=dict)
    # An epoch recorded for a promotion that has not finished: members were (or are being)
    # fenced at it, and nobody was assigned at it yet, so a retry may use it again.
    pending_epoch: Epoch | None = None


def member_reports(
    status: Mapping[NodeName, Mapping[str, Any]], space: SpaceId
) -> dict[NodeName, MemberReport]:
    """Each node's last report of `space`, from the nodes' `/v1/status` answers (`status`), with
    lag and state as the space's primary sees them. Nodes that hold no role in it are left out."""
    lag_view: Mapping[str, Any] = {}
    for doc in status.values():
        view = (doc.get("spaces") or {}).get(space)
        if view and view.get("role") == "primary":
            lag_view = view.get("replicas") or {}
    out: dict[NodeName, MemberReport] = {}
    for node, doc in status.items():
        view = (doc.get("spaces") or {}).get(space)
        if not view or view.get("role") not in ("primary", "replica"):
            continue
        role = view["role"]
        seq = view.get("last_sequence" if role == "primary" else "applied_sequence", 0)
        lag = lag_view.get(node) or {}
        accepted = view.get("accepted_epoch")
        tuning = None
        if isinstance(view.get("tuning"), dict):
            try:
                tuning = Tuning.from_json(view["tuning"])
            except AssignmentError:
                tuning = None
        out[node] = MemberReport(
            node=node,
            role=role,
            epoch=Epoch(int(view.get("epoch", 0))),
            applied_sequence=Sequence(int(seq or 0)),
            lag_seconds=float(lag.get("lag_seconds", 0.0) or 0.0),
            state=lag.get("state", "Healthy"),
            last_epoch=Epoch(int(view.get("last_epoch") or NO_EPOCH)),
            accepted_epoch=Epoch(accepted) if isinstance(accepted, int) else None,
            tuning=tuning,
        )
    return out
