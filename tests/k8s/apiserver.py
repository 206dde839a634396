"""A real Kubernetes control plane on 127.0.0.1 for tests/k8s: etcd, kube-apiserver and (where it
was built) kube-controller-manager, as local processes. No kubelet and no scheduler: Pods are
stored objects that never run.

`ControlPlane.start(root)`:

* generates, with the openssl CLI, a CA, the API server's serving certificate (IP 127.0.0.1), an
  admin client certificate (group system:masters) and the service-account signing key;
* starts etcd (free ports, fsync off: a throwaway store) and kube-apiserver with
  `--authorization-mode=Node,RBAC`, the service-account issuer and keys (so the TokenRequest API
  mints real tokens), and an audit log of every request (tests/k8s/test_k8s_rbac.py reads it);
* waits for `/readyz` (bounded), writes an admin kubeconfig, and starts kube-controller-manager
  if it was built (StatefulSet -> Pods, namespaces, garbage collection, service accounts).

`stop()` ends every process (SIGTERM, then SIGKILL, bounded); each also has PR_SET_PDEATHSIG, so a
test run that dies never leaves them behind. Process logs are under `root/logs/`.

`Rest` is a small synchronous JSON client (http.client; a fresh TLS connection per call, which on
127.0.0.1 costs about a millisecond); `ControlPlane.kubectl` and `.helm` run the built binaries.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from tests.integration.cluster import _die_with_parent, free_port
from tests.k8s import tools

READY_TIMEOUT: Final = 120.0  # a cold kube-apiserver on a loaded 2-core machine
STOP_TIMEOUT: Final = 15.0
REQUEST_TIMEOUT: Final = 15.0
ADMIN_USER: Final = "engram-test-admin"
SA_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR: Final = "10.96.0.0/16"

# Every request, at Metadata level (who, what, which object, the answer's code): one line when it
# is answered, and for a long-running one (a watch) also one when its answer starts, so a watch
# shows up while it is still open.
AUDIT_POLICY: Final = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


class KubeError(AssertionError):
    """An API call answered with an error. `status` is the HTTP status, `body` the Status."""

    def __init__(self, status: int, message: str, body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _openssl(words: str, *args: str, cwd: Path) -> None:
    """openssl with the space-separated `words`, then `args` (which may hold spaces)."""
    cmd = ["openssl", *words.split(), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr}")


def make_pki(d: Path) -> None:
    """ca.{key,crt}; serving.{key,crt} for 127.0.0.1; admin.{key,crt} (system:masters);
    sa.{key,pub}, the service-account signing key pair."""
    d.mkdir(parents=True, exist_ok=True)
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    _openssl(
        f"req -x509 {ec} -keyout ca.key -out ca.crt -days 2 -subj /CN=engram-test-ca",
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=d,
    )
    certs = {
        "serving": (
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
        ),
        "admin": (
            f"/O=system:masters/CN={ADMIN_USER}",
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
        ),
    }
    for name, (subject, ext) in certs.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl(f"req -new {ec} -keyout {name}.key -out {name}.csr", "-subj", subject, cwd=d)
        _openssl(
            f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
            f"-out {name}.crt -extfile {name}.ext",
            cwd=d,
        )
    _openssl("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key", cwd=d)
    _openssl("pkey -in sa.key -pubout -out sa.pub", cwd=d)


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client authenticates: the admin's client certificate, or a bearer token."""

    name: str
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None


