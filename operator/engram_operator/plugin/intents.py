"""What each `kubectl engram` command writes, decided from what it read. Pure.

Every request is one of the knobs the operator already reads (docs/crd.md, docs/operator.md):

* `promote SPACE NODE` and `switchover SPACE` set `spec.targetPrimary`: the operator switches
  over to that node with zero loss (or, with `failover.automatic: false` and a dead primary,
  promotes it). `switchover` picks the target itself: the most caught-up healthy replica that is
  neither draining nor fenced. Once the node leads, the plugin removes `targetPrimary` again
  (unless `--keep-target`): left standing, it would hold the space on that node through drains.
* `pause` / `resume` set `spec.paused`.
* `fence NODE` / `fence --off NODE` set / remove the annotation `engram.io/fenced` on the
  node's Lease: the operator then treats the node as draining (its spaces switch away, it is
  never chosen to lead) until the annotation goes. A `targetPrimary` naming the node is removed
  (the operator keeps a space on its target even when that target drains).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engram_contract.kubernetes import ANNOTATION_DRAINING, ANNOTATION_FENCED, LEASE_PREFIX


class IntentError(Exception):
    """The request can't be made as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class NodeFlags:
    """What a node's Lease says about its availability to lead."""

    draining: bool
    fenced: bool


def node_flags(leases: Iterable[Mapping[str, Any]]) -> dict[str, NodeFlags]:
    out: dict[str, NodeFlags] = {}
    for lease in leases:
        meta = lease.get("metadata") or {}
        name = str(meta.get("name", ""))
        if not name.startswith(LEASE_PREFIX):
            continue
        notes = meta.get("annotations") or {}
        out[name[len(LEASE_PREFIX) :]] = NodeFlags(
            draining=notes.get(ANNOTATION_DRAINING) == "true",
            fenced=notes.get(ANNOTATION_FENCED) == "true",
        )
    return out


def _status(space: Mapping[str, Any]) -> Mapping[str, Any]:
    return space.get("status") or {}


def _name(space: Mapping[str, Any]) -> str:
    return str((space.get("metadata") or {}).get("name", "?"))


def promote_patch(space: Mapping[str, Any], node: str) -> dict[str, Any]:
    """`spec.targetPrimary: NODE`, refused here when the operator would refuse it anyway."""
    spec, status = space.get("spec") or {}, _status(space)
    name = _name(space)
    if spec.get("paused"):
        raise IntentError(
            f"space {name} is paused: `kubectl engram resume {name}` first (a paused space "
            "isn't reconciled, and the CRD refuses a new targetPrimary on it)"
        )
    if status.get("primary") == node:
        raise IntentError(f"{node} already leads space {name}")
    replicas = status.get("replicas") or []
    if node not in replicas:
        have = ", ".join(replicas) or "none yet"
        raise IntentError(f"{node} is not a replica of space {name} (its replicas: {have})")
    return {"spec": {"targetPrimary": node}}


def switchover_target(space: Mapping[str, Any], flags: Mapping[str, NodeFlags]) -> tuple[str, str]:
    """(the replica to switch over to, why it): the healthiest, most caught-up replica that is
    not draining or fenced; ties by name. The operator itself waits until it has caught up."""
    status = _status(space)
    name = _name(space)
    rows = {
        str(r.get("node")): r
        for r in status.get("members") or []
        if isinstance(r, Mapping) and r.get("role") == "replica"
    }
    candidates = []
    for node in status.get("replicas") or []:
        f = flags.get(node)
        if f is not None and (f.draining or f.fenced):
            continue
        row = rows.get(node)
        if row is None:
            continue  # no report from the primary: nothing says it is caught up
        state = str(row.get("state", ""))
        lag = int(row.get("lagEntries") or 0)
        candidates.append((state != "Healthy", lag, node, state))
    if not candidates:
        raise IntentError(
            f"space {name} has no replica to switch over to: none is reported by its primary, "
            "or every one is draining or fenced (see `kubectl engram status " + name + "`)"
        )
    _, lag, node, state = min(candidates)
    return node, f"{state or 'unknown'}, {lag} entries behind"


def clear_target_patch() -> dict[str, Any]:
    """Remove `spec.targetPrimary` (a merge patch's null): the space may then stay wherever a
    later failover or drain puts it."""
    return {"spec": {"targetPrimary": None}}


def pause_patch(paused: bool) -> dict[str, Any]:
    return {"spec": {"paused": paused}}


def fence_patch(on: bool) -> dict[str, Any]:
    """A merge patch of the node Lease: the annotation set, or removed (null)."""
    return {"metadata": {"annotations": {ANNOTATION_FENCED: "true" if on else None}}}
