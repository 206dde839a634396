"""Rotating the shared secret with real sidecar processes (docs/operations.md, "Rotate the
shared secret"): the secret file holds one key per line, the first one sent and every one
accepted, and it is re-read when it changes.

* Nodes at neighbouring steps of a rotation (old+new and new+old) replicate to each other.
* A running sidecar's control routes follow its file: a new key is accepted once the file holds
  it, an old one refused once the file drops it, with no restart.
* The control plane's client (`KeyFile.current_text`, as the operator uses it) sends the new key
  once its own file leads with it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tests.integration.cluster import Cluster

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.tokens import KeyFile

OLD = "old-secret-0123456789abcdef"
NEW = "new-secret-0123456789abcdef"
# Long enough for KeyFile.check_every (1 s) on a loaded machine.
RELOAD_BOUND = 10.0


def _write(path: Path, *keys: str) -> None:
    """As a Kubernetes Secret volume updates: a new file swapped in whole."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(keys) + "\n")
    os.replace(tmp, path)


async def _status(cluster: Cluster, node: str, token: str) -> int:
    """HTTP status of a control route (`POST /v1/lease`, a heartbeat without grants) called
    with the bearer `token`."""
    client = SidecarClient(token, probe_timeout=2.0)
    try:
        await client.heartbeat(cluster[node].http, {}, sent_mono_ns=time.monotonic_ns())
    except SidecarError as err:
        return err.status
    finally:
        await client.close()
    return 200


async def _until_status(cluster: Cluster, node: str, token: str, want: int) -> None:
    deadline = time.monotonic() + RELOAD_BOUND
    while (got := await _status(cluster, node, token)) != want:
        assert time.monotonic() < deadline, f"{token[:3]}: HTTP {got}, not {want}"
        await asyncio.sleep(0.1)


async def test_nodes_at_neighbouring_rotation_steps_replicate(
    cluster: Cluster, tmp_path: Path
) -> None:
    files = {}
    for name, keys in (("n0", (OLD, NEW)), ("n1", (NEW, OLD)), ("n2", (OLD, NEW))):
        files[name] = tmp_path / f"{name}.secret"
        _write(files[name], *keys)
        cluster.add_node(name, secret_file=files[name])
    await cluster.start("n0", "n1", "n2")
    await cluster.assign("orders", "n1", ["n0", "n2"], ack_policy="quorum")
    r = await cluster.write_json("n1", "orders", [{"payload": {"i": i}} for i in range(20)])
    assert r.status == 200, r
    await cluster.wait_replicated("orders", "n1", timeout=15)


async def test_control_routes_follow_the_secret_file_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    secret = tmp_path / "n0.secret"
    _write(secret, OLD)
    cluster.add_node("n0", secret_file=secret)
    await cluster.start("n0")
    assert await _status(cluster, "n0", OLD) == 200
    assert await _status(cluster, "n0", NEW) == 401

    _write(secret, NEW, OLD)  # step 2 of the rotation: both accepted
    await _until_status(cluster, "n0", NEW, 200)
    assert await _status(cluster, "n0", OLD) == 200

    _write(secret, NEW)  # the last step: the old key is refused
    await _until_status(cluster, "n0", OLD, 401)
    assert await _status(cluster, "n0", NEW) == 200


async def test_control_plane_client_sends_the_first_key_of_its_file(
    cluster: Cluster, tmp_path: Path
) -> None:
    node_secret = tmp_path / "n0.secret"
    _write(node_secret, NEW)
    cluster.add_node("n0", secret_file=node_secret)
    await cluster.start("n0")
    ours = tmp_path / "operator.secret"
    _write(ours, OLD)
    client = SidecarClient(KeyFile(ours).current_text, probe_timeout=1.0)
    try:
        http = cluster["n0"].http
        try:
            await client.heartbeat(http, {}, sent_mono_ns=time.monotonic_ns())
            raise AssertionError("the node accepted a key it doesn't hold")
        except SidecarError as err:
            assert err.status == 401
        _write(ours, NEW, OLD)
        deadline = time.monotonic() + RELOAD_BOUND
        while True:
            try:
                doc = await client.heartbeat(http, {}, sent_mono_ns=time.monotonic_ns())
                break
            except SidecarError as err:
                assert err.status == 401 and time.monotonic() < deadline, err
                await asyncio.sleep(0.1)
        assert doc["node"] == "n0"
    finally:
        await client.close()
