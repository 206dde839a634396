"""The JSON views of a node's spaces (GET /v1/spaces/{space}, /v1/status): what each role shows."""

from __future__ import annotations

import time
from typing import Any

from engram_sidecar.config import SidecarConfig
from engram_sidecar.log.epochs import epoch_at
from engram_sidecar.monitor import replica_state
from engram_sidecar.replication.peers import PeerPool
from engram_sidecar.space.hosted import Space


def space_view(
    sp: Space, peers: PeerPool, cfg: SidecarConfig, now: float | None = None
) -> dict[str, Any]:
    a = sp.assignment
    view: dict[str, Any] = {
        "space": sp.id,
        "role": sp.role,
        # The epoch of this node's role claim; accepted_epoch may be higher once fenced.
        "epoch": a.epoch if a else 0,
        "accepted_epoch": sp.accepted_epoch,
        "first_sequence": sp.log.first_sequence,
        "last_sequence": sp.log.last_sequence,
        "applied_sequence": sp.applied_sequence,
        # The epoch of the entry at applied_sequence: with it, the control plane ranks
        # candidates by (last_epoch, applied_sequence), never by sequence alone.
        "last_epoch": epoch_at(sp.log.history, sp.applied_sequence),
        "matched_sequence": sp.matched_sequence if sp.role == "replica" else None,
        "storage": sp.storage.view(),
        "ack_policy": a.ack_policy if a else None,
        # The spec settings this node applies (spec.batch, spec.lag, spec.catchupThreshold): the
        # control plane re-sends the assignment when they differ from the spec.
        "tuning": a.tuning.to_json() if a else None,
        "primary": a.primary.node if a else None,
        # The MemorySpace uid this node holds the space for (None: never told, local mode).
        "incarnation": a.incarnation if a else None,
        "fenced": sp.fenced_reason,
        "dropped_entries": sp.dropped_entries,
        "truncations": list(sp.truncations),
        "write_lease": sp.lease_valid() if sp.role == "primary" else None,
        "wal_bytes": sp.log.size_bytes,
    }
    if sp.role == "primary":
        now_ns = time.time_ns()
        mono = sp.clock() if now is None else now
        reps = {}
        for r in sp.replicas.values():
            lag, state = replica_state(sp, r, peers=peers, cfg=cfg, now=mono, now_ns=now_ns)
            link = peers.get(r.node)
            reps[r.node] = {
                "acked_sequence": r.acked,
                "lag_entries": lag.entries,
                "lag_seconds": round(lag.seconds, 3),
                "state": state,
                "connected": bool(link and link.connected),
                "last_error": link.last_error if link and not link.connected else "",
                "catch_up": r.catchup.view() if r.catchup is not None else None,
            }
        view["replicas"] = reps
        view["caught_up"] = list(sp.caught_up)
    elif sp.role == "replica":
        lag = sp.own_lag()
        view["primary_last_sequence"] = sp.primary_last_seq
        view["lag_entries"] = lag.entries
    return view
