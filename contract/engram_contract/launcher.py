"""Starting a sidecar process: its command line, free ports, and dying with its parent.

The one copy, used by local mode (`engram-replication up`), the benchmark and the tests. A
sidecar is always started as `python -m engram_sidecar`, so nothing here imports the data plane.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

HOST: Final = "127.0.0.1"

_handed_out: set[int] = set()
_LIBC = ctypes.CDLL(None, use_errno=True)  # the running process's libc (Linux)
_PR_SET_PDEATHSIG: Final = 1


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nothing listens on now (and that this process hasn't handed
    out before: two calls in a row never return the same port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the parent goes away.

    Only one libc call, resolved before the fork: nothing that could take a lock. Linux only.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class SidecarSpec:
    """What a sidecar process is started with. `flags` are further settings, by their name in
    the sidecar's config (`heartbeat_interval` becomes `--heartbeat-interval`)."""

    node: str
    data_dir: Path
    http_port: int
    replication_port: int
    secret_file: Path
    flags: Mapping[str, object] = field(default_factory=dict)
    python: str = sys.executable

    def command(self) -> list[str]:
        args = [
            self.python,
            "-m",
            "engram_sidecar",
            "--node",
            self.node,
            "--data-dir",
            str(self.data_dir),
            "--http-port",
            str(self.http_port),
            "--replication-port",
            str(self.replication_port),
            "--secret-file",
            str(self.secret_file),
        ]
        for k, v in self.flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        return args


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ENGRAM_* settings (a child takes its settings from
    its command line only), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def spawn(
    spec: SidecarSpec,
    log: IO[bytes],
    *,
    env: Mapping[str, str] | None = None,
    tie_to_parent: bool = True,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start the sidecar `spec` describes, its output appended to `log`.

    `tie_to_parent`: SIGKILL it when this process dies (tests, the benchmark), so nothing is
    left running after a crash. `new_session`: its own process group, so a Ctrl-C in the
    terminal reaches only the supervisor (local mode), which stops the nodes in order.
    """
    spec.data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        spec.command(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else clean_env(),
        preexec_fn=die_with_parent if tie_to_parent else None,  # noqa: PLW1509 - one prctl call
        start_new_session=new_session,
    )
