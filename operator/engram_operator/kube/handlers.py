"""`engram-replication operator`: the kopf handlers and the process around them.

Handlers stay thin. kopf starts one daemon per MemorySpace when the object appears or the
operator (re)starts, and stops it when the object is deleted, the operator exits, or kopf peering
pauses this instance in favour of a peer. The daemon builds a `SpaceDriver` from the object's
status and calls `tick()` after node refreshes (every 0.25 s; watch events alone could not
notice a node that silently stops), when the one `Ticker` wakes it: only when its tick is due
(kube/cadence.py), so steady spaces cost next to nothing. Everything else lives in the driver
and the pure core.

HA: with `--peering NAME`, replicas coordinate through the namespaced KopfPeering object NAME.
kopf pauses every instance that sees a live peer of higher priority, and — by design — pauses
*all* instances of equal priority, so each instance needs its own priority. By default it is
minus the start time in microseconds: the longest-running instance leads, a restarted or added
replica stands by instead of taking over, and `--dev` (priority 666) outranks them all.

Releases: with `--release R` (the chart passes its release name), the handlers see only the
MemorySpaces labelled `engram.io/release=R`, so two releases in one namespace never reconcile the
same space. A space without the label is claimed (labelled R, guarded by its resourceVersion, so
of two operators racing for it one wins) unless `--no-claim-unlabelled`: a single release keeps
working with unlabelled manifests, and with two releases a space goes to whichever claims it
first, or to the one it names. Without `--release`, every space is reconciled (as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import kopf
from aiohttp import web

from engram_contract.assignment import valid_incarnation
from engram_contract.client import SidecarClient
from engram_contract.ids import SpaceId, validate_space_id
from engram_contract.kubernetes import API_GROUP, API_VERSION, KIND, LABEL_RELEASE, PLURAL
from engram_contract.tokens import KeyFile
from engram_operator.kube.api import (
    MERGE_PATCH,
    KubeApi,
    KubeApiError,
    ObjectRef,
    connection_info,
)
from engram_operator.kube.cadence import IDLE_EVERY, Inputs, LastTick, space_views, waited_too_long
from engram_operator.kube.convert import placement_from_status
from engram_operator.kube.driver import SpaceDriver
from engram_operator.kube.gctune import tune_collector
from engram_operator.kube.health import OperatorHealth
from engram_operator.kube.metrics import OperatorMetrics, serve
from engram_operator.kube.nodes import NodeMonitor, parse_selector
from engram_operator.kube.retire import deletion_policy, retire_everywhere
from engram_operator.kube.ticker import Ticker
from engram_operator.placement import describe
from engram_operator.reconcile import DEFAULT_SETTINGS
from engram_operator.verdict import DEFAULT_TIMING

log = logging.getLogger("engram_operator.kube")

DEV_PRIORITY: Final = 666  # kopf's own `--dev` priority
# Space ticks that run at once. Most take milliseconds; a switchover's handover may take seconds,
# so there is room for many of those beside the rest.
TICK_SLOTS: Final = 32
# A stopped daemon ends its current tick and exits: within half a second, unless the tick is a
# switchover's handover, which may need its catch-up bound (5 s) to finish or give the space back.
# Only past this does kopf cancel it.
STOP_GRACE: Final = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorOptions:
    namespace: str
    token_file: Path
    node_selector: str = ""
    # The release whose spaces (label LABEL_RELEASE) and nodes this operator owns; "" = all.
    release: str = ""
    claim_unlabelled: bool = True
    peering: str | None = None
    standalone: bool = False
    dev: bool = False
    priority: int | None = None
    peering_lifetime: int = 10
    metrics_host: str = "0.0.0.0"  # scraped from other pods
    metrics_port: int = 0
    kubeconfig: Path | None = None
    api_url: str | None = None
    log_level: str = "INFO"


def identity() -> str:
    """Who this instance is, in peering records and API user agents: the pod, or host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


LEGACY_FINALIZER: Final = f"{API_GROUP}/operator"


def finalizer(release: str) -> str:
    """kopf's finalizer on the spaces this operator reconciles. One per release: kopf removes
    its finalizer from an object none of its deletion handlers matches, so two releases sharing
    one would take it off each other's spaces, again and again. (A release name is at most 53
    characters; the name part of a finalizer may have 63.)"""
    return f"{LEGACY_FINALIZER}-{release}" if release else LEGACY_FINALIZER


