"""Sidecar settings: defaults, then an optional YAML file, then `ENGRAM_*` env vars, then flags.

Every setting has one name, used in all three places: `batch_max_entries` is the YAML key,
`ENGRAM_BATCH_MAX_ENTRIES` the env var and `--batch-max-entries` the flag. An unknown or invalid
setting is a ConfigError at start-up that names the setting, where it came from, and what is
allowed. docs/configuration.md lists them all.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from engram_contract.assignment import bracketed, join_hostport
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE
from engram_contract.ids import ENV_PREFIX
from engram_contract.kubernetes import LEASE_DURATION_SECONDS, LEASE_RENEW_SECONDS
from engram_contract.tokens import MIN_KEY_BYTES, KeyFile, short_keys
from engram_sidecar.errors import ConfigError
from engram_sidecar.tail.watch import inotify_available

# Docker-link style variables Kubernetes adds for every Service in the namespace, e.g.
# ENGRAM_REPLICATION_SERVICE_HOST or ENGRAM_REPLICATION_PORT=tcp://10.0.0.1:7070.
_SERVICE_LINK = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)$"
)
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://")
_NODE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-.")
# Room in a BATCH body beyond its entries: the message's own prefix (the previous entry's epoch,
# 8 bytes in protocol v2), with space for it to grow without a config that worked turning bad.
BATCH_BODY_RESERVE = 4096


def batch_body_bytes(payload_bytes: int, entries: int) -> int:
    """Bytes a BATCH body needs for `entries` entries holding `payload_bytes` of payload.

    A body larger than a receiver's `max_frame_bytes` is refused at its header, and the primary
    would resend the same batch forever: the link is wedged. So whatever a write request may
    carry must fit this bound (checked at start-up against the request limits, and per request).
    """
    return payload_bytes + entries * ENTRY_HEADER_SIZE + BATCH_BODY_RESERVE


@dataclass(frozen=True)
class SidecarConfig:
    node: str = ""
    data_dir: Path = Path("data")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    replication_host: str = "127.0.0.1"
    replication_port: int = 7070
    # host:port that peers dial to reach this node; defaults to replication_host:replication_port
    advertise_address: str = ""
    secret_file: Path | None = None
    admin_token_file: Path | None = None
    fsync: str = "always"
    fsync_interval: float = 0.05
    # Where fsyncs run off the loop (log/fsync_engine.py): kernel AIO where it works, else threads.
    fsync_engine: str = "auto"
    segment_bytes: int = 64 * 1024 * 1024
    batch_max_entries: int = 1000
    batch_max_delay: float = 0.010
    max_inflight_batches: int = 32
    max_frame_bytes: int = 16 * 1024 * 1024
    max_request_bytes: int = 8 * 1024 * 1024
    max_entries_per_request: int = 10_000
    # Largest body of GET …/entries (its entries as encoded); the max_bytes query parameter may
    # ask for less.
    max_response_bytes: int = 8 * 1024 * 1024
    # Replication listener, before authentication (replication/admission.py): open connections
    # in all, handshakes in progress per source address, and one deadline per handshake.
    max_peer_connections: int = 256
    max_peer_handshakes_per_source: int = 32
    handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    io_timeout: float = 10.0
    keepalive: float = 10.0
    heartbeat_interval: float = 0.25
    backoff_steps: tuple[float, ...] = (0.1, 1.0, 10.0, 60.0)
    breaker_failures: int = 3
    lag_monitor_interval: float = 5.0
    lag_warning_seconds: float = 1.0
    lag_critical_seconds: float = 5.0
    failed_after_seconds: float = 30.0
    ack_timeout: float = 5.0
    # Tail mode (docs/engram.md): Engram's data root, shared with the Engram container. Unset:
    # standalone (writes come through the HTTP API only).
    engram_data_root: Path | None = None
    engram_watch: str = "auto"
    engram_poll_interval: float = 0.05
    # Catch-up and retention (docs/configuration.md).
    catchup_threshold: int = 10_000
    catchup_bytes_per_second: int = 64 * 1024 * 1024
    retention_min_entries: int = 1_000_000
    retention_max_bytes: int = 4 * 1024 * 1024 * 1024
    write_lease_seconds: float = 1.5
    control_plane_url: str = ""
    log_level: str = "INFO"
    # The asyncio event loop implementation (main.py): uvloop where installed, else asyncio's.
    event_loop: str = "auto"
    # Kubernetes (kube/agent.py): node Lease, assignments and member reports via the API.
    # host:port of the HTTP API that peers and the operator use; defaults to http_host:http_port
    advertise_http_address: str = ""
    kube_enabled: str = "auto"
    kube_api_url: str = ""
    kube_namespace: str = ""
    kube_token_file: Path | None = None
    kube_ca_file: Path | None = None
    kube_timeout: float = 1.0
    # The Kubernetes Node this pod runs on (the chart sets it from spec.nodeName). Its labels
    # topology.kubernetes.io/zone and engram.io/rack are copied onto the node Lease, where
    # placement reads them to spread a space's members; reading them needs `get` on nodes.
    kube_node_name: str = ""
    # The release this node belongs to (the chart: its release name), written on the node Lease
    # as engram.io/release: only that release's operator places spaces here.
    kube_release: str = ""
    # This node's failure domain, written on its Lease; each one set wins over the Node's label.
    zone: str = ""
    rack: str = ""
    # The pod's uid (the downward API's metadata.uid): the node Lease is owned by the pod, so it
    # goes with it. Empty: read from the pod itself (GET pods/<node>), if allowed.
    kube_pod_uid: str = ""
    status_report_interval: float = 2.0
    # Shutdown (SIGTERM): ask the control plane to switch every space led here to a replica,
    # and wait up to this long for it before exiting (0: exit at once). Keep it below the pod's
    # terminationGracePeriodSeconds. SIGINT always stops at once.
    drain_timeout: float = 25.0
    # /readyz: a replica is caught up when at most this many entries behind its primary.
    ready_max_lag_entries: int = 1000
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def address(self) -> str:
        return bracketed(
            self.advertise_address or join_hostport(self.replication_host, self.replication_port)
        )

    def secret_keys(self) -> KeyFile:
        """The shared secret's keys (one per line, two during a rotation), re-read when the file
        changes: each new handshake uses the keys as they are then. A reload with a key shorter
        than MIN_KEY_BYTES is ignored (the last keys stay)."""
        if self.secret_file is None:
            raise ConfigError("secret_file is required: peers authenticate with a shared secret")
        try:
            keys = KeyFile(self.secret_file, valid=lambda ks: not short_keys(ks))
        except OSError as err:
            raise ConfigError(f"secret_file {self.secret_file}: {err.strerror}") from err
        except ValueError:
            keys = None
        # One key per line (two during a rotation, engram_contract.tokens); each must be strong.
        if keys is None or short_keys(keys.accepted()):
            raise ConfigError(
                f"secret_file {self.secret_file}: use at least {MIN_KEY_BYTES} bytes of secret"
                " (on every line, when it holds several keys)"
            )
        return keys

    def secret(self) -> bytes:
        """The shared secret as read now (every key, one per line)."""
        return self.secret_keys().secret()

    def admin_tokens(self) -> KeyFile:
        """The bearer tokens the control routes accept: every line of admin_token_file (else
        secret_file), re-read when the file changes."""
        path = self.admin_token_file or self.secret_file
        if path is None:
            raise ConfigError("admin_token_file or secret_file is required")
        try:
            return KeyFile(path)
        except (OSError, ValueError) as err:
            why = err.strerror if isinstance(err, OSError) else str(err)
            raise ConfigError(f"admin_token_file {path}: {why}") from err


_FIELDS = {f.name: f for f in fields(SidecarConfig) if f.name != "extra"}
_CHOICES: dict[str, tuple[str, ...]] = {
    "fsync": ("always", "interval", "none"),
    "fsync_engine": ("auto", "aio", "thread"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "kube_enabled": ("auto", "true", "false"),
    "engram_watch": ("auto", "inotify", "poll"),
    "event_loop": ("auto", "uvloop", "asyncio"),
}


def _coerce(name: str, value: Any, source: str) -> Any:
    f = _FIELDS[name]
    typ = f.type if isinstance(f.type, str) else str(f.type)
    try:
        if typ.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(x) for x in items)
        if "Path" in typ:
            return None if value in (None, "") else Path(value)
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} (from {source}): invalid value {value!r}: {err}") from err


_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def _validate(cfg: SidecarConfig) -> SidecarConfig:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{name}={getattr(cfg, name)!r}: {why}")

    if not cfg.node:
        raise ConfigError("node is required (--node, ENGRAM_NODE or node: in the config file)")
    if not set(cfg.node) <= _NODE_CHARS or len(cfg.node) > 63:
        raise bad("node", "use up to 63 characters from [a-z0-9-.]")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, f"choose one of {', '.join(choices)}")
    for name in ("http_port", "replication_port"):
        if not 0 <= getattr(cfg, name) <= 65535:
            raise bad(name, "a TCP port is 0..65535")
    positive = (
        "fsync_interval",
        "segment_bytes",
        "batch_max_entries",
        "max_inflight_batches",
        "max_frame_bytes",
        "max_request_bytes",
        "max_entries_per_request",
        "max_response_bytes",
        "max_peer_connections",
        "max_peer_handshakes_per_source",
        "handshake_timeout",
        "connect_timeout",
        "io_timeout",
        "keepalive",
        "heartbeat_interval",
        "breaker_failures",
        "lag_monitor_interval",
        "lag_warning_seconds",
        "lag_critical_seconds",
        "failed_after_seconds",
        "ack_timeout",
        "catchup_threshold",
        "catchup_bytes_per_second",
        "retention_max_bytes",
        "write_lease_seconds",
        "engram_poll_interval",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise bad(name, "must be greater than 0")
    if cfg.batch_max_delay < 0:
        raise bad("batch_max_delay", "must be 0 or more")
    if cfg.drain_timeout < 0:
        raise bad("drain_timeout", "must be 0 or more")
    if cfg.ready_max_lag_entries < 0:
        raise bad("ready_max_lag_entries", "must be 0 or more")
    if cfg.lag_critical_seconds < cfg.lag_warning_seconds:
        raise bad("lag_critical_seconds", "must be at least lag_warning_seconds")
    # A slower API request leaves too little of the node Lease for one missed renewal (kube/agent).
    most = LEASE_DURATION_SECONDS - 2 * LEASE_RENEW_SECONDS
    if not 0 < cfg.kube_timeout <= most:
        raise bad("kube_timeout", f"use more than 0 and at most {most}")
    if cfg.status_report_interval < LEASE_RENEW_SECONDS:
        raise bad("status_report_interval", f"use at least {LEASE_RENEW_SECONDS}")
    for name in ("zone", "rack", "kube_release"):
        if getattr(cfg, name) and not _LABEL_VALUE.fullmatch(getattr(cfg, name)):
            raise bad(name, "a label value: up to 63 of [A-Za-z0-9._-], alphanumeric at both ends")
    if cfg.kube_node_name and not _NODE_NAME.fullmatch(cfg.kube_node_name):
        raise bad("kube_node_name", "a Kubernetes Node name (lower-case DNS subdomain)")
    if cfg.segment_bytes < 4096:
        raise bad("segment_bytes", "use at least 4096")
    if not cfg.backoff_steps or any(s <= 0 for s in cfg.backoff_steps):
        raise bad("backoff_steps", "a comma-separated list of positive seconds")
    if cfg.max_peer_handshakes_per_source > cfg.max_peer_connections:
        raise bad("max_peer_handshakes_per_source", "must be at most max_peer_connections")
    if cfg.engram_data_root is not None and (
        cfg.engram_data_root.resolve() == cfg.data_dir.resolve()
    ):
        raise bad("engram_data_root", "must not be data_dir: Engram's files and this log differ")
    if cfg.engram_watch == "inotify" and not inotify_available():
        raise bad("engram_watch", "inotify is not available here; use auto or poll")
    if cfg.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise bad("event_loop", "uvloop is not installed (pip install 'engram-replication[fast]')")
    if cfg.fsync_engine == "aio" and importlib.util.find_spec("caio") is None:
        raise bad("fsync_engine", "caio is not installed (pip install 'engram-replication[fast]')")
    why = _request_fits_frame(cfg)
    if why is not None:
        raise bad("max_request_bytes", why)
    return cfg


def _request_fits_frame(cfg: SidecarConfig) -> str | None:
    need = batch_body_bytes(cfg.max_request_bytes, cfg.max_entries_per_request)
    if need <= cfg.max_frame_bytes:
        return None
    return (
        f"a request's entries must fit one frame: max_request_bytes + "
        f"{ENTRY_HEADER_SIZE} × max_entries_per_request ({cfg.max_entries_per_request}) + "
        f"{BATCH_BODY_RESERVE} = {need} must be at most max_frame_bytes ({cfg.max_frame_bytes}). "
        "Lower max_request_bytes or max_entries_per_request, or raise max_frame_bytes on every node"
    )


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> SidecarConfig:
    """Merge file < env < flags over the defaults and validate. Flags left as None are unset."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = yaml.safe_load(config_file.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"config file {config_file}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {config_file}: invalid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping of settings")
        for k, v in raw.items():
            name = str(k).replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"config file {config_file}: unknown setting {k!r}")
            values[name] = _coerce(name, v, f"config file {config_file}")
    for k, v in (env if env is not None else os.environ).items():
        if not k.startswith(ENV_PREFIX) or k == ENV_PREFIX + "CONFIG":
            continue
        name = k[len(ENV_PREFIX) :].lower()
        if _SERVICE_LINK.match(k) or _SERVICE_LINK_VALUE.match(v):
            # Kubernetes injects these for a Service named engram-*; they are not settings.
            continue
        if name not in _FIELDS:
            raise ConfigError(f"environment variable {k}: unknown setting {name!r}")
        values[name] = _coerce(name, v, f"environment variable {k}")
    for k, v in (flags or {}).items():
        if v is None:
            continue
        if k not in _FIELDS:
            raise ConfigError(f"unknown setting {k!r}")
        values[k] = _coerce(k, v, f"--{k.replace('_', '-')}")
    return _validate(dataclasses.replace(SidecarConfig(), **values))


def setting_names() -> list[str]:
    return list(_FIELDS)


def is_choice(name: str) -> tuple[str, ...] | None:
    return _CHOICES.get(name)
