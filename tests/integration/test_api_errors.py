"""The HTTP API's refusals, against real sidecars: each answers the error docs/api.md documents,
and none of them writes anything or changes the node's state.

Also a full disk, simulated for real on a small tmpfs (skipped where `mount` is not permitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.cluster import (
    Cluster,
    Response,
    WriteLog,
    check_payloads,
    payloads,
    write_batches,
)

pytestmark = pytest.mark.integration

MAX_REQUEST_BYTES = 4096
MAX_ENTRIES = 50
SPACE = "romeo"


async def _two_nodes(cluster: Cluster) -> None:
    """n0 leads SPACE with replica n1; small request limits on n0."""
    cluster.add_node("n0", max_request_bytes=MAX_REQUEST_BYTES, max_entries_per_request=MAX_ENTRIES)
    cluster.add_node("n1")
    await cluster.start()
    await cluster.assign(SPACE, "n0", ["n1"])


def _is_error(r: Response, status: int, code: str, fragment: str = "") -> None:
    assert r.status == status, f"expected {status} {code}, got {r}"
    assert isinstance(r.body, dict), r
    assert r.body.get("error") == code, r
    assert isinstance(r.body.get("message"), str) and r.body["message"], r
    assert fragment in r.body["message"], f"{fragment!r} not in {r.body['message']!r}"


async def _post(cluster: Cluster, body: bytes | str, content_type: str, **kw: Any) -> Response:
    return await cluster.request(
        "POST",
        "n0",
        f"/v1/spaces/{SPACE}/entries",
        data=body,
        headers={"Content-Type": content_type},
        **kw,
    )


BAD_JSON_BODIES: list[tuple[str, str, str]] = [
    # (id, body, fragment of the documented message)
    ("bad-json", '{"entries": [', "body is not valid JSON"),
    ("not-json-at-all", "entries=1", "body is not valid JSON"),
    ("top-level-list", "[]", 'body must be {"entries"'),
    ("entries-not-list", '{"entries": {}}', 'body must be {"entries"'),
    ("no-entries-key", '{"items": []}', 'body must be {"entries"'),
    ("entry-not-object", '{"entries": [1]}', "entries[0] must be an object with a payload"),
    ("no-payload", '{"entries": [{"type": "episode"}]}', "must be an object with a payload"),
    ("unknown-field", '{"entries": [{"payload": 1, "id": 3}]}', "entries[0]: unknown field(s) id"),
    ("unknown-type", '{"entries": [{"type": "note", "payload": 1}]}', "entries[0].type must be"),
    ("type-not-string", '{"entries": [{"type": 1, "payload": 1}]}', "entries[0].type must be"),
    ("empty-entries", '{"entries": []}', "no entries in the request"),
    (
        "bad-base64",
        '{"entries": [{"payload": null, "payload_b64": "!!not base64!!"}]}',
        "entries[0].payload_b64 is not base64",
    ),
    (
        "base64-not-string",
        '{"entries": [{"payload": null, "payload_b64": 12}]}',
        "entries[0].payload_b64 is not base64",
    ),
    (
        "second-entry-bad",
        '{"entries": [{"payload": 1}, {"type": "nope", "payload": 2}]}',
        "entries[1].type must be",
    ),
    (
        "too-many-entries",
        json.dumps({"entries": [{"payload": i} for i in range(MAX_ENTRIES + 1)]}),
        f"{MAX_ENTRIES + 1} entries in one request; the limit is {MAX_ENTRIES}",
    ),
]


@pytest.mark.timeout(60)
async def test_malformed_writes_are_refused_and_write_nothing(cluster: Cluster) -> None:
    await _two_nodes(cluster)
    # Something valid first, so "nothing changed" is checked against a non-empty log.
    ok = await cluster.write_json("n0", SPACE, [{"type": "episode", "payload": {"k": 1}}])
    assert ok.status == 200, ok
    before = await cluster.space_view("n0", SPACE)

    for name, body, fragment in BAD_JSON_BODIES:
        r = await _post(cluster, body, "application/json")
        assert r.status == 400, f"{name}: {r}"
        _is_error(r, 400, "bad_request", fragment)

    ndjson_cases: list[tuple[str, str, dict[str, str], str]] = [
        ("bad-line", '{"a": 1}\n{"a": \n', {}, "line 2: not JSON"),
        ("garbage-line", '{"a": 1}\nnope\n', {}, "line 2: not JSON"),
        ("blank-only", "\n\n  \n", {}, "no entries in the request"),
        ("empty", "", {}, "no entries in the request"),
        ("unknown-type", '{"a": 1}\n', {"type": "foo"}, "type query parameter must be one of"),
        (
            "too-many",
            "".join(f'{{"i": {i}}}\n' for i in range(MAX_ENTRIES + 1)),
            {},
            "the limit is",
        ),
    ]
    for name, body, params, fragment in ndjson_cases:
        r = await _post(cluster, body, "application/x-ndjson", params=params or None)
        assert r.status == 400, f"ndjson {name}: {r}"
        _is_error(r, 400, "bad_request", fragment)

    after = await cluster.space_view("n0", SPACE)
    assert after["last_sequence"] == before["last_sequence"] == 1, (before, after)
    errors = await cluster.metric("n0", "engram_replication_write_errors_total")
    assert errors == 0, "a 400 is refused before the write path; it is not a write error"
    # The node still works, and the replica got exactly the valid entries.
    again = await cluster.write_json(
        "n0", SPACE, [{"type": "checkpoint", "payload": None, "payload_b64": "AAECAwQ="}]
    )
    assert again.status == 200 and again.body["first_sequence"] == 2, again
    await cluster.wait_replicated(SPACE, "n0", timeout=15)
    cluster.assert_wal_identical(SPACE, "n0", ["n1"])
    cluster.assert_wal_valid("n1", SPACE, 2)
    stored = cluster["n1"].wal_entries(SPACE)
    assert stored[1].payload == bytes([0, 1, 2, 3, 4]) and stored[1].entry_type == 5


@pytest.mark.timeout(60)
async def test_oversized_requests_get_413_and_write_nothing(cluster: Cluster) -> None:
    await _two_nodes(cluster)
    big = "".join(json.dumps({"i": i, "pad": "z" * 100}) + "\n" for i in range(45))
    assert len(big) > MAX_REQUEST_BYTES
    r = await _post(cluster, big, "application/x-ndjson")
    _is_error(r, 413, "too_large", f"request body over {MAX_REQUEST_BYTES} bytes")

    # Chunked (no Content-Length): the limit is enforced while reading.
    async def chunks() -> AsyncIterator[bytes]:
        data = big.encode()
        for k in range(0, len(data), 1000):
            yield data[k : k + 1000]
            await asyncio.sleep(0.005)

    async with cluster.session.post(
        cluster["n0"].url + f"/v1/spaces/{SPACE}/entries",
        data=chunks(),
        headers={"Content-Type": "application/x-ndjson"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 413 and body["error"] == "too_large", (resp.status, body)

    view = await cluster.space_view("n0", SPACE)
    assert view["last_sequence"] == 0, view

    # Just under the limit, and sent in pieces, is accepted whole (not cut at a chunk boundary).
    fits = "".join(json.dumps({"i": i, "pad": "z" * 50}) + "\n" for i in range(MAX_ENTRIES))
    assert len(fits) <= MAX_REQUEST_BYTES

    async def fit_chunks() -> AsyncIterator[bytes]:
        data = fits.encode()
        for k in range(0, len(data), 700):
            yield data[k : k + 700]
            await asyncio.sleep(0.01)

    async with cluster.session.post(
        cluster["n0"].url + f"/v1/spaces/{SPACE}/entries",
        data=fit_chunks(),
        headers={"Content-Type": "application/x-ndjson"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert (body["first_sequence"], body["last_sequence"]) == (1, MAX_ENTRIES), body
    stored = [e.payload for e in cluster["n0"].wal_entries(SPACE)]
    assert stored == [ln.encode() for ln in fits.splitlines()]


@pytest.mark.timeout(60)
async def test_large_body_under_the_limit_is_read_whole(cluster: Cluster) -> None:
    """A multi-megabyte NDJSON body arrives in many TCP reads; all of it is written, or none."""
    cluster.add_node("n0")
    await cluster.start()
    await cluster.assign("sierra", "n0", [])
    sent = payloads("sierra", 0, 8_000, pad=300)
    r = await cluster.write_ndjson("n0", "sierra", sent, timeout=30)
    assert r.status == 200, r
    assert (r.body["first_sequence"], r.body["last_sequence"]) == (1, 8_000), r
    log = WriteLog(acked=[(1, 8_000, sent)])
    check_payloads(cluster, "n0", "sierra", log)


@pytest.mark.timeout(60)
async def test_unknown_and_invalid_spaces(cluster: Cluster) -> None:
    await _two_nodes(cluster)
    entry = {"entries": [{"payload": {"x": 1}}]}
    for path in ("", "/entries", "/epochs"):
        r = await cluster.request("GET", "n0", f"/v1/spaces/tenant-zz{path}")
        _is_error(r, 404, "unknown_space", "'tenant-zz' is not assigned to node n0")
    r = await cluster.request("POST", "n0", "/v1/spaces/tenant-zz/entries", json_body=entry)
    _is_error(r, 404, "unknown_space")

    for bad in ("AB", "ab", "Tenant-A", "bad.dot", "x" * 65, "sp%20ace", "a%2Fb"):
        for method, path in (("GET", ""), ("GET", "/entries"), ("POST", "/entries")):
            r = await cluster.request(
                method,
                "n0",
                f"/v1/spaces/{bad}{path}",
                json_body=entry if method == "POST" else None,
            )
            # An encoded slash never reaches the route (aiohttp: 404); anything else is ours.
            if bad == "a%2Fb" and r.status == 404:
                continue
            _is_error(r, 400, "invalid_space", "use 3 to 64 characters from [a-z0-9_-]")
        r = await cluster.put_assignment("n0", bad, cluster.assignment_doc("n0", ["n1"]))
        if bad == "a%2Fb" and r.status == 404:
            continue
        _is_error(r, 400, "bad_request", "invalid memory space id")
    status = (await cluster.request("GET", "n0", "/v1/status")).body
    assert set(status["spaces"]) == {SPACE}, "a refused request created a space"


@pytest.mark.timeout(60)
async def test_reads_with_bad_params(cluster: Cluster) -> None:
    await _two_nodes(cluster)
    r = await cluster.write_ndjson("n0", SPACE, [{"i": i} for i in range(5)])
    assert r.status == 200, r
    base = f"/v1/spaces/{SPACE}/entries"
    for params, fragment in [
        ({"from": "abc"}, "from and limit must be integers"),
        ({"limit": "ten"}, "from and limit must be integers"),
        ({"from": "1.5"}, "from and limit must be integers"),
        ({"from": "0"}, "from must be >= 1 and limit 1..10000"),
        ({"from": "-3"}, "from must be >= 1 and limit 1..10000"),
        ({"limit": "0"}, "from must be >= 1 and limit 1..10000"),
        ({"limit": "10001"}, "from must be >= 1 and limit 1..10000"),
    ]:
        got = await cluster.request("GET", "n0", base, params=params)
        _is_error(got, 400, "bad_request", fragment)
    # Valid reads, on the primary and on the replica.
    await cluster.wait_replicated(SPACE, "n0", timeout=15)
    for node in ("n0", "n1"):
        got = await cluster.request("GET", node, base, params={"from": "2", "limit": "2"})
        assert got.status == 200, got
        assert [e["sequence"] for e in got.body["entries"]] == [2, 3]
        assert [e["payload"] for e in got.body["entries"]] == [{"i": 1}, {"i": 2}]
        assert got.body["last_sequence"] == 5
        past = await cluster.request("GET", node, base, params={"from": "99"})
        assert past.status == 200 and past.body["entries"] == [], past


@pytest.mark.timeout(60)
async def test_write_to_a_replica_is_misdirected(cluster: Cluster) -> None:
    await _two_nodes(cluster)
    r = await cluster.write_json("n1", SPACE, [{"payload": {"x": 1}}])
    _is_error(r, 421, "not_primary", "node n1 is not the primary of space romeo; n0 is")
    assert r.body["primary"] == cluster["n0"].http
    assert (await cluster.space_view("n1", SPACE))["last_sequence"] == 0
    assert (await cluster.space_view("n0", SPACE))["last_sequence"] == 0
    assert await cluster.metric("n1", "engram_replication_write_errors_total") == 1


# ---- assignments -------------------------------------------------------------------------------

_STABLE_FIELDS = ("role", "epoch", "primary", "ack_policy", "last_sequence")


async def _stable(cluster: Cluster, node: str, space: str) -> dict[str, Any]:
    view = await cluster.space_view(node, space)
    out = {k: view[k] for k in _STABLE_FIELDS}
    out["replicas"] = sorted(view.get("replicas", {}))
    return out


@pytest.mark.timeout(60)
async def test_refused_assignments_change_nothing(cluster: Cluster) -> None:
    await cluster.start_nodes(3)
    space = "tango"
    await cluster.assign(space, "n0", ["n1"], epoch=2, ack_policy="async")
    r = await cluster.write_json("n0", space, [{"payload": {"k": 1}}])
    assert r.status == 200, r
    await cluster.wait_replicated(space, "n0", timeout=15)
    before = {n: await _stable(cluster, n, space) for n in ("n0", "n1")}
    saved = {n: (cluster[n].space_dir(space) / "assignment.json").read_bytes() for n in before}
    takeover = cluster.assignment_doc("n1", ["n0"], epoch=1)  # a stale epoch
    same_epoch = cluster.assignment_doc("n1", ["n0"], epoch=2)  # new primary, same epoch

    cases: list[tuple[str, str, Any, str | None, int, str, str]] = [
        # (what, node, body, token, status, code, fragment)
        ("no token", "n0", takeover, "", 401, "unauthorized", "needs Authorization: Bearer"),
        ("wrong token", "n0", takeover, "not-the-token", 401, "unauthorized", "Bearer"),
        ("token of no one", "n1", takeover, "x" * 48, 401, "unauthorized", "Bearer"),
        ("stale epoch", "n0", takeover, None, 409, "stale_epoch", "is older than epoch 2"),
        ("stale epoch", "n1", takeover, None, 409, "stale_epoch", "is older than epoch 2"),
        ("same epoch", "n0", same_epoch, None, 409, "stale_epoch", "a new primary needs a new"),
        ("same epoch", "n1", same_epoch, None, 409, "stale_epoch", "a new primary needs a new"),
        ("epoch 0", "n0", {**takeover, "epoch": 0}, None, 400, "bad_request", "epoch must be"),
        ("bool epoch", "n0", {**takeover, "epoch": True}, None, 400, "bad_request", "epoch"),
        ("unknown field", "n0", {**takeover, "foo": 1}, None, 400, "bad_request", "foo"),
        (
            "bad policy",
            "n0",
            {**takeover, "epoch": 3, "ackPolicy": "all"},
            None,
            400,
            "bad_request",
            "ackPolicy must be one of",
        ),
        (
            "bad address",
            "n0",
            {**takeover, "epoch": 3, "primary": {"node": "n1", "address": "nohost"}},
            None,
            400,
            "bad_request",
            "primary.address must be host:port",
        ),
        (
            "node twice",
            "n0",
            {**cluster.assignment_doc("n1", ["n1"], epoch=3)},
            None,
            400,
            "bad_request",
            "appears twice",
        ),
        ("not an object", "n0", [1, 2], None, 400, "bad_request", "must be a JSON object"),
    ]
    for what, node, body, token, status, code, fragment in cases:
        r = await cluster.put_assignment(node, space, body, token=token)
        assert r.status == status, f"{what} on {node}: {r}"
        _is_error(r, status, code, fragment)
    # Not JSON at all, with the right token.
    r = await cluster.request(
        "PUT",
        "n0",
        f"/v1/spaces/{space}/assignment",
        data="{not json",
        headers={"Authorization": f"Bearer {cluster['n0'].token}"},
    )
    _is_error(r, 400, "bad_request")
    # Without a token, a new space is not created either.
    r = await cluster.put_assignment("n2", "uniform", takeover, token="")
    _is_error(r, 401, "unauthorized")
    r = await cluster.request("GET", "n2", "/v1/spaces/uniform")
    _is_error(r, 404, "unknown_space")

    for n in ("n0", "n1"):
        assert await _stable(cluster, n, space) == before[n], f"{n} changed"
        assert (cluster[n].space_dir(space) / "assignment.json").read_bytes() == saved[n]
    # The assignment in force is idempotent, and the space still replicates.
    r = await cluster.put_assignment("n0", space, cluster.assignment_doc("n0", ["n1"], epoch=2))
    assert r.status == 200 and r.body["changed"] is False, r
    w = await cluster.write_json("n0", space, [{"payload": {"k": 2}}])
    assert w.status == 200 and w.body["epoch"] == 2, w
    await cluster.wait_replicated(space, "n0", timeout=15)
    cluster.assert_wal_identical(space, "n0", ["n1"])


# ---- a full disk (real ENOSPC on a small tmpfs) -------------------------------------------------

TMPFS_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted under the test's tmp dir; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs here ({err}; {detail.decode(errors='replace')})")
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10, check=False)


def fill(directory: Path, *, leave: int = 0) -> list[Path]:
    """Fill the filesystem with 4 KiB files until ENOSPC; then free `leave` bytes of them."""
    files: list[Path] = []
    block = b"\xa5" * 4096
    for i in range(TMPFS_BYTES // 4096 + 64):  # bounded: more blocks than the disk holds
        p = directory / f"fill-{i:05d}"
        try:
            with p.open("wb") as f:
                f.write(block)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            p.unlink(missing_ok=True)
            break
        files.append(p)
    else:
        raise AssertionError("the tmpfs never filled up")
    freed = 0
    while freed < leave and files:
        files.pop().unlink()
        freed += 4096
    return files


@pytest.mark.timeout(60)
async def test_full_disk_refuses_writes_without_partial_entries(
    small_disk: Path, cluster: Cluster
) -> None:
    cluster.add_node("n0", data_dir=small_disk / "n0", segment_bytes=64 * 1024)
    await cluster.start()
    space = "victor"
    await cluster.assign(space, "n0", [])
    log = WriteLog()
    await write_batches(cluster, "n0", space, [payloads(space, b, 20) for b in range(3)], log)
    assert not log.refused and log.acked[-1][1] == 60
    filler = small_disk / "filler"
    filler.mkdir()

    # Nothing free, then a little (4 KiB) free: a ~16 KiB write starts and cannot finish.
    for leave in (0, 4096):
        for f in list(filler.iterdir()):
            f.unlink()
        fill(filler, leave=leave)
        for _ in range(2):
            r = await cluster.write_ndjson("n0", space, payloads(space, 99, 100, pad=100))
            _is_error(r, 503, "wal_error", "the write was not acknowledged")
        view = await cluster.space_view("n0", space)
        assert view["last_sequence"] == 60, view
        cluster.assert_wal_valid("n0", space, 60)  # no partial entry on disk either
        assert view["wal_bytes"] == sum(len(b) for b in cluster["n0"].wal_segments(space).values())

    wal_errors = await cluster.metric(
        "n0", "engram_replication_write_errors_total", space=space, reason="wal"
    )
    assert wal_errors == 4

    for f in list(filler.iterdir()):
        f.unlink()
    await write_batches(cluster, "n0", space, [payloads(space, b, 20) for b in range(3, 6)], log)
    assert not log.refused, [str(r) for r in log.refused]
    log.check_tiles(120)
    cluster.assert_wal_valid("n0", space, 120)
    rc, out = cluster.wal_verify_cli("n0", space)
    assert rc == 0 and "victor: ok: 120 entries, sequences 1...120" in out, out
    check_payloads(cluster, "n0", space, log)
    # And the node restarts cleanly on that log.
    await cluster.restart("n0")
    assert (await cluster.space_view("n0", space))["last_sequence"] == 120


@pytest.mark.timeout(90)
async def test_full_disk_on_a_replica_then_catch_up(small_disk: Path, cluster: Cluster) -> None:
    """A replica whose disk is full applies nothing partial; once space is freed it catches up."""
    seg = 64 * 1024  # the same on every node: segments are compared file by file
    cluster.add_node("n0", io_timeout=1.0, segment_bytes=seg)
    cluster.add_node("n1", data_dir=small_disk / "n1", segment_bytes=seg)
    cluster.add_node("n2", segment_bytes=seg)
    await cluster.start()
    space = "whiskey"
    await cluster.assign(space, "n0", ["n1", "n2"])
    log = WriteLog()
    await write_batches(cluster, "n0", space, [payloads(space, 0, 50)], log)
    await cluster.wait_replicated(space, "n0", timeout=15)
    filler = small_disk / "filler"
    filler.mkdir()
    fill(filler, leave=4096)

    for b in range(1, 11):
        await write_batches(cluster, "n0", space, [payloads(space, b, 50, pad=100)], log)
    assert not log.refused, "async writes must not depend on a replica's disk"

    async def n1_stuck() -> bool:
        view = await cluster.space_view("n0", space)
        return view["replicas"]["n1"]["acked_sequence"] < view["last_sequence"] and (
            await cluster.metric(
                "n1", "engram_replication_nacks_total", direction="out", reason="INTERNAL"
            )
            > 0
        )

    await cluster.wait_until(n1_stuck, timeout=15, what="n1 to refuse batches (disk full)")
    held = cluster["n1"].wal_entries(space)  # raises on a partial entry
    assert held[-1].sequence < 550

    for f in list(filler.iterdir()):
        f.unlink()
    await cluster.wait_replicated(space, "n0", timeout=30)
    cluster.assert_wal_identical(space, "n0", ["n1", "n2"])
    cluster.assert_wal_valid("n1", space, 550)
    with contextlib.suppress(FileNotFoundError):
        filler.rmdir()