def priority(opts: OperatorOptions) -> int:
    if opts.priority is not None:
        return opts.priority
    if opts.dev:
        return DEV_PRIORITY
    return -(time.time_ns() // 1000)


def settings(opts: OperatorOptions) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.peering.lifetime = opts.peering_lifetime
    s.peering.priority = priority(opts)
    s.persistence.finalizer = finalizer(opts.release)
    # kopf posts its own log lines as Events from this level up; ours are posted explicitly.
    s.posting.level = logging.WARNING
    # One exact namespace and a CRD installed before us (by the chart): no need to watch the
    # cluster's namespaces and CRDs, and no RBAC for them.
    s.scanning.disabled = True
    s.watching.connect_timeout = 5.0
    s.watching.server_timeout = 300
    s.watching.reconnect_backoff = 0.5
    return s


class Operator:
    """One operator process: shared clients, the node monitor, and the handler registry."""

    def __init__(self, opts: OperatorOptions, kopf_settings: kopf.OperatorSettings) -> None:
        self.opts = opts
        self.settings = kopf_settings
        self.identity = identity()
        self.metrics = OperatorMetrics()
        self.api = KubeApi(self.credentials, user_agent=f"engram-operator ({self.identity})")
        # Re-read when the Secret changes: during a rotation the file holds two keys, and the
        # first is the one to send (engram_contract.tokens).
        token = KeyFile(opts.token_file).current_text
        self.sidecars = SidecarClient(
            token,
            probe_timeout=DEFAULT_TIMING.probe_timeout,
            lease_seconds=DEFAULT_SETTINGS.write_lease,
        )
        self.metrics_runner: web.AppRunner | None = None
        self.tick_slots = asyncio.Semaphore(TICK_SLOTS)
        self.ticker = Ticker(on_skip=self.metrics.ticks.labels("skipped").inc)
        # The object kopf hands each space's daemon, kept current by kopf's watch (the audit).
        self.bodies: dict[str, kopf.Body] = {}
        self.nodes = NodeMonitor(
            api=self.api,
            sidecars=self.sidecars,
            namespace=opts.namespace,
            selector=parse_selector(opts.node_selector),
            release=opts.release,
            on_refresh=self.ticker.refreshed,
        )
        peering = None if opts.standalone or not opts.peering else opts.peering
        self.health = OperatorHealth(
            api=self.api,
            metrics=self.metrics,
            namespace=opts.namespace,
            identity=self.identity,
            priority=kopf_settings.peering.priority,
            peering=peering,
            spaces_path=spaces_path(opts.namespace),
            spaces_selector=f"{LABEL_RELEASE}={opts.release}" if opts.release else "",
            delivered=self.delivered,
            monitor_refreshed=lambda: self.nodes.refreshed_at,
        )

    def delivered(self) -> dict[str, str | None]:
        """Each reconciled object's resourceVersion as kopf's watch last delivered it."""
        out: dict[str, str | None] = {}
        for name, body in self.bodies.items():
            version = (body.get("metadata") or {}).get("resourceVersion")
            out[name] = version if isinstance(version, str) else None
        return out

    async def close_metrics(self) -> None:
        runner, self.metrics_runner = self.metrics_runner, None
        if runner is not None:
            await runner.cleanup()

    def credentials(self) -> kopf.ConnectionInfo:
        return connection_info(
            settings=self.settings, kubeconfig=self.opts.kubeconfig, api_url=self.opts.api_url
        )

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        # kopf's filter: only this release's spaces get a daemon and the retire finalizer.
        mine = {LABEL_RELEASE: self.opts.release} if self.opts.release else None

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return self.credentials()

        @kopf.daemon(
            API_GROUP,
            API_VERSION,
            PLURAL,
            id="reconcile",
            registry=registry,
            labels=mine,
            cancellation_backoff=STOP_GRACE,
            cancellation_timeout=2.0,
        )
        async def reconcile_space(
            name: str,
            namespace: str | None,
            body: kopf.Body,
            stopped: kopf.DaemonStopped,
            **_: Any,
        ) -> None:
            await self.run_space(name, namespace or self.opts.namespace, body, stopped)

        @kopf.on.delete(API_GROUP, API_VERSION, PLURAL, id="retire", registry=registry, labels=mine)
        async def retire_space(name: str, namespace: str | None, body: kopf.Body, **_: Any) -> None:
            await self.retire_space(name, namespace or self.opts.namespace, body)

        if self.opts.release and self.opts.claim_unlabelled:

            @kopf.on.event(
                API_GROUP,
                API_VERSION,
                PLURAL,
                id="claim",
                registry=registry,
                labels={LABEL_RELEASE: kopf.ABSENT},
            )
            async def claim_space(
                name: str, namespace: str | None, body: kopf.Body, type: str | None, **_: Any
            ) -> None:
                if type != "DELETED" and not deleting(body):
                    await self.claim_space(name, namespace or self.opts.namespace, body)

        @kopf.on.cleanup(registry=registry)
        async def close(**_: Any) -> None:
            # Before kopf waits for leftover tasks: a scraper's keep-alive connection would
            # otherwise hold the exit up for kopf's 5 s.
            await self.close_metrics()
            await self.health.stop()
            await self.api.close()
            await self.sidecars.close()

        return registry

    async def claim_space(self, name: str, namespace: str, body: kopf.Body) -> None:
        """Label an unlabelled space with our release, so that this operator reconciles it (its
        daemon starts on the labelled object's watch event) and no other release's does."""
        version = (body.get("metadata") or {}).get("resourceVersion")
        patch: dict[str, Any] = {"metadata": {"labels": {LABEL_RELEASE: self.opts.release}}}
        if isinstance(version, str) and version:
            patch["metadata"]["resourceVersion"] = version
        try:
            await self.api.request(
                "PATCH",
                f"{spaces_path(namespace)}/{name}",
                body=patch,
                content_type=MERGE_PATCH,
            )
        except KubeApiError as err:
            # 409: changed since this event (perhaps another release claimed it; the next event
            # says). 404: deleted meanwhile. Either way the watch brings the next word.
            if not (err.conflict or err.not_found):
                log.warning(
                    "space %s: cannot claim it for release %s: %s", name, self.opts.release, err
                )
            return
        log.info(
            "space %s: claimed for release %s (it had no %s label)",
            name,
            self.opts.release,
            LABEL_RELEASE,
        )

    async def run_space(
        self, name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped
    ) -> None:
        """The daemon of one space: a tick per node refresh until kopf stops it."""
        self.bodies[name] = body
        try:
            await self._run_space(name, namespace, body, stopped)
        finally:
            self.bodies.pop(name, None)

    async def _run_space(
        self, name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped
    ) -> None:
        try:
            space = validate_space_id(name)
        except ValueError as err:  # contract's InvalidSpaceId is a ValueError
            log.warning("MemorySpace %s/%s ignored: %s", namespace, name, err)
            await stopped.wait()
            return
        driver = SpaceDriver(
            namespace=namespace,
            name=space,
            api=self.api,
            sidecars=self.sidecars,
            nodes=self.nodes,
            metrics=self.metrics,
        )
        driver.adopt(body)
        self.nodes.attach(SpaceId(space), driver.state.placement)
        self.metrics.active_spaces.inc()
        placed = driver.state.placement
        log.info("space %s: reconciling (%s)", space, describe(placed) if placed else "not placed")

        def inputs() -> Inputs:
            return Inputs(
                version=(body.get("metadata") or {}).get("resourceVersion"),
                nodes=self.nodes.marks(),
                views=space_views(self.nodes.status, space),
            )

        slot = self.ticker.add(space, inputs)

        async def wake_on_stop() -> None:
            await stopped.wait()
            slot.event.set()

        stopping = asyncio.create_task(wake_on_stop())
        try:
            legacy = bool(self.opts.release)  # the finalizer before releases: drop it once
            while not stopped and not deleting(body):
                # Woken by the ticker right after a node refresh (the first tick never decides
                # on an empty view), only when the tick is due; or, should the node monitor
                # stall, after twice IDLE_EVERY anyway (the tick then holds the space on a stale
                # view). Not sooner: the ticker itself wakes a steady space every IDLE_EVERY.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.event.wait(), 2 * IDLE_EVERY)
                slot.event.clear()
                if stopped or deleting(body):
                    break  # deleted: the retire handler takes it from here
                if legacy:
                    legacy = await self.drop_legacy_finalizer(name, namespace, body)
                woken = slot.woken_inputs if slot.busy else None
                at = slot.woken_at if woken is not None else time.monotonic()
                read_at_wake = self.nodes.store.last_read_ok_at
                # Bounded: at start every space has writes to make at once, and requests queued
                # behind hundreds of others would run out their timeouts before being sent.
                async with self.tick_slots:
                    if waited_too_long(
                        woke_at=at,
                        read_at_wake=read_at_wake,
                        read_now=self.nodes.store.last_read_ok_at,
                        now=time.monotonic(),
                        stale=DEFAULT_TIMING.store_stale_after,
                    ):
                        self.metrics.ticks.labels("late").inc()
                        slot.done(None)  # still due: it runs after the next refresh
                        continue
                    try:
                        await driver.tick(body)
                    except Exception:  # one bad tick must not end the daemon (no crash loop)
                        self.metrics.reconcile_errors.inc()
                        log.exception("space %s: tick failed", space)
                self.metrics.ticks.labels("run").inc()
                seen = woken if woken is not None else inputs()
                slot.done(LastTick(inputs=seen, at=at, steady=driver.settled))
        finally:
            stopping.cancel()
            self.ticker.remove(space, slot)
            self.metrics.active_spaces.dec()
            await self.nodes.detach(space)
            log.info("space %s: stopped reconciling (%s)", space, stopped.reason or "cancelled")

    async def drop_legacy_finalizer(self, name: str, namespace: str, body: kopf.Body) -> bool:
        """A space from before `--release` carries LEGACY_FINALIZER, which no handler of this
        operator removes any more: once kopf has put ours on, take the old one off (guarded by
        the resourceVersion), so deleting the space is not held forever. Returns whether to try
        again (next tick)."""
        meta = body.get("metadata") or {}
        held = list(meta.get("finalizers") or [])
        if LEGACY_FINALIZER not in held:
            return False
        if self.settings.persistence.finalizer not in held:
            return True  # kopf adds ours on its own schedule: wait for it
        patch = {
            "metadata": {
                "finalizers": [f for f in held if f != LEGACY_FINALIZER],
                "resourceVersion": meta.get("resourceVersion"),
            }
        }
        try:
            await self.api.request(
                "PATCH", f"{spaces_path(namespace)}/{name}", body=patch, content_type=MERGE_PATCH
            )
        except KubeApiError as err:
            if err.not_found:
                return False
            if not err.conflict:
                log.warning("space %s: cannot drop finalizer %s: %s", name, LEGACY_FINALIZER, err)
            return True
        log.info("space %s: dropped the old finalizer %s", name, LEGACY_FINALIZER)
        return False

    async def retire_space(self, name: str, namespace: str, body: kopf.Body) -> None:
        """The finalizer's work (kube/retire.py): retire the space on every node, then let
        kopf remove the finalizer. Raises kopf.TemporaryError while a live node can't be
        reached: kopf retries, and the object stays until it is done."""
        try:
            space = validate_space_id(name)
        except ValueError:
            return  # never reconciled: nothing on any node
        status = body.get("status") or {}
        placement = placement_from_status(status)
        policy = deletion_policy(body.get("spec") or {})
        uid = (body.get("metadata") or {}).get("uid")
        incarnation = uid if isinstance(uid, str) and valid_incarnation(uid) else None
        ref = ObjectRef(
            kind=KIND,
            api_version=f"{API_GROUP}/{API_VERSION}",
            namespace=namespace,
            name=name,
            uid=uid if isinstance(uid, str) else None,
        )
        try:
            records, alive = await self.nodes.read_nodes()
        except KubeApiError as err:
            raise kopf.TemporaryError(f"cannot read the node Leases: {err}", delay=2) from err
        outcome = await retire_everywhere(
            sidecars=self.sidecars,
            space=space,
            incarnation=incarnation,
            policy=policy,
            records=records,
            alive=alive,
            primary=placement.primary if placement else None,
            members=placement.members if placement else (),
        )
        sentence = outcome.sentence(space, policy)
        if not outcome.done:
            log.warning("%s", sentence)
            self.metrics.reconcile_errors.inc()
            with contextlib.suppress(KubeApiError):
                await self.api.post_event(
                    ref, type_="Warning", reason="RetireBlocked", message=sentence
                )
            raise kopf.TemporaryError(sentence, delay=2)
        log.info("%s", sentence)
        with contextlib.suppress(KubeApiError):
            await self.api.post_event(ref, type_="Normal", reason="Retired", message=sentence)


def spaces_path(namespace: str) -> str:
    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"


def deleting(body: kopf.Body) -> bool:
    """Is the object marked for deletion (the retire handler's turn)?"""
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


async def run(opts: OperatorOptions) -> int:
    """Run the operator until SIGINT/SIGTERM (kopf handles the signals)."""
    kopf_settings = settings(opts)
    op = Operator(opts, kopf_settings)
    if opts.metrics_port:
        op.metrics_runner = await serve(
            op.metrics,
            host=opts.metrics_host,
            port=opts.metrics_port,
            alive=op.health.alive,
            ready=op.health.ready,
        )
    op.health.start()
    frozen = tune_collector()
    log.debug("operator: %d startup objects frozen out of garbage collection", frozen)
    peering = None if opts.standalone or not opts.peering else opts.peering
    if peering is None and not opts.standalone:
        log.warning("no --peering: running standalone; run a single replica of this operator")
    log.info(
        "operator %s: namespace %s, peering %s (priority %d)",
        op.identity,
        opts.namespace,
        peering or "off",
        kopf_settings.peering.priority,
    )
    try:
        await kopf.operator(
            registry=op.registry(),
            settings=kopf_settings,
            namespaces=[opts.namespace],
            clusterwide=False,
            standalone=peering is None,
            peering_name=peering,
            priority=kopf_settings.peering.priority,
            identity=cast("Any", op.identity),  # kopf's Identity is a NewType of str
        )
    finally:
        await op.close_metrics()
    return 0


def main(opts: OperatorOptions) -> int:
    logging.basicConfig(
        level=opts.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(run(opts))
    except (OSError, ValueError, kopf.LoginError) as err:
        log.error("engram-replication operator: %s", err)
        return 1
