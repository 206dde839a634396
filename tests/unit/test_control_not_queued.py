"""A large write gives the event loop a turn between slices of its parse, so control requests
(the control plane's lease heartbeat) are served while it is in progress, not after it
(issue 13, "No stalls").

Structural: the tests count the write's turns (an injected pause) and where in the write the
heartbeat was answered. Nothing is timed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engram_sidecar import api
from engram_sidecar.config import load_config
from engram_sidecar.node import Node

SPACE = "tenant-a"
TOKEN = "t" * 32
ENTRIES = 5_000
PAUSED = asyncio.Event()  # the write gave the loop its first turn: it is being parsed now


def _ndjson(n: int) -> bytes:
    return "".join(f'{{"i":{i},"pad":"{"x" * 60}"}}\n' for i in range(n)).encode()


async def test_the_parse_pauses_after_every_slice_and_never_parses_more_between_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed = 0
    real = api.load_json

    def counting(raw: bytes | str) -> Any:
        nonlocal parsed
        parsed += 1
        return real(raw)

    monkeypatch.setattr(api, "load_json", counting)
    at_pause: list[int] = []

    async def pause() -> None:
        at_pause.append(parsed)

    out = await api.parse_entries_in_slices(
        _ndjson(ENTRIES), "application/x-ndjson", None, ENTRIES, pause=pause
    )
    assert len(out) == ENTRIES
    steps = [b - a for a, b in zip([0, *at_pause], [*at_pause, parsed], strict=True)]
    assert api.PARSE_SLICE <= 256, "slices of more than 256 entries hold the loop for ms"
    assert len(at_pause) >= ENTRIES // api.PARSE_SLICE - 1
    assert max(steps) <= api.PARSE_SLICE, "a slice parsed more entries than PARSE_SLICE"
    # The JSON body's entries are compacted in slices too.
    doc = {"entries": [{"payload": {"i": i}} for i in range(ENTRIES)]}
    at_pause.clear()
    out = await api.parse_entries_in_slices(
        json.dumps(doc).encode(), "application/json", None, ENTRIES, pause=pause
    )
    assert len(out) == ENTRIES and len(at_pause) >= ENTRIES // api.PARSE_SLICE - 1


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Node, list[str]]]:
    secret = tmp_path / "secret"
    secret.write_text(TOKEN)
    cfg = load_config(
        flags={
            "node": "n0",
            "data_dir": str(tmp_path / "data"),
            "secret_file": str(secret),
            "fsync": "none",
        },
        env={},
    )
    node = Node(cfg)
    events: list[str] = []
    PAUSED.clear()

    async def pause() -> None:
        events.append("write: slice")
        PAUSED.set()
        await asyncio.sleep(0)

    client: TestClient[Any, Any] = TestClient(
        TestServer(api.make_app(node, pause=pause), host="127.0.0.1")
    )
    await client.start_server()
    try:
        yield client, node, events
    finally:
        await client.close()
        await node.stop()


async def test_a_lease_heartbeat_is_answered_while_a_large_write_is_still_parsing(
    served: tuple[TestClient[Any, Any], Node, list[str]],
) -> None:
    client, node, events = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    doc = {"epoch": 1, "primary": {"node": "n0", "address": "127.0.0.1:9"}}
    r = await client.put(f"/v1/spaces/{SPACE}/assignment", data=json.dumps(doc), headers=auth)
    assert r.status == 200, await r.text()
    sp = node.lookup(SPACE)
    assert sp is not None
    sp.membership.grant_lease(sp.clock())

    async def write() -> int:
        w = await client.post(
            f"/v1/spaces/{SPACE}/entries",
            data=_ndjson(ENTRIES),
            headers={"Content-Type": "application/x-ndjson"},
        )
        events.append("write: answered")
        return w.status

    writing = asyncio.create_task(write())
    paused = asyncio.create_task(PAUSED.wait())
    await asyncio.wait({writing, paused}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    paused.cancel()
    assert PAUSED.is_set() and not writing.done(), "the write never gave the loop a turn"
    events.append("lease: sent")
    body = {
        "control_plane": "cp",
        "sent_mono_ns": time.monotonic_ns(),
        "epochs": {SPACE: 1},
    }
    lease = await client.post("/v1/lease", data=json.dumps(body), headers=auth)
    events.append("lease: answered")
    assert lease.status == 200, await lease.text()
    assert await asyncio.wait_for(writing, 30) == 200

    sent, answered = events.index("lease: sent"), events.index("lease: answered")
    assert answered < events.index("write: answered"), "the heartbeat waited for the whole write"
    slices_while_waiting = events[sent:answered].count("write: slice")
    slices = events.count("write: slice")
    # The heartbeat took a few turns of the loop, not the rest of the write's parse.
    assert slices_while_waiting < slices // 4, (slices_while_waiting, slices)
    assert events[answered:].count("write: slice") > 0
