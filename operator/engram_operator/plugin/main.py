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
        if cmd == "promote":
            sp = await self.space(args.space)
            await self.patch_space(args.space, intents.promote_patch(sp, args.node))
            return (
                f"space {args.space}: targetPrimary set to {args.node}; the operator switches "
                f"over once it has caught up (watch `kubectl engram status {args.space}`)"
            )
        if cmd == "switchover":
            sp = await self.space(args.space)
            node, why = intents.switchover_target(sp, intents.node_flags(await self.leases()))
            await self.patch_space(args.space, intents.promote_patch(sp, node))
            return (
                f"space {args.space}: switching over to {node} ({why}); "
                f"watch `kubectl engram status {args.space}`"
            )
        if cmd in ("pause", "resume"):
            await self.space(args.space)
            await self.patch_space(args.space, intents.pause_patch(cmd == "pause"))
            return f"space {args.space}: {'paused' if cmd == 'pause' else 'resumed'}"
        if cmd == "fence":
            try:
                await self.api.request(
                    "PATCH",
                    self._leases_path(lease_name(args.node)),
                    body=intents.fence_patch(not args.off),
                    content_type=MERGE_PATCH,
                    timeout=TIMEOUT,
                )
            except KubeApiError as err:
                if err.not_found:
                    raise intents.IntentError(
                        f"no node {args.node} in namespace {self.namespace} (no Lease "
                        f"{lease_name(args.node)})"
                    ) from err
                raise
            if args.off:
                return f"node {args.node}: fence removed; it may lead spaces again"
            return (
                f"node {args.node}: fenced; the operator switches its spaces to other nodes "
                f"and never makes it primary until `kubectl engram fence --off {args.node}`"
            )
        raise AssertionError(cmd)


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
