"""A switchover's handover, executed against the API and the sidecars (the plan is `switchover`'s).

Owns the order of effects, mirroring `local.ControlLoop.hand_over`: record the new epoch in status
first; fence the old primary (it stops acknowledging and answers its final sequence); wait,
bounded, until the target has applied that sequence; promote the target; demote the old primary;
tell every member. If any step fails before the target leads, the old primary leads again at an
epoch above the fence's, so writes pause for at most the catch-up bound, and the switchover is
marked aborted (retried after the cool-down). The old primary's fence answer is what makes this
safe without a majority or a write-lease wait: it is the only writer, and it has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.ids import Epoch, NodeName, SpaceId
from engram_operator.kube_api import KubeApiError
from engram_operator.kube_metrics import OperatorMetrics
from engram_operator.kube_model import SpaceState
from engram_operator.kube_nodes import NodeMonitor
from engram_operator.model import Placement, SwitchoverProgress
from engram_operator.switchover import AwaitCatchUp, Demote, Fence, HandOver, PromoteTarget


class SpaceDriver(Protocol):
    """What a hand-over needs of its space's driver (engram_operator.kube_driver.SpaceDriver)."""

    space: SpaceId
    clock: Callable[[], float]
    sidecars: SidecarClient
    nodes: NodeMonitor
    metrics: OperatorMetrics

    @property
    def state(self) -> SpaceState: ...

    async def push(self, placement: Placement, nodes: tuple[NodeName, ...]) -> set[NodeName]: ...

    async def record(
        self,
        placement: Placement,
        *,
        phase: str,
        promotion: Mapping[str, object] | None = None,
    ) -> None: ...

    def event(self, type_: str, reason: str, message: str) -> None: ...


log = logging.getLogger("engram_operator.kube")

# How often to read the target's applied sequence while the old primary is fenced: writes are
# paused meanwhile, so poll fast (a view is one small GET on loopback or the pod network).
CATCH_UP_POLL: Final = 0.02
GIVE_BACK_ATTEMPTS: Final = 3


class HandOverFailed(Exception):
    """A handover step failed; the message says which and why."""


async def hand_over(driver: SpaceDriver, plan: HandOver) -> None:
    old, new, space = driver.state.placement, plan.placement, driver.space
    if old is None:
        return
    await driver.record(new, phase="SwitchingOver")  # the epoch is recorded before anyone acts
    final = 0
    try:
        for step in plan.steps:
            if isinstance(step, Fence):
                answer = await driver.sidecars.fence(_http(driver, step.node), space, step.epoch)
                try:
                    final = int(answer.get("last_sequence") or 0)
                except (TypeError, ValueError) as err:
                    raise HandOverFailed(f"{step.node} answered the fence with {answer}") from err
            elif isinstance(step, AwaitCatchUp):
                await _await_catch_up(driver, step.node, max(final, step.sequence), step.timeout)
            elif isinstance(step, PromoteTarget):
                if await driver.push(new, (step.node,)):
                    raise HandOverFailed(f"{step.node} did not take the primary role")
            elif isinstance(step, Demote):
                # A replica that missed it is re-sent its role by a later tick (`_resend`).
                await driver.push(new, (step.node,))
    except (SidecarError, HandOverFailed) as err:
        await _give_back(driver, old, new, str(err))
        return
    await driver.push(new, new.members)
    driver.metrics.promotions.labels(space=space).inc()
    message = (
        f"switched space {space} over to {new.primary} at epoch {new.epoch} (zero loss:"
        f" {new.primary} held sequence {final} before taking writes)"
    )
    log.info("%s", message)
    driver.event("Normal", "SwitchedOver", message)


def _http(driver: SpaceDriver, node: NodeName) -> str:
    address = driver.nodes.addresses().get(node)
    if address is None:
        raise HandOverFailed(f"no address known for {node}")
    return address["http"]


async def _await_catch_up(driver: SpaceDriver, node: NodeName, wanted: int, timeout: float) -> None:
    http = _http(driver, node)
    deadline = driver.clock() + timeout
    applied = -1
    while driver.clock() < deadline:
        with contextlib.suppress(SidecarError, ValueError, TypeError):
            view = await driver.sidecars.space_view(http, driver.space)
            applied = int(view.get("applied_sequence", -1))
        if applied >= wanted:
            return
        await asyncio.sleep(CATCH_UP_POLL)
    raise HandOverFailed(
        f"{node} did not reach sequence {wanted} within {timeout:g} s (applied {applied})"
    )


async def _give_back(driver: SpaceDriver, old: Placement, new: Placement, why: str) -> None:
    """The old primary leads again, at an epoch above the fence's."""
    back = Placement(primary=old.primary, replicas=old.replicas, epoch=Epoch(new.epoch + 1))
    # Writes are paused until this is on record, so try a few times. If it still fails, a later
    # tick finds the target recorded as primary and sends it its role without the catch-up:
    # the old primary's last entries could then be cut, the loss this handover exists to avoid.
    for attempt in range(GIVE_BACK_ATTEMPTS):
        try:
            await driver.record(back, phase="SwitchingOver")
            break
        except KubeApiError:
            if attempt == GIVE_BACK_ATTEMPTS - 1:
                raise
            await asyncio.sleep(CATCH_UP_POLL * 10)
    await driver.push(back, back.members)
    reason = (
        f"switchover of space {driver.space} to {new.primary} aborted: {why};"
        f" {old.primary} leads again at epoch {back.epoch}"
    )
    now = driver.clock()
    progress = driver.state.switchover
    driver.state.switchover = SwitchoverProgress(
        target=new.primary,
        started_at=progress.started_at if progress else now,
        aborted_at=now,
        abort_reason=reason,
    )
    log.warning("%s", reason)
    driver.event("Warning", "SwitchoverAborted", reason)
