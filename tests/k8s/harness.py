"""The product against the real API server: the chart's release, sidecars and operators as local
processes, each authenticated as the chart's ServiceAccount for its part.

`Release.install` helm-installs deploy/helm/engram-replication into a test's namespace (the
Deployment and StatefulSet are stored, and with kube-controller-manager get Pods, which never run:
there is no kubelet), then mints a token for each of the chart's ServiceAccounts through the
TokenRequest API. The node sidecars are `tests.integration.cluster` nodes with their Kubernetes
tasks on (`--kube-api-url`, `--kube-token-file`, `--kube-ca-file`), so every Lease renewal and
status patch goes through the real authenticator, authorizer (RBAC) and admission. `Operator`
runs `engram-replication operator` with a kubeconfig holding the operator ServiceAccount's token.

Every wait is bounded (`until`), and `Release.close` stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.cluster import Cluster, _die_with_parent, free_port
from tests.k8s.apiserver import ControlPlane, ServiceAccount

ROOT: Final = Path(__file__).resolve().parents[2]
CHART: Final = ROOT / "deploy" / "helm" / "engram-replication"
RELEASE: Final = "engram-replication"
OPERATOR_SA: Final = f"{RELEASE}-operator"
NODE_SA: Final = f"{RELEASE}-node"
PEERING: Final = RELEASE  # the chart's KopfPeering: the release's full name
GROUP, VERSION, PLURAL = "engram.io", "v1alpha1", "memoryspaces"
ACTIVE: Final = "engram_replication_operator_active_spaces"
T = TypeVar("T")


@overload
async def until(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = ...) -> T: ...


@overload
async def until(check: Callable[[], T | None], what: str, timeout: float = ...) -> T: ...


async def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll `check` (sync or async) every 0.1 s until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            got = check()
            if isinstance(got, Awaitable):
                got = await got
            if got:
                return got
        except (OSError, AssertionError) as err:  # KubeError is an AssertionError
            last = err
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"not within {timeout} s: {what}" + (f" (last error: {last})" if last else "")
            )
        await asyncio.sleep(0.1)


class Operator:
    """One `engram-replication operator` process, as the chart's operator ServiceAccount."""

    def __init__(self, release: Release, name: str, *args: str) -> None:
        self.release = release
        self.name = name
        self.log_path = release.root / f"{name}.log"
        self.metrics_port = free_port()
        self.args = [
            "--kubeconfig",
            str(release.operator_sa.kubeconfig),
            "--namespace",
            release.namespace,
            "--token-file",
            str(release.cluster.secret_file),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-host",
            "127.0.0.1",
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGRAM_", "KUBE"))}
        env["PYTHONUNBUFFERED"] = "1"
        env["POD_NAME"] = self.name  # its identity in the peering object
        cmd = [sys.executable, "-m", "engram_operator.cli", "operator", *self.args]
        with self.log_path.open("ab") as log:
            log.write(f"==== {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2.0) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    def metric(self, name: str, default: float = -1.0) -> float:
        """`default` when the process doesn't answer (not up yet, or gone)."""
        try:
            return self.metrics().get(name, default)
        except OSError:
            return default


@dataclass
class Release:
    cp: ControlPlane
    namespace: str
    root: Path
    operator_sa: ServiceAccount
    node_sa: ServiceAccount
    cluster: Cluster
    operators: list[Operator] = field(default_factory=list)
    errors_expected: bool = False  # the test provokes tracebacks (e.g. refused API requests)
    name: str = RELEASE

    @classmethod
    def install(
        cls,
        cp: ControlPlane,
        namespace: str,
        root: Path,
        *,
        values: Mapping[str, str] | None = None,
        name: str = RELEASE,
    ) -> Release:
        """`name`: the release's name; one not holding the chart's name gets objects named
        `<name>-engram-replication-...` (the chart's fullname rule)."""
        sets = [a for k, v in (values or {}).items() for a in ("--set", f"{k}={v}")]
        cp.helm("install", name, str(CHART), "--namespace", namespace, *sets)
        full = name if RELEASE in name else f"{name}-{RELEASE}"
        return cls(
            cp=cp,
            namespace=namespace,
            root=root,
            operator_sa=cp.service_account(namespace, f"{full}-operator", root),
            node_sa=cp.service_account(namespace, f"{full}-node", root),
            cluster=Cluster(root),
            name=name,
        )

    # ---- processes -------------------------------------------------------------------------------

    def kube_flags(self) -> dict[str, str]:
        """The sidecar settings of a node pod's Kubernetes tasks, as the node ServiceAccount."""
        return {
            "kube_enabled": "true",
            "kube_api_url": self.cp.url,
            "kube_namespace": self.namespace,
            "kube_token_file": str(self.node_sa.token_file),
            "kube_ca_file": str(self.cp.ca),
            "status_report_interval": "0.5",
            # A catch-up is recorded (and its ReplicaCaughtUp Event posted) only for a gap of more
            # than one batch; these tests' gaps are a few hundred entries, so batches of 100 (the
            # default before it became 1000) keep their catch-ups visible.
            "batch_max_entries": "100",
        }

    async def start_nodes(self, count: int = 3, *, zones: Sequence[str] | None = None) -> list[str]:
        """`count` sidecars, n0, n1, .... With `zones`, node i runs on a Kubernetes Node of its
        own (created here, as a kubelet would register it) labelled with zone `zones[i]`, and
        the sidecar gets its name as the chart gives it (`kube_node_name`, from spec.nodeName)."""
        if zones is None:
            nodes = await self.cluster.start_nodes(count, **self.kube_flags())
            return [n.name for n in nodes]
        names = []
        for i in range(count):
            k8s_node = self.kube_node(f"n{i}", zones[i])
            self.cluster.add_node(f"n{i}", **self.kube_flags(), kube_node_name=k8s_node)
            names.append(f"n{i}")
        await self.cluster.start(*names)
        return names

    def kube_node(self, node: str, zone: str) -> str:
        """A Kubernetes Node for sidecar `node` in `zone` (cluster-scoped: named after the
        namespace, so tests don't share one)."""
        name = f"{self.namespace}-{node}"
        self.cp.rest().create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"topology.kubernetes.io/zone": zone, "engram.io/rack": "r1"},
                },
            },
        )
        return name

    def leases(self) -> list[dict[str, Any]]:
        doc = self.cp.rest().get(
            f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases",
            labelSelector="engram.io/node-lease=true",
        )
        return list(doc.get("items", []))

    def operator(self, name: str, *args: str) -> Operator:
        op = Operator(self, name, *args).start()
        self.operators.append(op)
        return op

    async def close(self) -> list[int | None]:
        # A test that took permissions away may leave kopf unable to shut down cleanly.
        grace = 3.0 if self.errors_expected else 10.0
        codes = [op.stop(grace) for op in self.operators]
        await self.cluster.close()
        return codes

    def kill_all(self) -> None:
        for op in self.operators:
            op.kill()
        self.cluster.kill_all()

    def logs(self) -> str:
        parts = [
            f"----- {op.name} -----\n" + "\n".join(op.log_text().splitlines()[-40:])
            for op in self.operators
        ]
        return "\n".join(parts) + "\n" + self.cluster.log_tails()

    # ---- objects ---------------------------------------------------------------------------------

    def spaces_path(self, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"
        return base if name is None else f"{base}/{name}"

    def apply_space(
        self,
        name: str,
        spec: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
        finalizers: Sequence[str] = (),
    ) -> None:
        """As a user would: kubectl apply, as the admin."""
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if labels:
            meta["labels"] = dict(labels)
        if finalizers:
            meta["finalizers"] = list(finalizers)
        doc = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MemorySpace",
            "metadata": meta,
            "spec": dict(spec),
        }
        self.cp.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))

    def space(self, name: str) -> dict[str, Any]:
        return self.cp.rest().get_or_none(self.spaces_path(name)) or {}

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.space(name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return {}

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        doc = self.cp.rest().get(
            f"/api/v1/namespaces/{self.namespace}/events",
            fieldSelector=f"involvedObject.name={name}",
        )
        items = [dict(e) for e in doc.get("items", [])]
        return [e for e in items if reason is None or e.get("reason") == reason]

    async def healthy(self, name: str, ready: str = "3/3", timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") == "Healthy" and st.get("ready") == ready else None

        return await until(check, f"space {name} Healthy with {ready} ready", timeout)

    def audit(self, users: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The audit events of `users` (default: this release's two ServiceAccounts, whose
        user names hold the namespace, so no other test's requests are among them)."""
        wanted = set(users or (self.operator_sa.username, self.node_sa.username))
        return [ev for ev in self.cp.audit() if ev.get("user", {}).get("username") in wanted]
