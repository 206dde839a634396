"""Rotating the shared secret with real sidecar processes (docs/operations.md, "Rotate the
shared secret"): the secret file holds one key per line, the first one sent and every one
accepted, and it is re-read when it changes.

* Nodes at neighbouring steps of a rotation (old+new and new+old) replicate to each other.
* A running sidecar's control routes follow its file: a new key is accepted once the file holds
  it, an old one refused once the file drops it, with no restart.
* The control plane's client (`KeyFile.current_text`, as the operator uses it) sends the new key
  once its own file leads with it.
* The replication handshake follows the file too: a whole rotation, every node's file stepped
  through it with no restart, keeps replicating (new connections included), each node proves
  the new key once its file leads with it, and once the file holds only the new key a proof
  under the old one is refused.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tests.integration.cluster import Cluster

from engram_contract.client import SidecarClient, SidecarError
from engram_contract.formats.handshake import client_proof, server_proof
from engram_contract.formats.messages import NONCE_SIZE, Auth, Challenge, Hello
from engram_contract.ids import NodeName
from engram_contract.tokens import KeyFile
from engram_sidecar.replication.transport import read_frame

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


PROBE = NodeName("probe")


async def _handshake(cluster: Cluster, node: str, *, verify: str, prove: str) -> tuple[bool, bool]:
    """A hand-driven handshake with `node`'s replication listener: whether the node proved
    `verify` (the key it leads with), and whether it then accepted our proof under `prove`."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", cluster[node].replication_port), 5.0
    )
    try:
        nonce = os.urandom(NONCE_SIZE)
        writer.write(Hello(PROBE, nonce).encode())
        await writer.drain()
        ch = Challenge.from_frame(await asyncio.wait_for(read_frame(reader, max_body=4096), 5.0))
        leads = ch.proof == server_proof(
            verify.encode(),
            client_nonce=nonce,
            server_nonce=ch.nonce,
            server_node=ch.node,
            client_node=PROBE,
        )
        proof = client_proof(
            prove.encode(),
            client_nonce=nonce,
            server_nonce=ch.nonce,
            client_node=PROBE,
            server_node=ch.node,
        )
        writer.write(Auth(proof).encode())
        await writer.drain()
        answer = await asyncio.wait_for(read_frame(reader, max_body=4096), 5.0)
        return leads, answer.msg_type.name == "WELCOME"
    finally:
        writer.close()


async def _until_handshake(
    cluster: Cluster, node: str, *, verify: str, prove: str, want: tuple[bool, bool]
) -> None:
    deadline = time.monotonic() + RELOAD_BOUND
    while (got := await _handshake(cluster, node, verify=verify, prove=prove)) != want:
        assert time.monotonic() < deadline, f"{node}: handshake {got}, not {want}"
        await asyncio.sleep(0.2)


async def test_replication_handshake_follows_a_rotation_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    names = ("n0", "n1", "n2")
    files = {n: tmp_path / f"{n}.secret" for n in names}
    for n in names:
        _write(files[n], OLD)
        cluster.add_node(n, secret_file=files[n])
    await cluster.start(*names)
    pids = {n: cluster[n].pid for n in names}
    await cluster.assign("orders", "n1", ["n0", "n2"], ack_policy="quorum")
    written = 0

    async def write_and_replicate(primary: str) -> None:
        nonlocal written
        batch = [{"payload": {"i": written + i}} for i in range(20)]
        r = await cluster.write_json(primary, "orders", batch)
        assert r.status == 200, r
        written += len(batch)
        await cluster.wait_replicated("orders", primary, timeout=15)

    await write_and_replicate("n1")
    for n in names:  # before: the old key only
        assert await _handshake(cluster, n, verify=OLD, prove=OLD) == (True, True)
        assert await _handshake(cluster, n, verify=OLD, prove=NEW) == (True, False)

    # Step 1: old + new. Still leading with the old key; the new one is accepted too.
    for n in names:
        _write(files[n], OLD, NEW)
    for n in names:
        await _until_handshake(cluster, n, verify=OLD, prove=NEW, want=(True, True))
    await write_and_replicate("n1")

    # Step 2: new + old. Each node now proves the new key; both are accepted.
    for n in names:
        _write(files[n], NEW, OLD)
    for n in names:
        await _until_handshake(cluster, n, verify=NEW, prove=NEW, want=(True, True))
        assert await _handshake(cluster, n, verify=NEW, prove=OLD) == (True, True)
    # New connections between the nodes, made under the new keys: the primary moves to n0.
    await cluster.assign("orders", "n0", ["n1", "n2"], epoch=2, ack_policy="quorum")
    await write_and_replicate("n0")

    # Step 3: the new key only. A proof under the old one is refused from then on.
    for n in names:
        _write(files[n], NEW)
    for n in names:
        await _until_handshake(cluster, n, verify=NEW, prove=OLD, want=(True, False))
        assert await _handshake(cluster, n, verify=NEW, prove=NEW) == (True, True)
    await cluster.assign("orders", "n2", ["n0", "n1"], epoch=3, ack_policy="quorum")
    await write_and_replicate("n2")

    assert {n: cluster[n].pid for n in names} == pids, "a node restarted"
    cluster.assert_wal_identical("orders", "n2", ["n0", "n1"])
