"""A space's assignment: who leads, who follows, at which epoch, under which policies.

The control plane sends it (`PUT /v1/spaces/{space}/assignment`); the sidecar keeps the latest one
on disk so a restarted node resumes its roles without waiting. This module is the document's only
parser (`Assignment.from_json`) and its only builder (`Assignment.to_json`, and
`assignment_from_status` for a MemorySpace's status): local mode, the operator, the benchmark
and the tests all build it here.
"""

from __future__ import annotations

import re
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
class Tuning:
    """A space's replication settings from its spec (spec.batch, spec.lag, spec.catchupThreshold).

    Each field left None means "the node's own setting" (its configuration), so a document
    without them, from an older control plane, keeps today's behaviour.
    """

    batch_max_entries: int | None = None
    batch_max_delay: float | None = None  # seconds
    lag_warning_seconds: float | None = None
    lag_critical_seconds: float | None = None
    catchup_threshold: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        batch = _drop_none(
            {"maxEntries": self.batch_max_entries, "maxDelaySeconds": self.batch_max_delay}
        )
        lag = _drop_none(
            {
                "warningSeconds": self.lag_warning_seconds,
                "criticalSeconds": self.lag_critical_seconds,
            }
        )
        if batch:
            out["batch"] = batch
        if lag:
            out["lag"] = lag
        if self.catchup_threshold is not None:
            out["catchupThreshold"] = self.catchup_threshold
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Tuning:
        batch = _object(doc.get("batch", {}), "batch", {"maxEntries", "maxDelaySeconds"})
        lag = _object(doc.get("lag", {}), "lag", {"warningSeconds", "criticalSeconds"})
        t = cls(
            batch_max_entries=_int(batch.get("maxEntries"), "batch.maxEntries", 1, 10_000),
            batch_max_delay=_seconds(batch.get("maxDelaySeconds"), "batch.maxDelaySeconds", 0, 1),
            lag_warning_seconds=_seconds(lag.get("warningSeconds"), "lag.warningSeconds", 0, 3600),
            lag_critical_seconds=_seconds(
                lag.get("criticalSeconds"), "lag.criticalSeconds", 0, 3600
            ),
            catchup_threshold=_int(doc.get("catchupThreshold"), "catchupThreshold", 1, MAX_EPOCH),
        )
        w, c = t.lag_warning_seconds, t.lag_critical_seconds
        if w is not None and c is not None and c < w:
            raise AssignmentError("lag.criticalSeconds must be at least lag.warningSeconds")
        return t


NO_TUNING = Tuning()


@dataclass(frozen=True, slots=True)
class Assignment:
    epoch: int
    primary: Member
    replicas: tuple[Member, ...]
    ack_policy: AckPolicy = "async"
    compression: bool = False
    tuning: Tuning = NO_TUNING
    # Which life of the space this is: the MemorySpace's metadata.uid on Kubernetes (None in
    # local mode, and from older control planes). A node that holds another incarnation of the
    # same name retires it before taking this one (docs/design-notes.md, "Incarnations").
    incarnation: str | None = None

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
            **self.tuning.to_json(),
            **({"incarnation": self.incarnation} if self.incarnation else {}),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Assignment:
        if not isinstance(doc, dict):
            raise AssignmentError("assignment must be a JSON object")
        unknown = set(doc) - {
            "epoch",
            "primary",
            "replicas",
            "ackPolicy",
            "compression",
            "batch",
            "lag",
            "catchupThreshold",
            "incarnation",
        }
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
        incarnation = doc.get("incarnation")
        if incarnation is not None and not valid_incarnation(incarnation):
            raise AssignmentError(INCARNATION_RULE)
        return cls(epoch, primary, replicas, policy, comp, Tuning.from_json(doc), incarnation)


INCARNATION_RULE = "incarnation must be 1 to 128 characters from [A-Za-z0-9-]"


def valid_incarnation(value: object) -> bool:
    """A MemorySpace uid (or any id of that shape): it also names a directory on the nodes."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9-]{1,128}", value) is not None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _object(doc: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise AssignmentError(f"{where} must be an object")
    unknown = set(doc) - keys
    if unknown:
        raise AssignmentError(f"unknown field(s) in {where}: {', '.join(sorted(unknown))}")
    return doc


def _int(v: Any, where: str, lo: int, hi: int) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise AssignmentError(f"{where} must be an integer {lo}..{hi}, got {v!r}")
    return v


def _seconds(v: Any, where: str, lo: float, hi: float) -> float | None:
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise AssignmentError(f"{where} must be a number of seconds {lo:g}..{hi:g}, got {v!r}")
    return float(v)


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


def join_hostport(host: str, port: int | str) -> str:
    """`host:port`, an IPv6 host in brackets (`[fd00::5]:7070`), as URLs and dialers need it."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bracketed(address: str) -> str:
    """`address` (host:port) with an IPv6 host bracketed. The port is what follows the last
    colon, so `fd00::5:7070` (as `$(POD_IP):7070` expands on an IPv6 pod) is `[fd00::5]:7070`.
    Anything without a port is returned as it is."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return address
    return join_hostport(host, port)


def assignment_from_status(
    status: Mapping[str, object],
    spec: Mapping[str, object],
    addresses: Mapping[str, NodeAddresses],
    *,
    incarnation: str | None = None,
) -> dict[str, Any] | None:
    """The assignment document that a MemorySpace's status and spec describe (`incarnation`:
    its metadata.uid).

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
        tuning=tuning_from_spec(spec),
        incarnation=incarnation,
    )


def parse_duration(text: str) -> float:
    """A spec duration ("10ms", "500us", "0.25s") in seconds; ValueError if malformed."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"a duration is a number and a unit (us, ms, s), got {text!r}")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def tuning_from_spec(spec: Mapping[str, object]) -> Tuning:
    """The Tuning a MemorySpace spec asks for (spec.batch, spec.lag, spec.catchupThreshold).

    Values the CRD's schema refuses are left to the node's own settings here rather than
    raised: the operator reports a bad spec (kube/convert.py); a sidecar rebuilding its roles
    from the API must not stop over one.
    """
    batch = spec.get("batch")
    lag = spec.get("lag")
    batch = batch if isinstance(batch, Mapping) else {}
    lag = lag if isinstance(lag, Mapping) else {}
    delay: float | None = None
    raw_delay = batch.get("maxDelay")
    if isinstance(raw_delay, str):
        try:
            delay = parse_duration(raw_delay)
        except ValueError:
            delay = None
    doc: dict[str, Any] = {
        "batch": _drop_none({"maxEntries": batch.get("maxEntries"), "maxDelaySeconds": delay}),
        "lag": _drop_none(
            {
                "warningSeconds": lag.get("warningSeconds"),
                "criticalSeconds": lag.get("criticalSeconds"),
            }
        ),
        "catchupThreshold": spec.get("catchupThreshold"),
    }
    try:
        return Tuning.from_json(doc)
    except AssignmentError:
        return NO_TUNING


def assignment_document(
    epoch: int,
    members: Sequence[Member],
    *,
    ack_policy: AckPolicy = "async",
    compression: bool = False,
    tuning: Tuning = NO_TUNING,
    incarnation: str | None = None,
) -> dict[str, Any]:
    """The JSON document for `members` (the primary first) at `epoch`: the one way to build it."""
    if not members:
        raise AssignmentError("an assignment needs a primary")
    return Assignment(
        epoch, members[0], tuple(members[1:]), ack_policy, compression, tuning, incarnation
    ).to_json()
