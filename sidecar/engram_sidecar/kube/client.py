"""A small async Kubernetes API client on aiohttp, and the objects the sidecar writes (agent.py).

Not the `kubernetes` package: that client is synchronous, and the sidecar's event loop also runs
the data plane. Every request here has a hard timeout (`kube_timeout`, 1 s by default), so an API
server that is slow or gone can delay the Kubernetes tasks but never a write.

Where the API server is and how to authenticate comes from the settings (`kube_api_url`,
`kube_token_file`, `kube_ca_file`, `kube_namespace`) or, in a pod, from the service account
mounted at /var/run/secrets/kubernetes.io/serviceaccount and KUBERNETES_SERVICE_HOST/PORT.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from engram_contract.kubernetes import (
    ANNOTATION_DRAINING,
    ANNOTATION_HTTP,
    ANNOTATION_REPLICATION,
    LABEL_NODE_LEASE,
    LABEL_RACK,
    LABEL_RELEASE,
    LABEL_ZONE,
    LEASE_DURATION_SECONDS,
    LEASE_PREFIX,
    NodeAddresses,
    lease_name,
)
from engram_sidecar.config import SidecarConfig
from engram_sidecar.errors import ConfigError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Bound service-account tokens rotate (about hourly); re-read the file this often, as client-go.
TOKEN_REREAD_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class KubeSettings:
    api_url: str  # e.g. https://10.96.0.1:443 or http://127.0.0.1:PORT (kmock)
    namespace: str
    token_file: Path | None
    ca_file: Path | None
    timeout: float
    pod_uid: str = ""  # kube_pod_uid: the node Lease's owner
    read_pod: bool = False  # in a pod without kube_pod_uid: read the uid from the pod itself


def resolve(
    cfg: SidecarConfig,
    env: Mapping[str, str] | None = None,
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
) -> KubeSettings | None:
    """The API server to use, or None when Kubernetes is off (`kube_enabled`, or `auto` and
    neither `kube_api_url` nor a pod's service account). Raises ConfigError on a bad setup."""
    env = os.environ if env is None else env
    if cfg.kube_enabled == "false":
        return None
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    in_cluster = bool(host) and (sa_dir / "token").is_file()
    url = cfg.kube_api_url.rstrip("/")
    if not url and in_cluster:
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if not url:
        if cfg.kube_enabled == "true":
            raise ConfigError(
                "kube_enabled=true but there is no API server: set kube_api_url, or run in a pod "
                "with a service account (KUBERNETES_SERVICE_HOST and its token file)"
            )
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"kube_api_url={cfg.kube_api_url!r}: use http://… or https://…")
    token = cfg.kube_token_file or (sa_dir / "token" if in_cluster else None)
    ca = cfg.kube_ca_file
    if ca is None and in_cluster and url.startswith("https://") and (sa_dir / "ca.crt").is_file():
        ca = sa_dir / "ca.crt"
    for name, path in (("kube_token_file", token), ("kube_ca_file", ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}={str(path)!r}: no such file")
    namespace = cfg.kube_namespace
    if not namespace and (sa_dir / "namespace").is_file():
        namespace = (sa_dir / "namespace").read_text().strip()
    uid = cfg.kube_pod_uid.strip()
    return KubeSettings(
        url, namespace or "default", token, ca, cfg.kube_timeout, uid, in_cluster and not uid
    )


class KubeApiError(Exception):
    """A request failed. `status` is the HTTP status, 0 when no answer came (timeout, refused)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeClient:
    def __init__(self, settings: KubeSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._token_read_at = -TOKEN_REREAD_SECONDS

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx: ssl.SSLContext | bool = False
            if self.settings.api_url.startswith("https://"):
                ca = self.settings.ca_file
                ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _bearer(self) -> str:
        path = self.settings.token_file
        if path is None:
            return ""
        now = time.monotonic()
        if now - self._token_read_at >= TOKEN_REREAD_SECONDS:
            try:
                self._token = path.read_text().strip()
                self._token_read_at = now
            except OSError as err:
                raise KubeApiError(0, f"kube_token_file {path}: {err.strerror}") from err
        return self._token

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One call; the decoded JSON answer. PATCH bodies go as JSON merge patches."""
        headers = {"Accept": "application/json"}
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            patch = method == "PATCH"
            headers["Content-Type"] = (
                "application/merge-patch+json" if patch else "application/json"
            )
        what = f"{method} {path}"
        try:
            async with self._open().request(
                method, self.settings.api_url + path, data=data, headers=headers, params=params
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError as err:
            raise KubeApiError(0, f"{what}: no answer in {self.settings.timeout} s") from err
        except (aiohttp.ClientError, OSError) as err:
            raise KubeApiError(0, f"{what}: {err!r}") from err
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if status >= 400:
            message = doc.get("message", "") if isinstance(doc, dict) else ""
            raise KubeApiError(status, f"{what}: HTTP {status} {message}".rstrip())
        return doc

    async def list(self, path: str, *, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        doc = await self.request("GET", path, params=params)
        items = doc.get("items") if isinstance(doc, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


# ---- the node Lease ----------------------------------------------------------------------------


def micro_time(ns: int) -> str:
    """RFC 3339 with microseconds in UTC, as Kubernetes MicroTime: 2026-11-26T14:03:59.123456Z."""
    secs, micros = divmod(ns // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


def lease_object(
    node: str,
    namespace: str,
    *,
    http: str,
    replication: str,
    renew_ns: int,
    acquire: bool = False,
    draining: bool = False,
    domain: Mapping[str, str] | None = None,
    release: str = "",
    owner_uid: str = "",
) -> dict[str, Any]:
    """The node Lease, or the merge patch that renews it. `domain`: the failure-domain labels
    (LABEL_ZONE, LABEL_RACK) known for this node, published for placement. With `owner_uid`,
    owned by the node's pod (named as the node): the garbage collector deletes it with the
    pod, so a scaled-down node leaves no Lease behind. Not `blockOwnerDeletion`, which would
    need the pods/finalizers permission. With `release`, labelled LABEL_RELEASE: only that
    release's operator places spaces on this node."""
    spec: dict[str, Any] = {
        "holderIdentity": node,
        "leaseDurationSeconds": LEASE_DURATION_SECONDS,
        "renewTime": micro_time(renew_ns),
    }
    if acquire:
        spec["acquireTime"] = spec["renewTime"]
    owner = (
        {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": node, "uid": owner_uid}]}
        if owner_uid
        else {}
    )
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            **owner,
            "name": lease_name(node),
            "namespace": namespace,
            "labels": {
                LABEL_NODE_LEASE: "true",
                **({LABEL_RELEASE: release} if release else {}),
                **(domain or {}),
            },
            "annotations": {
                ANNOTATION_HTTP: http,
                ANNOTATION_REPLICATION: replication,
                # Always written, so a restarted sidecar's first renewal clears it.
                ANNOTATION_DRAINING: "true" if draining else "false",
            },
        },
        "spec": spec,
    }


def failure_domain(
    node_labels: Mapping[str, Any], *, zone: str = "", rack: str = ""
) -> dict[str, str]:
    """The Lease labels saying where a node is: a Kubernetes Node's zone and rack labels, each
    overridden by the setting of the same name when that is set."""
    out: dict[str, str] = {}
    for key, override in ((LABEL_ZONE, zone), (LABEL_RACK, rack)):
        value = override or node_labels.get(key)
        if isinstance(value, str) and value:
            out[key] = value
    return out


def addresses_from_leases(items: Iterable[Mapping[str, Any]]) -> dict[str, NodeAddresses]:
    """Node name -> addresses, from the node Leases' annotations (incomplete ones skipped)."""
    out: dict[str, NodeAddresses] = {}
    for item in items:
        meta = item.get("metadata") or {}
        name, notes = meta.get("name", ""), meta.get("annotations") or {}
        http, repl = notes.get(ANNOTATION_HTTP), notes.get(ANNOTATION_REPLICATION)
        if name.startswith(LEASE_PREFIX) and isinstance(http, str) and isinstance(repl, str):
            out[name[len(LEASE_PREFIX) :]] = {"address": repl, "http": http}
    return out
