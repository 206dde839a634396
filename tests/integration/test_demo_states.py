"""`engram-replication up --demo` (what `make run` runs), read as a new user reads it.

The demo SIGKILLs the node that leads the most spaces, restarts it and waits until it caught
up; its last table must then show that node as a replica that is connected and caught up, so
`Healthy` (issue 15: it showed `Degraded` with 0 entries and 0.00 s of lag, because the breaker
opened while the node was down stayed counted after it came back).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engram_contract.launcher import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]

ROW = re.compile(r"^(\S+)\s+(node-\d+)\s+(\d+)\s+(\d+)\s+(.*)$")
REPLICA = re.compile(r"(node-\d+): (\d+) / (\d+) / ([\d.]+) / (\w+)")


def _tables(out: str) -> list[dict[str, dict[str, tuple[int, int, float, str]]]]:
    """Every table the demo printed: space -> replica -> (acked, lag entries, lag s, state)."""
    tables: list[dict[str, dict[str, tuple[int, int, float, str]]]] = []
    for line in out.splitlines():
        if line.startswith("SPACE "):
            tables.append({})
            continue
        m = ROW.match(line)
        if m and tables:
            tables[-1][m.group(1)] = {
                r[0]: (int(r[1]), int(r[2]), float(r[3]), r[4]) for r in REPLICA.findall(m.group(5))
            }
    return tables


def test_demo_shows_the_restarted_node_healthy_once_caught_up(tmp_path: Path) -> None:
    http, repl = free_port(), free_port()
    # Ports P+i and Q+i: pick bases whose neighbours are free too (checked by the demo's start).
    cmd = [
        sys.executable,
        "-m",
        "engram_operator.cli",
        "up",
        "--demo",
        "--data-dir",
        str(tmp_path / "data"),
        "--http-port-base",
        str(http),
        "--replication-port-base",
        str(repl),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    victim = re.search(r"demo: SIGKILL (node-\d+)", out)
    assert victim is not None, out[-3000:]
    node = victim.group(1)
    assert f"demo: {node} caught up" in out, out[-3000:]
    last = _tables(out)[-1]
    rows = {space: reps[node] for space, reps in last.items() if node in reps}
    assert rows, f"{node} is a replica of no space in the last table:\n{out[-3000:]}"
    for space, (_, lag_entries, lag_seconds, state) in rows.items():
        if lag_entries == 0 and lag_seconds == 0.0:
            assert state == "Healthy", f"{space}: caught-up {node} shown {state}\n{out[-3000:]}"
        assert state != "Degraded" or lag_seconds > 5.0, f"{space}: {state}\n{out[-3000:]}"
