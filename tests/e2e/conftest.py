"""A kind cluster with the chart installed, for the e2e tests (`make e2e`).

Needs a working Docker engine (`docker info`, not only the client), `kind`, `helm` and `kubectl`;
without any of them every e2e test is skipped and the reason names what is missing. Nothing here
downloads tools.

Session fixtures, in order: `kind_cluster` creates the cluster (or reuses the one named by
E2E_KIND_CLUSTER), `image` builds the repository's Dockerfile and loads the image into kind,
`release` installs deploy/helm/engram-replication into NAMESPACE. At the end the release and the
cluster are deleted, unless E2E_KEEP=1 (then the commands to inspect it are printed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "engram-replication"
NAMESPACE = "engram-system"  # the namespace deploy/examples/ use
RELEASE = "engram-replication"
IMAGE = "engram-replication:e2e"
NODES = 3


def _missing() -> str | None:
    """Why e2e can't run here, or None."""
    absent = [t for t in ("docker", "kind", "helm", "kubectl") if shutil.which(t) is None]
    if absent:
        return f"e2e needs {', '.join(absent)} on PATH (not installed)"
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "e2e needs a Docker engine: `docker info` timed out"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"e2e needs a running Docker engine: `docker info` failed ({first})"
    return None


def run(
    *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"`{' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class Kube:
    """kubectl and helm against one cluster (its own kubeconfig file)."""

    kubeconfig: Path
    forwards: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return run(
            "kubectl", "-n", NAMESPACE, *args, timeout=timeout, check=check, env=self.env
        ).stdout

    def helm(self, *args: str, timeout: float = 600) -> str:
        return run("helm", "-n", NAMESPACE, *args, timeout=timeout, env=self.env).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def space(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.json("memoryspace", name)
        return doc

    def wait_for(self, what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                got = check()
            except (AssertionError, OSError, ValueError, KeyError) as err:
                got, last = None, err
            if got:
                return got
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")

    def port_forward(self, pod: str, port: int = 8080) -> str:
        """Forward a free local port to `pod`:`port`; returns 'http://127.0.0.1:N'."""
        proc = subprocess.Popen(
            ["kubectl", "-n", NAMESPACE, "port-forward", f"pod/{pod}", f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        self.forwards.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            if m:
                return f"http://127.0.0.1:{m.group(1)}"
            if not line and proc.poll() is not None:
                break
        raise AssertionError(f"port-forward to {pod} did not start")

    def close_forwards(self) -> None:
        for p in self.forwards:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.forwards.clear()


def http(method: str, url: str, body: Any = None, timeout: float = 2.0) -> tuple[int, Any]:
    """One HTTP request; (status, parsed JSON or text). Status 0 when there was no answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    except (OSError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="session")
def kind_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    name = os.environ.get("E2E_KIND_CLUSTER", "engram-e2e")
    existing = run("kind", "get", "clusters", check=False).stdout.split()
    created = name not in existing
    if created:
        # The CRD needs Kubernetes 1.30+ (CEL rules with reason/fieldPath): kind's default
        # node image is newer. Point E2E_KIND_IMAGE at another kindest/node to choose.
        extra = ["--image", os.environ["E2E_KIND_IMAGE"]] if "E2E_KIND_IMAGE" in os.environ else []
        run("kind", "create", "cluster", "--name", name, "--wait", "180s", *extra, timeout=600)
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(run("kind", "get", "kubeconfig", "--name", name).stdout)
    kube = Kube(kubeconfig)
    try:
        yield kube
    finally:
        kube.close_forwards()
        if os.environ.get("E2E_KEEP") == "1":
            print(f"\nE2E_KEEP=1: cluster {name} kept; KUBECONFIG={kubeconfig}")
        elif created:
            run("kind", "delete", "cluster", "--name", name, check=False, timeout=300)


@pytest.fixture(scope="session")
def image(kind_cluster: Kube) -> str:
    name = os.environ.get("E2E_KIND_CLUSTER", "engram-e2e")
    run("docker", "build", "-t", IMAGE, ".", timeout=1200)
    run("kind", "load", "docker-image", IMAGE, "--name", name, timeout=600)
    return IMAGE


@pytest.fixture(scope="session")
def release(kind_cluster: Kube, image: str) -> Iterator[Kube]:
    repo, tag = image.split(":")
    kind_cluster.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--create-namespace",
        "--set",
        f"image.repository={repo}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        f"nodes.replicas={NODES}",
        "--set",
        "nodes.persistence.size=1Gi",
        "--set",
        "nodes.podAntiAffinity=none",  # one kind node hosts every pod
        "--wait",
        "--timeout",
        "10m",
        timeout=900,
    )
    try:
        yield kind_cluster
    finally:
        if os.environ.get("E2E_KEEP") != "1":
            with contextlib.suppress(AssertionError):
                kind_cluster.helm("uninstall", RELEASE, "--wait")
