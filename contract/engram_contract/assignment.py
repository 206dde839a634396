"""A space's assignment: who leads, who follows, at which epoch, under which policies.

The control plane sends it (`PUT /v1/spaces/{space}/assignment`); the sidecar keeps the latest one
on disk so a restarted node resumes its roles without waiting. This module is the document's only
parser (`Assignment.from_json`) and its only builder (`Assignment.to_json`, and
`assignment_from_status` for a MemorySpace's status): local mode, the operator, the benchmark
and the tests all build it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from engram_contract.ids import NodeName
from engram_contract.kubernetes import NodeAddresses

AckPolicy = Literal["async", "one", "quorum"]
# Epochs are u64 in entry and frame headers, but int64 wherever else they go (Kubernetes status,
# JSON readers that use signed 64-bit integers): accept only what every one of them holds.
MAX_EPOCH = 2**63 - 1
ACK_POLICIES: tuple[AckPolicy, ...] = ("async", "one", "quorum")


class AssignmentError(ValueError):
    """The assignment document is malformed; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Member:
    node: NodeName
    address: str  # host:port of the node's replication listener
    http: str = ""  # host:port of its HTTP API, for redirects (421)

    def to_json(self) -> dict[str, str]:
        d = {"node": self.node, "address": self.address}
        if self.http:
            d["http"] = self.http
        return d


@dataclass(frozen=True, slots=True)
class Assignment:
    epoch: int
    primary: Member
    replicas: tuple[Member, ...]
    ack_policy: AckPolicy = "async"
    compression: bool = False

    @property
    def members(self) -> tuple[Member, ...]:
        return (self.primary, *self.replicas)

    def role_of(self, node: str) -> Literal["primary", "replica", "none"]:
        if self.primary.node == node:
            return "primary"
        return "replica" if any(r.node == node for r in self.replicas) else "none"

    def replicas_needed(self) -> int:
        """Replica acks a write needs, beyond the primary's own durable copy."""
        if self.ack_policy == "one":
            return min(1, len(self.replicas))
        if self.ack_policy == "quorum":
            return (len(self.members) // 2 + 1) - 1
        return 0

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "primary": self.primary.to_json(),
            "replicas": [r.to_json() for r in self.replicas],
            "ackPolicy": self.ack_policy,
            "compression": self.compression,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Assignment:
        if not isinstance(doc, dict):
            raise AssignmentError("assignment must be a JSON object")
        unknown = set(doc) - {"epoch", "primary", "replicas", "ackPolicy", "compression"}
        if unknown:
            raise AssignmentError(f"unknown field(s): {', '.join(sorted(unknown))}")
        epoch = doc.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= MAX_EPOCH:
            raise AssignmentError(f"epoch must be an integer 1..{MAX_EPOCH}")
        primary = _member(doc.get("primary"), "primary")
        reps = doc.get("replicas", [])
        if not isinstance(reps, list):
            raise AssignmentError("replicas must be a list")
        replicas = tuple(_member(r, f"replicas[{i}]") for i, r in enumerate(reps))
        names = [m.node for m in (primary, *replicas)]
        if len(set(names)) != len(names):
            raise AssignmentError("a node appears twice among primary and replicas")
        policy = doc.get("ackPolicy", "async")
        if policy not in ACK_POLICIES:
            raise AssignmentError(f"ackPolicy must be one of {', '.join(ACK_POLICIES)}")
        comp = doc.get("compression", False)
        if not isinstance(comp, bool):
            raise AssignmentError("compression must be true or false")
        return cls(epoch, primary, replicas, policy, comp)


def _member(doc: Any, where: str) -> Member:
    if not isinstance(doc, dict):
        raise AssignmentError(f"{where} must be an object with node and address")
    node, address, http = doc.get("node"), doc.get("address"), doc.get("http", "")
    if not isinstance(node, str) or not node:
        raise AssignmentError(f"{where}.node must be a non-empty string")
    if not isinstance(address, str) or not _hostport(address):
        raise AssignmentError(f"{where}.address must be host:port, got {address!r}")
    if not isinstance(http, str) or (http and not _hostport(http)):
        raise AssignmentError(f"{where}.http must be host:port, got {http!r}")
    return Member(NodeName(node), address, http)


def _hostport(s: str) -> bool:
    host, sep, port = s.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


def assignment_from_status(
    status: Mapping[str, object],
    spec: Mapping[str, object],
    addresses: Mapping[str, NodeAddresses],
) -> dict[str, Any] | None:
    """The assignment document that a MemorySpace's status and spec describe.

    None when the status holds no placement yet or a member's address is unknown. The operator
    pushes this document; a restarted sidecar rebuilds it from the API the same way.
    """
    primary, replicas, epoch = status.get("primary"), status.get("replicas"), status.get("epoch")
    if not isinstance(primary, str) or not isinstance(epoch, int) or not isinstance(replicas, list):
        return None
    names = [primary, *[r for r in replicas if isinstance(r, str)]]
    if any(m not in addresses for m in names):
        return None
    compression = spec.get("compression", "none")
    policy = spec.get("ackPolicy", "async")
    return assignment_document(
        epoch,
        [Member(NodeName(n), addresses[n]["address"], addresses[n]["http"]) for n in names],
        ack_policy=policy if policy in ACK_POLICIES else "async",
        compression=compression not in (None, False, "none"),
    )


def assignment_document(
    epoch: int,
    members: Sequence[Member],
    *,
    ack_policy: AckPolicy = "async",
    compression: bool = False,
) -> dict[str, Any]:
    """The JSON document for `members` (the primary first) at `epoch`: the one way to build it."""
    if not members:
        raise AssignmentError("an assignment needs a primary")
    return Assignment(epoch, members[0], tuple(members[1:]), ack_policy, compression).to_json()
