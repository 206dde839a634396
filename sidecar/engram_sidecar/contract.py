"""Names and shapes shared by the data plane and the control plane.

This is the only sidecar module the operator imports: ids, validation of ids, and the fixed-size
space id that crosses the wire. It imports nothing of the sidecar but `errors`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Final, NewType, TypedDict

from engram_sidecar.errors import InvalidSpaceId

SpaceId = NewType("SpaceId", str)
NodeName = NewType("NodeName", str)
Sequence = NewType("Sequence", int)
Epoch = NewType("Epoch", int)

ENV_PREFIX: Final = "ENGRAM_"
METRICS_PREFIX: Final = "engram_replication_"

_SPACE_RE: Final = re.compile(r"[a-z0-9_-]{3,64}")

# Frames carry a 16-byte space id. Engram's ids are strings, not UUIDs, so the wire id is the
# RFC 4122 version-5 UUID of the string under this fixed namespace (uuid5(SPACE_NAMESPACE, id)).
# It is a pure function of the name, so every node derives the same bytes with no registry.
SPACE_NAMESPACE: Final = uuid.UUID("6f1c2a7e-3b5d-5e0a-9c41-0d2e8b7f4a10")


def validate_space_id(space: str) -> SpaceId:
    """Return `space` as a SpaceId, or raise InvalidSpaceId with the rule it broke."""
    if not isinstance(space, str) or _SPACE_RE.fullmatch(space) is None:
        raise InvalidSpaceId(
            f"invalid memory space id {space!r}: use 3 to 64 characters from [a-z0-9_-]"
        )
    return SpaceId(space)


def space_wire_id(space: SpaceId) -> bytes:
    """The 16-byte id that frames carry for `space`."""
    return uuid.uuid5(SPACE_NAMESPACE, space).bytes


# ---- Kubernetes: names and status shapes shared by the operator and the node sidecars ---------

API_GROUP: Final = "engram.io"
API_VERSION: Final = "v1alpha1"
KIND: Final = "MemorySpace"
PLURAL: Final = "memoryspaces"

# One coordination.k8s.io/v1 Lease per node, named LEASE_PREFIX + node, in the release namespace.
# The sidecar renews it every LEASE_RENEW_SECONDS; the operator judges it against
# LEASE_DURATION_SECONDS (engram_operator.verdict.Timing derives both; keep them in step).
LEASE_PREFIX: Final = "engram-node-"
LEASE_DURATION_SECONDS: Final = 2
LEASE_RENEW_SECONDS: Final = 0.5
# The Lease is also the node registry: the sidecar writes where it can be reached, so the
# operator needs no pod IPs and tests can run nodes as local processes.
LABEL_NODE_LEASE: Final = "engram.io/node-lease"  # value "true"
ANNOTATION_HTTP: Final = "engram.io/http-address"  # host:port of the sidecar's HTTP API
ANNOTATION_REPLICATION: Final = "engram.io/replication-address"  # host:port of its listener

# MemorySpace.status: who writes which field (design §3: no field has two writers). The operator
# sends merge patches containing only OPERATOR_STATUS_FIELDS; the space's primary sidecar only
# SIDECAR_STATUS_FIELDS.
OPERATOR_STATUS_FIELDS: Final = frozenset(
    {
        "phase",
        "primary",
        "replicas",
        "epoch",
        "conditions",
        "lastPromotion",
        "ready",
        "observedGeneration",
        "message",
        "switchover",
        "placedAt",
    }
)
SIDECAR_STATUS_FIELDS: Final = frozenset(
    {"members", "maxLagEntries", "maxLagSeconds", "membersReportedAt", "membersEpoch"}
)


class MemberStatus(TypedDict, total=False):
    """One row of MemorySpace.status.members, written by the space's primary sidecar."""

    node: str
    role: str  # "primary" | "replica"
    appliedSequence: int
    lagEntries: int
    lagSeconds: float
    state: str  # Healthy | Lagging | Degraded | Failed | CatchingUp
    catchUp: dict[str, object]  # phase, done, total, rate, eta (catch-up issue)


class NodeAddresses(TypedDict):
    address: str  # replication host:port
    http: str  # HTTP host:port


def lease_name(node: str) -> str:
    return LEASE_PREFIX + node


def assignment_from_status(
    status: Mapping[str, object],
    spec: Mapping[str, object],
    addresses: Mapping[str, NodeAddresses],
) -> dict[str, object] | None:
    """The sidecar assignment document that a MemorySpace's status and spec describe.

    None when the status holds no placement yet or a member's address is unknown. The operator
    pushes this document; a restarted sidecar rebuilds it from the API the same way.
    """
    primary, replicas, epoch = status.get("primary"), status.get("replicas"), status.get("epoch")
    if not isinstance(primary, str) or not isinstance(epoch, int) or not isinstance(replicas, list):
        return None
    members = [primary, *[r for r in replicas if isinstance(r, str)]]
    if any(m not in addresses for m in members):
        return None

    def member(n: str) -> dict[str, str]:
        a = addresses[n]
        return {"node": n, "address": a["address"], "http": a["http"]}

    compression = spec.get("compression", "none")
    return {
        "epoch": epoch,
        "primary": member(primary),
        "replicas": [member(r) for r in members[1:]],
        "ackPolicy": spec.get("ackPolicy", "async"),
        "compression": compression not in (None, False, "none"),
    }