class Rest:
    """JSON over HTTPS to the API server, as one identity."""

    def __init__(self, url: str, ca: Path, creds: Credentials) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 443
        self.creds = creds
        self.ctx = ssl.create_default_context(cafile=str(ca))
        if creds.cert is not None:
            self.ctx.load_cert_chain(str(creds.cert), str(creds.key))

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """One request: (HTTP status, decoded JSON answer or text)."""
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        headers = {
            "Accept": "application/json",
            "User-Agent": f"engram-k8s-tests/{self.creds.name}",
        }
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        if self.creds.token:
            headers["Authorization"] = f"Bearer {self.creds.token}"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = raw.decode(errors="replace")
        return resp.status, doc

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, doc = self.call(method, path, body, **kw)
        if status >= 400:
            msg = doc.get("message", "") if isinstance(doc, dict) else str(doc)
            raise KubeError(status, f"{method} {path}: HTTP {status}: {msg}", doc)
        return doc

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path: str) -> dict[str, Any] | None:
        status, doc = self.call("GET", path)
        if status == 404:
            return None
        if status >= 400:
            raise KubeError(status, f"GET {path}: HTTP {status}: {doc}", doc)
        return dict(doc)

    def create(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, dict(body))

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, dict(body), content_type="application/merge-patch+json")

    def delete(self, path: str) -> None:
        status, doc = self.call("DELETE", path)
        if status >= 400 and status != 404:
            raise KubeError(status, f"DELETE {path}: HTTP {status}: {doc}", doc)


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"==== {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def kubeconfig(path: Path, url: str, ca: Path, creds: Credentials, namespace: str = "") -> Path:
    user: dict[str, str] = {}
    if creds.token:
        user["token"] = creds.token
    if creds.cert is not None and creds.key is not None:
        user["client-certificate"] = str(creds.cert)
        user["client-key"] = str(creds.key)
    context: dict[str, str] = {"cluster": "engram-test", "user": creds.name}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "engram-test", "cluster": {"server": url, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": creds.name, "user": user}],
        "contexts": [{"name": "engram-test", "context": context}],
        "current-context": "engram-test",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    root: Path
    bin: Path
    url: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    controller_manager: bool = False

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "audit.jsonl"

    @property
    def admin(self) -> Credentials:
        return Credentials(ADMIN_USER, cert=self.pki / "admin.crt", key=self.pki / "admin.key")

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    def rest(self, creds: Credentials | None = None) -> Rest:
        return Rest(self.url, self.ca, creds or self.admin)

    # ---- start and stop ----------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path, bin_dir: Path) -> ControlPlane:
        cp = cls(root=root, bin=bin_dir)
        try:
            cp._start()
        except BaseException:
            cp.stop()
            raise
        return cp

    def _start(self) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "ETCD"))}
        env["GOMAXPROCS"] = "2"
        client, peer = free_port(), free_port()
        etcd = Proc(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name=default",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",  # a throwaway store; spares the shared disk
                "--log-level=warn",
            ],
            logs / "etcd.log",
        )
        self.procs["etcd"] = etcd
        etcd.start(env)
        (self.root / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        p = self.pki
        apiserver = Proc(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.root / 'apiserver-certs'}",
                f"--tls-cert-file={p / 'serving.crt'}",
                f"--tls-private-key-file={p / 'serving.key'}",
                f"--client-ca-file={self.ca}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--audit-policy-file={self.root / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--profiling=false",
                "--v=1",
            ],
            logs / "kube-apiserver.log",
        )
        self.procs["kube-apiserver"] = apiserver
        apiserver.start(env)
        self._wait_ready()
        kubeconfig(self.admin_kubeconfig, self.url, self.ca, self.admin)
        kcm = self.bin / "kube-controller-manager"
        if kcm.is_file():
            self.controller_manager = True
            proc = Proc(
                "kube-controller-manager",
                [
                    str(kcm),
                    f"--kubeconfig={self.admin_kubeconfig}",
                    f"--authentication-kubeconfig={self.admin_kubeconfig}",
                    f"--authorization-kubeconfig={self.admin_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                    f"--cert-dir={self.root / 'kcm-certs'}",
                    "--leader-elect=false",
                    f"--service-account-private-key-file={p / 'sa.key'}",
                    f"--root-ca-file={self.ca}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--use-service-account-credentials=false",
                    "--concurrent-statefulset-syncs=2",
                    "--profiling=false",
                    "--v=1",
                ],
                logs / "kube-controller-manager.log",
            )
            self.procs["kube-controller-manager"] = proc
            proc.start(env)

    def _wait_ready(self) -> None:
        rest = self.rest()
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if not proc.running():
                    raise RuntimeError(f"{name} exited during start-up:\n{proc.tail()}")
            try:
                status, doc = rest.call("GET", "/readyz", timeout=5)
                if status == 200:
                    return
                last = f"HTTP {status}: {str(doc)[-500:]}"
            except (OSError, http.client.HTTPException) as err:
                last = repr(err)
            time.sleep(0.25)
        raise RuntimeError(
            f"kube-apiserver not ready within {READY_TIMEOUT} s ({last}):\n"
            + self.procs["kube-apiserver"].tail()
        )

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                self.procs[name].stop()

    def problems(self) -> list[str]:
        return [f"{n} exited: {p.tail(20)}" for n, p in self.procs.items() if not p.running()]

    # ---- the built command-line tools ------------------------------------------------------------

    def tool_env(self, kubeconfig_path: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
        env["KUBECONFIG"] = str(kubeconfig_path or self.admin_kubeconfig)
        env["KUBECACHEDIR"] = str(self.root / "kube-cache")  # not ~/.kube: this server only
        helm_home = self.root / "helm"
        for var, sub in (("CACHE", "cache"), ("CONFIG", "config"), ("DATA", "data")):
            env[f"HELM_{var}_HOME"] = str(helm_home / sub)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(
        self,
        tool: str,
        *args: str,
        check: bool = True,
        stdin: str | None = None,
        kubeconfig_path: Path | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin / tool), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.tool_env(kubeconfig_path),
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kw)

    def wait_discovered(self, resource: str, timeout: float = 30.0) -> None:
        """Until API discovery (and so kubectl's cache, which this call refreshes) lists
        `resource` (plural.group): a new CRD is served a moment after it is Established."""
        group = resource.partition(".")[2]
        deadline = time.monotonic() + timeout
        while True:
            out = self.kubectl("api-resources", f"--api-group={group}", "-o", "name").stdout
            if resource in out.split():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{resource} not in API discovery within {timeout} s: {out}")
            time.sleep(0.2)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kw)

    # ---- objects -------------------------------------------------------------------------------

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        if labels:
            body["metadata"] = {"name": name, "labels": dict(labels)}
        self.rest().create("/api/v1/namespaces", body)

    def token(self, namespace: str, service_account: str, *, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount, from the TokenRequest API (as the kubelet gets
        the ones it projects into pods)."""
        doc = self.rest().create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return str(doc["status"]["token"])

    def service_account(self, namespace: str, name: str, root: Path) -> ServiceAccount:
        token = self.token(namespace, name)
        creds = Credentials(f"system:serviceaccount:{namespace}:{name}", token=token)
        token_file = root / f"{name}.token"
        token_file.write_text(token)
        config = kubeconfig(root / f"{name}.kubeconfig", self.url, self.ca, creds, namespace)
        return ServiceAccount(
            namespace=namespace,
            name=name,
            token_file=token_file,
            kubeconfig=config,
            rest=self.rest(creds),
        )

    def audit(self) -> Iterator[dict[str, Any]]:
        """The audit log's events so far (one JSON object a line)."""
        if not self.audit_log.exists():
            return
        with self.audit_log.open() as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    namespace: str
    name: str
    token_file: Path
    kubeconfig: Path
    rest: Rest

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def missing_tools() -> list[str]:
    return tools.missing()


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def names(objs: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted(str(o["metadata"]["name"]) for o in objs)
