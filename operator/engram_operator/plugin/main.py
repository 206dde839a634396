"""`kubectl engram …` (console script `kubectl-engram`): status, promote, switchover, pause,
resume, fence. kubectl finds any `kubectl-<name>` executable on PATH and runs it as
`kubectl <name>`; kubectl's own flags don't reach a plugin, so it takes `--kubeconfig` and
`-n/--namespace` itself (default: $KUBECONFIG or ~/.kube/config, and its context's namespace).

Credentials and calls go through the operator's own client (`kube.api`), so the plugin reads and
writes exactly as the user that kubeconfig names: RBAC applies, and the API server's validation
(the CRD's rules) answers every write.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kopf

from engram_contract.kubernetes import (
    API_GROUP,
    API_VERSION,
    LABEL_NODE_LEASE,
    PLURAL,
    lease_name,
)
from engram_operator.kube.api import MERGE_PATCH, KubeApi, KubeApiError, connection_info
from engram_operator.plugin import intents, view

TIMEOUT = 10.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubectl engram",
        description="Inspect and steer engram-replication memory spaces (docs/kubectl-plugin.md).",
    )
    p.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's")
    p.add_argument("--kubeconfig", type=Path, default=None, help="default: $KUBECONFIG")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="spaces (or one space) and nodes: primary, epoch, lag")
    st.add_argument("space", nargs="?")
    st.add_argument("-o", "--output", choices=("text", "json"), default="text")
    pr = sub.add_parser("promote", help="make NODE the primary of SPACE (spec.targetPrimary)")
    pr.add_argument("space")
    pr.add_argument("node")
    sw = sub.add_parser(
        "switchover", help="switch SPACE over to its most caught-up healthy replica"
    )
    sw.add_argument("space")
    for cmd in (pr, sw):
        cmd.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="seconds to wait for the new primary (default 60; 0: don't wait)",
        )
        cmd.add_argument(
            "--keep-target",
            action="store_true",
            help="leave spec.targetPrimary set afterwards (standing intent, docs/crd.md)",
        )
    for name, text in (("pause", "stop reconciling SPACE"), ("resume", "reconcile SPACE again")):
        sub.add_parser(name, help=f"{text} (spec.paused)").add_argument("space")
    fe = sub.add_parser(
        "fence", help="switch every space away from NODE and never let it lead (--off: undo)"
    )
    fe.add_argument("node")
    fe.add_argument("--off", action="store_true", help="remove the fence")
    return p


class Plugin:
    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def _spaces_path(self, name: str | None = None) -> str:
        base = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{self.namespace}/{PLURAL}"
        return base if name is None else f"{base}/{name}"

    def _leases_path(self, name: str | None = None) -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
        return base if name is None else f"{base}/{name}"

    async def spaces(self) -> list[dict[str, Any]]:
        doc = await self.api.request("GET", self._spaces_path(), timeout=TIMEOUT)
        return list((doc or {}).get("items") or [])

    async def space(self, name: str) -> dict[str, Any]:
        try:
            doc = await self.api.request("GET", self._spaces_path(name), timeout=TIMEOUT)
        except KubeApiError as err:
            if err.not_found:
                raise intents.IntentError(
                    f"no MemorySpace {name} in namespace {self.namespace}"
                ) from err
            raise
        return dict(doc)

    async def leases(self) -> list[dict[str, Any]]:
        return await self.api.list_leases(
            self.namespace, f"{LABEL_NODE_LEASE}=true", timeout=TIMEOUT
        )

    async def patch_space(self, name: str, patch: dict[str, Any]) -> None:
        await self.api.request(
            "PATCH", self._spaces_path(name), body=patch, content_type=MERGE_PATCH, timeout=TIMEOUT
        )

    async def run(self, args: argparse.Namespace) -> str:
        cmd = args.command
        now = datetime.datetime.now(datetime.UTC)
        if cmd == "status":
            leases = await self.leases()
            if args.space:
                sp = await self.space(args.space)
                if args.output == "json":
                    return json.dumps({"space": sp, "leases": leases}, indent=2)
                return view.detail(sp, leases, now)
            spaces = await self.spaces()
            if args.output == "json":
                return json.dumps({"spaces": spaces, "leases": leases}, indent=2)
            return view.overview(self.namespace, spaces, leases, now)
        if cmd in ("promote", "switchover"):
            sp = await self.space(args.space)
            if cmd == "promote":
                node, why = args.node, "as asked"
            else:
                node, why = intents.switchover_target(sp, intents.node_flags(await self.leases()))
            await self.patch_space(args.space, intents.promote_patch(sp, node))
            head = f"space {args.space}: switching over to {node} ({why})"
            if args.timeout <= 0:
                return f"{head}; spec.targetPrimary stays {node} (watch `kubectl engram status`)"
            return head + "\n" + await self.await_primary(args.space, node, args)
        if cmd == "fence" and not args.off:
            await self.fence_lease(args.node, on=True)
            cleared = []
            for sp in await self.spaces():
                if (sp.get("spec") or {}).get("targetPrimary") == args.node:
                    name = str((sp.get("metadata") or {}).get("name"))
                    await self.patch_space(name, intents.clear_target_patch())
                    cleared.append(name)
            note = (
                f"; removed spec.targetPrimary (it named {args.node}) from {', '.join(cleared)}"
                if cleared
                else ""
            )
            return (
                f"node {args.node}: fenced; the operator switches its spaces to other nodes "
                f"and never makes it primary until `kubectl engram fence --off {args.node}`" + note
            )
        if cmd in ("pause", "resume"):
            await self.space(args.space)
            await self.patch_space(args.space, intents.pause_patch(cmd == "pause"))
            return f"space {args.space}: {'paused' if cmd == 'pause' else 'resumed'}"
        if cmd == "fence":
            await self.fence_lease(args.node, on=False)
            return f"node {args.node}: fence removed; it may lead spaces again"
        raise AssertionError(cmd)

    async def fence_lease(self, node: str, *, on: bool) -> None:
        try:
            await self.api.request(
                "PATCH",
                self._leases_path(lease_name(node)),
                body=intents.fence_patch(on),
                content_type=MERGE_PATCH,
                timeout=TIMEOUT,
            )
        except KubeApiError as err:
            if err.not_found:
                raise intents.IntentError(
                    f"no node {node} in namespace {self.namespace} (no Lease {lease_name(node)})"
                ) from err
            raise

    async def await_primary(self, space: str, node: str, args: argparse.Namespace) -> str:
        """Until `node` leads `space` (then, unless --keep-target, remove spec.targetPrimary:
        a standing target would hold the space there through later drains), or the operator
        aborts the switchover, or the timeout. The operator decides; this only watches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while True:
            sp = await self.space(space)
            st = sp.get("status") or {}
            if st.get("primary") == node and st.get("phase") != "SwitchingOver":
                if not args.keep_target:
                    await self.patch_space(space, intents.clear_target_patch())
                return f"{node} leads space {space} at epoch {st.get('epoch')}"
            sw = st.get("switchover") or {}
            if sw.get("state") == "Aborted" and sw.get("target") == node:
                raise intents.IntentError(
                    f"the operator aborted the switchover to {node}: {sw.get('reason', '?')} "
                    f"(spec.targetPrimary still names {node}: it will try again)"
                )
            if loop.time() >= deadline:
                raise intents.IntentError(
                    f"{node} doesn't lead space {space} after {args.timeout:g} s (phase "
                    f"{st.get('phase')}, {sw.get('reason') or st.get('message') or 'no reason'});"
                    f" spec.targetPrimary stays {node}: the operator keeps trying"
                )
            await asyncio.sleep(0.5)


async def _main(args: argparse.Namespace) -> int:
    settings = kopf.OperatorSettings()
    try:
        info = connection_info(settings=settings, kubeconfig=args.kubeconfig, api_url=None)
    except kopf.LoginError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    namespace = args.namespace or info.default_namespace or "default"
    api = KubeApi(lambda: info, user_agent="kubectl-engram")
    try:
        print(await Plugin(api, namespace).run(args))
    except intents.IntentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KubeApiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
