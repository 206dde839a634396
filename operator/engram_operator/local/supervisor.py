"""Local mode's process supervisor: starts, signals and stops the sidecar processes of `up`.

Each node is `python -m engram_sidecar` on 127.0.0.1, started by `engram_contract.launcher` (its
one command line), logging to `<data>/<node>.log`. The nodes run in their own process group, so a
Ctrl-C in the terminal reaches only the supervisor, which stops them in order; and they die with
it, so a crashed supervisor leaves nothing running.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engram_contract.ids import NodeName
from engram_contract.launcher import HOST, SidecarSpec, spawn
from engram_operator.local.store import ClusterFiles

STOP_TIMEOUT = 10.0


@dataclass
class LocalNode:
    """A node of the local cluster: its name, ports and data folder, and its process once
    started."""

    name: NodeName
    http_port: int
    replication_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        """Where the control loop reaches its HTTP API."""
        return f"{HOST}:{self.http_port}"

    @property
    def address(self) -> str:
        """The replication address its peers are assigned."""
        return f"{HOST}:{self.replication_port}"


def flags_from_args(args: Sequence[str]) -> dict[str, str]:
    """`["--heartbeat-interval", "0.1", ...]` as launcher flags (`{"heartbeat_interval": "0.1"}`).

    Every flag of a sidecar takes a value, so `args` must be pairs."""
    if len(args) % 2:
        raise ValueError(f"sidecar arguments must be --flag value pairs: {list(args)}")
    out: dict[str, str] = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if not flag.startswith("--"):
            raise ValueError(f"expected a --flag, got {flag!r}")
        out[flag[2:].replace("-", "_")] = value
    return out


class Processes:
    """Starts, signals and stops the node processes; `extra_args` go to every node."""

    def __init__(
        self, files: ClusterFiles, nodes: Sequence[LocalNode], extra_args: Sequence[str]
    ) -> None:
        self.files = files
        self.nodes = {n.name: n for n in nodes}
        self.flags = flags_from_args(extra_args)

    def start(self, name: NodeName) -> None:
        n = self.nodes[name]
        spec = SidecarSpec(
            node=n.name,
            data_dir=n.data_dir,
            http_port=n.http_port,
            replication_port=n.replication_port,
            secret_file=self.files.secret,
            flags=self.flags,
        )
        with self.files.log(name).open("ab") as log:
            n.proc = spawn(spec, log, tie_to_parent=True, new_session=True)

    def kill(self, name: NodeName, sig: int = signal.SIGKILL) -> None:
        p = self.nodes[name].proc
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=STOP_TIMEOUT)

    def stop_all(self) -> None:
        # SIGINT, not SIGTERM: the whole cluster stops, so there is nobody to hand spaces to
        # (SIGTERM would have each node wait out its drain_timeout).
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGCONT)
                n.proc.send_signal(signal.SIGINT)
        for n in self.nodes.values():
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(timeout=5)
