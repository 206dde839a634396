"""Deleting a MemorySpace: retire the space on every node before the object goes (I/O).

The operator's finalizer (`engram.io/operator`, kopf's) holds a deleted MemorySpace until its
`on.delete` handler has run this: every node with a node Lease is asked to retire the space
(`POST /v1/spaces/{space}/retire` with the object's uid and `spec.deletionPolicy`). The primary
goes first, so no write is acknowledged once the replicas' copies start to go. A node retires
the space for good: it stops it, moves its files aside (Retain) or deletes them (Delete), and
refuses that incarnation from then on, so a late assignment can't bring it back.

A live node (its Lease renewed lately) that can't be reached holds the deletion: the handler
fails and kopf retries it, and an Event says which node. A node whose Lease has lapsed can't
answer and is not waited for (else a dead node would block deletion for ever): it retires the
space, files kept, when it next reads the MemorySpaces and finds the object gone, or when a
re-created space of that name reaches it (docs/design-notes.md, "Incarnations").
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import NodeName, SpaceId
from engram_operator.kube.nodes import NodeRecord

DeletionPolicy = Literal["Retain", "Delete"]
DELETION_POLICIES: Final[tuple[DeletionPolicy, ...]] = ("Retain", "Delete")


def deletion_policy(spec: Mapping[str, Any]) -> DeletionPolicy:
    """spec.deletionPolicy, Retain unless the spec says Delete (the CRD refuses other values;
    anything unreadable keeps the data)."""
    return "Delete" if spec.get("deletionPolicy") == "Delete" else "Retain"


def retire_order(
    nodes: Sequence[NodeName], primary: NodeName | None, members: Sequence[NodeName]
) -> list[list[NodeName]]:
    """The rounds of retire calls: the primary alone first (writes stop), then every other
    node at once (members, and any node that may hold an old copy)."""
    rest = sorted(set(nodes) | set(members))
    if primary is None or primary not in rest:
        return [rest] if rest else []
    rest.remove(primary)
    return [[primary], rest] if rest else [[primary]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetireOutcome:
    """What the nodes answered: who retired (and kept or deleted the files), who held another
    incarnation, who could not be reached, and who was skipped as down."""

    retired: tuple[NodeName, ...] = ()
    kept: tuple[NodeName, ...] = ()
    other: tuple[NodeName, ...] = ()
    failed: tuple[tuple[NodeName, str], ...] = ()
    down: tuple[NodeName, ...] = ()

    @property
    def done(self) -> bool:
        return not self.failed

    def sentence(self, space: SpaceId, policy: DeletionPolicy) -> str:
        if self.failed:
            who = "; ".join(f"{n}: {why}" for n, why in self.failed)
            return f"space {space}: cannot retire it on every live node yet ({who}); retrying"
        parts = [f"space {space} retired on {', '.join(self.retired) or 'no node'}"]
        parts.append("files kept" if policy == "Retain" else "files deleted")
        if self.down:
            parts.append(
                f"{', '.join(self.down)} down: retires it (files kept) when it reads the"
                " MemorySpaces again"
            )
        return "; ".join(parts)


async def retire_everywhere(
    *,
    sidecars: SidecarClient,
    space: SpaceId,
    incarnation: str | None,
    policy: DeletionPolicy,
    records: Mapping[NodeName, NodeRecord],
    alive: Mapping[NodeName, bool],
    primary: NodeName | None,
    members: Sequence[NodeName],
) -> RetireOutcome:
    """Ask every node in `records` to retire `space` (see the module); `alive` says whose Lease
    is fresh. Members without a Lease record can't be reached: counted as down."""
    retired: list[NodeName] = []
    kept: list[NodeName] = []
    other: list[NodeName] = []
    failed: list[tuple[NodeName, str]] = []
    down: list[NodeName] = []

    async def one(node: NodeName) -> None:
        record = records.get(node)
        if record is None or not alive.get(node, False):
            down.append(node)
            return
        try:
            answer = await sidecars.retire(
                record.http, space, incarnation=incarnation, delete=policy == "Delete"
            )
        except SidecarError as err:
            if err.status == 409:
                other.append(node)  # holds another life of the space: not ours to retire
                return
            failed.append((node, str(err)[:200]))
            return
        if answer.get("hosted"):
            retired.append(node)
        if answer.get("kept"):
            kept.append(node)

    for round_ in retire_order(list(records), primary, members):
        await asyncio.gather(*(one(n) for n in round_))
        if failed and round_ and round_[0] == primary:
            break  # the primary may still take writes: the replicas keep their copies
    return RetireOutcome(
        retired=tuple(sorted(retired)),
        kept=tuple(sorted(kept)),
        other=tuple(sorted(other)),
        failed=tuple(sorted(failed)),
        down=tuple(sorted(down)),
    )
