"""Kubernetes names and MemorySpace status-field ownership, shared by the operator and sidecars.

Design §3: no status field has two writers. The operator patches only OPERATOR_STATUS_FIELDS,
the space's primary sidecar only SIDECAR_STATUS_FIELDS.
"""

from __future__ import annotations

from typing import Final, TypedDict

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
# "true" while the sidecar shuts down (SIGTERM): the operator switches its spaces away first.
ANNOTATION_DRAINING: Final = "engram.io/draining"
# "true", set by an administrator (`kubectl engram fence NODE`), never by the sidecar: the
# operator treats the node as draining (its spaces switch away, it is never chosen to lead) for
# as long as the annotation stays. The sidecar's renewals patch only their own keys, so it stays.
ANNOTATION_FENCED: Final = "engram.io/fenced"
# The failure domain of a node, copied by its sidecar from its Kubernetes Node's labels (or set
# with the `zone` and `rack` settings) onto its Lease's labels, where placement reads them.
LABEL_ZONE: Final = "topology.kubernetes.io/zone"
LABEL_RACK: Final = "engram.io/rack"
# Which release (operator) a MemorySpace or node Lease belongs to, when two releases share a
# namespace. An operator started with `--release R` reconciles only the spaces labelled R (and
# claims unlabelled ones by labelling them, unless told not to), and places them only on nodes
# whose Lease is labelled R or not labelled at all (a sidecar from before the label).
LABEL_RELEASE: Final = "engram.io/release"

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
