"""`kubectl engram` against a real API server, run the way a user runs it: `kubectl engram …`,
kubectl finding the `kubectl-engram` console script on PATH, through a kubeconfig whose context
names the release namespace (no `-n`). Each command's effect is checked where the operator and
the sidecars act on it: a new primary at a new epoch, the phase Paused, a fenced node's spaces
led elsewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.k8s.apiserver import kubeconfig
from tests.k8s.harness import Release, until

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

ZONES = ["zone-a", "zone-b", "zone-c"]


def kubectl_engram(release: Release, *args: str, check: bool = True) -> str:
    cp = release.cp
    config = kubeconfig(
        release.root / "user.kubeconfig", cp.url, cp.ca, cp.admin, release.namespace
    )
    env = cp.tool_env(config)
    # The plugin is installed where this interpreter's console scripts are.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        [str(cp.bin / "kubectl"), "engram", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"kubectl engram {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout
    return proc.stdout + proc.stderr


def _rows(text: str, header: str) -> dict[str, dict[str, str]]:
    """The table whose header row starts with `header`, as {first cell: {column: cell}}."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header))
    head = lines[at]
    names = [c for c in head.split("   ") if c.strip()]
    starts = [head.index(n.strip()) for n in names]
    out = {}
    for line in lines[at + 1 :]:
        if not line.strip():
            break
        cells = [
            line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line) + 1], strict=True)
        ]
        out[cells[0]] = dict(zip((n.strip() for n in names), cells, strict=True))
    return out


async def _primary_at(release: Release, space: str, epoch: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = release.status(space)
        done = st.get("epoch") == epoch and st.get("phase") == "Healthy"
        return st if done and st.get("ready") == "3/3" else None

    result: dict[str, Any] = await until(check, f"{space} Healthy at epoch {epoch}", 30)
    return result


async def _members_reported(release: Release, space: str) -> None:
    def check() -> bool:
        st = release.status(space)
        return len(st.get("members") or []) == 3 and st.get("membersEpoch") == st.get("epoch")

    await until(check, f"{space}: member rows at the current epoch", 15)


async def test_status_promote_switchover_pause_resume_fence(release: Release) -> None:
    await release.start_nodes(3, zones=ZONES)
    release.operator("operator", "--standalone")
    release.apply_space("orders", {"replicas": 2, "ackPolicy": "quorum"})
    st = await _primary_at(release, "orders", 1)
    primary, replicas = st["primary"], st["replicas"]
    r = await release.cluster.write_json(
        primary, "orders", [{"payload": {"id": i}} for i in range(25)], timeout=5.0
    )
    assert r.status == 200, r

    def applied() -> bool:
        rows = release.status("orders").get("members") or []
        return len(rows) == 3 and all(m.get("appliedSequence") == 25 for m in rows)

    await until(applied, "every member at sequence 25 in status", 15)

    # status: every space with its primary, epoch, phase and each replica's lag; every node.
    out = kubectl_engram(release, "status")
    print(out)
    row = _rows(out, "SPACE")["orders"]
    assert (row["PHASE"], row["PRIMARY"], row["EPOCH"], row["READY"]) == (
        "Healthy",
        primary,
        "1",
        "3/3",
    )
    for r in replicas:
        assert f"{r} 0/" in row["REPLICA LAG (entries/seconds)"], row
    nodes = _rows(out, "NODE")
    assert sorted(nodes) == ["n0", "n1", "n2"]
    assert {nodes[n]["ZONE"] for n in nodes} == set(ZONES)
    assert nodes[primary]["LEADS"] == "1" and nodes[primary]["FLAGS"] == "-"

    # status SPACE: the members, primary first, with their lag.
    out = kubectl_engram(release, "status", "orders")
    print(out)
    assert re.search(r"^Phase:\s+Healthy, Ready True$", out, re.M), out
    assert re.search(rf"^Primary:\s+{primary}$", out, re.M), out
    members = _rows(out, "NODE")
    assert list(members) == [primary, *replicas]
    assert members[primary]["ROLE"] == "primary" and members[primary]["APPLIED"] == "25"
    assert all(members[r]["LAG ENTRIES"] == "0" for r in replicas), members

    # promote SPACE NODE: the operator switches over to exactly that node; the plugin waits for
    # it, then takes its standing request back (targetPrimary would pin the space there).
    target = replicas[1]
    out = kubectl_engram(release, "promote", "orders", target)
    assert f"{target} leads space orders at epoch 2" in out, out
    st = await _primary_at(release, "orders", 2)
    assert st["primary"] == target
    assert "targetPrimary" not in release.space("orders")["spec"]
    # ...and refuses what the operator would refuse, before writing anything.
    refused = kubectl_engram(release, "promote", "orders", target, check=False)
    assert f"{target} already leads space orders" in refused

    # switchover SPACE: to a caught-up replica, whichever the plugin picks.
    await _members_reported(release, "orders")
    out = kubectl_engram(release, "switchover", "orders")
    st = await _primary_at(release, "orders", 3)
    assert st["primary"] != target and st["primary"] in out

    # pause / resume: spec.paused, and the operator's phase follows.
    kubectl_engram(release, "pause", "orders")
    await until(lambda: release.status("orders").get("phase") == "Paused", "Paused", 15)
    assert release.space("orders")["spec"]["paused"] is True
    refused = kubectl_engram(release, "promote", "orders", primary, check=False)
    assert "is paused" in refused
    kubectl_engram(release, "resume", "orders")
    await until(lambda: release.status("orders").get("phase") == "Healthy", "Healthy again", 15)

    # fence NODE: the operator moves the space off the fenced primary and never picks it.
    fenced = release.status("orders")["primary"]
    kubectl_engram(release, "fence", fenced)
    lease = next(le for le in release.leases() if le["spec"]["holderIdentity"] == fenced)
    assert lease["metadata"]["annotations"]["engram.io/fenced"] == "true"
    out = kubectl_engram(release, "status")
    assert _rows(out, "NODE")[fenced]["FLAGS"] == "fenced"

    def moved() -> dict[str, Any] | None:
        st = release.status("orders")
        return st if st.get("primary") not in (None, fenced) and st.get("epoch", 0) > 3 else None

    await until(moved, f"orders led by another node than the fenced {fenced}", 30)
    # A fenced node is never chosen: not by the operator, not by `switchover`.
    await _members_reported(release, "orders")
    out = kubectl_engram(release, "switchover", "orders")
    assert f"switching over to {fenced}" not in out
    kubectl_engram(release, "fence", "--off", fenced)
    lease = next(le for le in release.leases() if le["spec"]["holderIdentity"] == fenced)
    assert "engram.io/fenced" not in (lease["metadata"].get("annotations") or {})
