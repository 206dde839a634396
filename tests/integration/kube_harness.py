"""A Kubernetes API and operator processes for the operator's integration tests.

`Kube` runs kmock's `KubernetesEmulator` over real HTTP on 127.0.0.1 in the test's event loop,
with the MemorySpace resource registered from deploy/crds/ (kmock serves discovery from what is
registered, and kopf only watches what discovery lists), plus Leases, Events and KopfPeerings. The
test talks to it like kubectl (HTTP create and merge-patch, so watch events fire) and reads its
objects directly for assertions. kmock applies no schema: CRD defaults don't exist there, which
the operator must survive anyway.

`NodeLeases` does what each node's sidecar does on Kubernetes: create the Lease
`engram-node-<node>` with the node's addresses and renew it every 0.5 s. A test stops renewing to
fake a node whose API access (or life) ended.

`OperatorProcess` runs `python -m engram_operator.cli operator` against the emulator through a
generated kubeconfig, logging to `<tmp>/<name>.log`. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import aiohttp
import kmock
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.cluster import Cluster, IntegrationError

from engram_contract.launcher import die_with_parent, free_port

ROOT: Final = Path(__file__).resolve().parents[2]
CRD_PATH: Final = ROOT / "deploy" / "crds" / "memoryspaces.engram.io.yaml"
NAMESPACE: Final = "engram"
GROUP, VERSION, PLURAL = "engram.io", "v1alpha1", "memoryspaces"
SPACES: Final = f"{GROUP}/{VERSION}/{PLURAL}"
VERBS: Final = {"get", "list", "watch", "create", "patch", "update", "delete"}
LEASE_RENEW: Final = 0.5
T = TypeVar("T")


def register_resources(emulator: kmock.KubernetesEmulator) -> None:
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()  # built-ins: leases, events, CRDs, namespaces, ...
    names: dict[str, Any] = {"kind": "MemorySpace", "singular": "memoryspace", "shortNames": []}
    if CRD_PATH.exists():
        crd = yaml.safe_load(CRD_PATH.read_text())
        names = crd["spec"]["names"]
    emulator.resources[SPACES] = kmock.ResourceInfo(
        namespaced=True,
        kind=names["kind"],
        singular=names.get("singular", "memoryspace"),
        shortnames=names.get("shortNames", []),
        categories=names.get("categories", []),
        verbs=VERBS,
        subresources={"status"},
    )
    emulator.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(
        namespaced=True, kind="KopfPeering", singular="kopfpeering", verbs=VERBS
    )


class Kube:
    """The emulated API server, and what a test does with it."""

    def __init__(self, emulator: kmock.KubernetesEmulator, url: str, root: Path) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.root = root
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))

    async def close(self) -> None:
        await self.session.close()

    def kubeconfig(self) -> Path:
        path = self.root / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {}}],
                    "contexts": [
                        {
                            "name": "kmock",
                            "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE},
                        }
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path

    # ---- HTTP, like kubectl ------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(
            method,
            self.url + path,
            data=json.dumps(body) if body is not None else None,
            headers=headers,
        ) as r:
            text = await r.text()
            if r.status >= 400:
                raise IntegrationError(f"{method} {path}: HTTP {r.status}: {text[:500]}")
            return json.loads(text) if text else None

    def _spaces_path(self, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
        return base if name is None else f"{base}/{name}"

    async def create_space(
        self, name: str, spec: Mapping[str, Any], *, uid: str | None = None
    ) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MemorySpace",
            # kmock keeps neither uids, generations nor resource versions: set them once, as an
            # API server would (kopf tests the resourceVersion in its own JSON patches).
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "uid": uid or f"uid-{name}",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": dict(spec),
        }
        await self.call("POST", self._spaces_path(), body)

    async def delete_space(self, name: str) -> None:
        """`kubectl delete msp NAME --wait=false`: marked for deletion while finalizers remain."""
        await self.call("DELETE", self._spaces_path(name))

    async def patch_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        """`kubectl patch --type merge` of the spec. The generation and the resourceVersion move
        on, as an API server moves them: the operator skips the ticks of a steady space whose
        resourceVersion is unchanged (kube/cadence.py), so a spec change that kept it would go
        unseen for up to IDLE_EVERY (kmock moves neither)."""
        meta = self.space(name).get("metadata", {})
        generation = int(meta.get("generation", 1)) + 1
        version = str(int(meta.get("resourceVersion", 1)) + 1)
        await self.call(
            "PATCH",
            self._spaces_path(name),
            {"metadata": {"generation": generation, "resourceVersion": version}, "spec": spec},
        )

    async def create_peering(self, name: str) -> None:
        body = {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": name, "namespace": NAMESPACE, "resourceVersion": "1"},
            "status": {},
        }
        await self.call("POST", f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings", body)

    # ---- reading objects (in-process) ---------------------------------------------------------

    def space(self, name: str) -> dict[str, Any]:
        key = (kmock.resource(SPACES), NAMESPACE, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return {}
        return dict(self.emulator.objects[key].raw)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.space(name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return {}

    def events(self, name: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        out = []
        for (res, _ns, _n), obj in self.emulator.objects.items():
            if res != kmock.resource("v1/events") or obj.deleted:
                continue
            ev = dict(obj.raw)
            if name is not None and ev.get("involvedObject", {}).get("name") != name:
                continue
            if reason is not None and ev.get("reason") != reason:
                continue
            out.append(ev)
        return out

    def status_patches(self) -> list[Any]:
        """Every PATCH of a MemorySpace status subresource the emulator served, in order."""
        return [
            r
            for r in self.emulator  # a kmock handler iterates over the requests it served
            if r.method == "PATCH" and str(r.url.path).endswith("/status") and PLURAL in r.url.path
        ]


@overload
async def wait_for(check: Callable[[], Awaitable[T | None]], *, timeout: float, what: str) -> T: ...


@overload
async def wait_for(check: Callable[[], T | None], *, timeout: float, what: str) -> T: ...


async def wait_for(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll `check` (sync or async) every 50 ms until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        got = check()
        if isinstance(got, Awaitable):
            try:
                got = await got
            except (aiohttp.ClientError, TimeoutError, IntegrationError) as err:
                last, got = err, None
        if got:
            return got
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            raise IntegrationError(f"timed out after {timeout} s waiting for {what}{detail}")
        await asyncio.sleep(0.05)


class NodeLeases:
    """Creates and renews `engram-node-<node>` Leases the way a node sidecar does."""

    def __init__(self, kube: Kube, cluster: Cluster) -> None:
        self.kube = kube
        self.cluster = cluster
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _path(self, node: str | None = None) -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
        return base if node is None else f"{base}/engram-node-{node}"

    @staticmethod
    def _now() -> str:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    async def start(self, *nodes: str) -> None:
        for name in nodes or tuple(self.cluster.nodes):
            node = self.cluster[name]
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": f"engram-node-{name}",
                    "namespace": NAMESPACE,
                    "labels": {"engram.io/node-lease": "true"},
                    "annotations": {
                        "engram.io/http-address": node.http,
                        "engram.io/replication-address": node.address,
                    },
                },
                "spec": {
                    "holderIdentity": name,
                    "leaseDurationSeconds": 2,
                    "renewTime": self._now(),
                },
            }
            with contextlib.suppress(IntegrationError):  # exists already: renew it
                await self.kube.call("POST", self._path(), body)
            self.stop(name)
            self._tasks[name] = asyncio.create_task(self._renew(name))

    async def _renew(self, name: str) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW)
            with contextlib.suppress(IntegrationError, aiohttp.ClientError, TimeoutError):
                await self.kube.call(
                    "PATCH", self._path(name), {"spec": {"renewTime": self._now()}}
                )

    def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


class OperatorProcess:
    """One `engram-replication operator` process against the emulator."""

    def __init__(self, kube: Kube, root: Path, name: str, token_file: Path, *args: str) -> None:
        self.kube = kube
        self.name = name
        self.log_path = root / f"{name}.log"
        self.metrics_port = free_port()
        self.args = [
            "--kubeconfig",
            str(kube.kubeconfig()),
            "--namespace",
            NAMESPACE,
            "--token-file",
            str(token_file),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-host",
            "127.0.0.1",
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGRAM_", "KUBECONFIG"))}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "engram_operator.cli", "operator", *self.args]
        with self.log_path.open("ab") as log:
            log.write(f"==== start #{self.starts}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    async def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def metrics(self) -> dict[str, float]:
        """Samples of the operator's /metrics: 'name{k="v",...}' -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        async with self.kube.session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as r:
            text = await r.text()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    async def metric(self, name: str, default: float = 0.0) -> float:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            return (await self.metrics()).get(name, default)
        return default


def tails(operators: Iterable[OperatorProcess]) -> str:
    parts = []
    for op in operators:
        parts.append(f"----- operator {op.name} ({op.log_path}) -----")
        parts.append(op.log_tail())
    return "\n".join(parts)
