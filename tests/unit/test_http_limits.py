"""HTTP input and limits (engram_sidecar.api): a byte cap on GET …/entries, JSON of any depth
refused as 400, numbers range-checked before they reach the disk or the wire, NDJSON lines
size-checked like JSON entries, and config that keeps every request within one frame.

Against the real aiohttp app on a real Node (no replication peers), through aiohttp's test
client on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engram_contract.errors import ConfigError
from engram_sidecar import api
from engram_sidecar.config import BATCH_BODY_RESERVE, batch_body_bytes, load_config
from engram_sidecar.node import Node

SPACE = "tenant-a"
TOKEN = "t" * 32
DEEP = "[" * 100_000  # deeper than any recursion limit


@dataclass
class Api:
    client: TestClient[Any, Any]
    node: Node

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def assign(self, epoch: Any = 1) -> tuple[int, Any]:
        doc = {"epoch": epoch, "primary": {"node": "n0", "address": "127.0.0.1:9"}}
        r = await self.client.put(
            f"/v1/spaces/{SPACE}/assignment", data=json.dumps(doc), headers=self.auth
        )
        return r.status, await r.json()

    def grant(self) -> None:
        """Vouch for the primary's write lease, as a control-plane heartbeat would."""
        sp = self.node.lookup(SPACE)
        assert sp is not None
        sp.membership.grant_lease(sp.clock())

    async def post(self, body: str | bytes, content_type: str = "application/json") -> Any:
        self.grant()
        r = await self.client.post(
            f"/v1/spaces/{SPACE}/entries", data=body, headers={"Content-Type": content_type}
        )
        return r.status, await r.json()

    async def get(self, **params: Any) -> tuple[int, Any, int]:
        r = await self.client.get(
            f"/v1/spaces/{SPACE}/entries", params={k: str(v) for k, v in params.items()}
        )
        raw = await r.read()
        return r.status, json.loads(raw), len(raw)


@pytest.fixture
async def make_api(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Api] = []

    async def make(**flags: str) -> Api:
        secret = tmp_path / "secret"
        secret.write_text(TOKEN)
        cfg = load_config(
            flags={
                "node": "n0",
                "data_dir": str(tmp_path / f"data{len(made)}"),
                "secret_file": str(secret),
                "fsync": "none",
                **flags,
            },
            env={},
        )
        node = Node(cfg)
        client: TestClient[Any, Any] = TestClient(TestServer(api.make_app(node), host="127.0.0.1"))
        await client.start_server()
        made.append(Api(client, node))
        return made[-1]

    yield make
    for a in made:
        await a.client.close()
        await a.node.stop()


async def _assigned(make_api: Any, **flags: str) -> Api:
    a: Api = await make_api(**flags)
    status, body = await a.assign()
    assert status == 200, body
    return a


# ---- GET …/entries: a byte cap, cut at entry boundaries ----------------------------------------


async def _write(a: Api, n: int, pad: int) -> None:
    entries = [{"payload": {"i": i, "pad": "x" * pad}} for i in range(n)]
    status, body = await a.post(json.dumps({"entries": entries}))
    assert status == 200, body


async def test_get_entries_is_cut_at_max_bytes_and_says_where_to_continue(make_api: Any) -> None:
    a = await _assigned(make_api)
    await _write(a, 50, pad=1000)
    status, doc, size = await a.get(max_bytes=5000, limit=10_000)
    assert status == 200, doc
    got = [e["sequence"] for e in doc["entries"]]
    assert got == [1, 2, 3, 4]  # each entry encodes to a little over 1000 bytes
    assert size < 5000 + 200  # the cap, plus the envelope
    assert (doc["next_sequence"], doc["more"], doc["last_sequence"]) == (5, True, 50)
    seen = got
    for _ in range(50):  # page to the end by next_sequence
        if not doc["more"]:
            break
        status, doc, _ = await a.get(**{"from": doc["next_sequence"], "max_bytes": 5000})
        assert status == 200, doc
        seen += [e["sequence"] for e in doc["entries"]]
    assert seen == list(range(1, 51))
    assert [e["payload"]["i"] for e in doc["entries"]][-1] == 49
    assert doc["next_sequence"] == 51


async def test_get_entries_default_cap_is_max_response_bytes(make_api: Any) -> None:
    a = await _assigned(make_api, max_response_bytes="20000")
    await _write(a, 60, pad=1000)
    status, doc, size = await a.get(limit=10_000)
    assert status == 200
    assert 15 <= len(doc["entries"]) < 20 and size < 20_000 + 200
    assert doc["more"] is True
    status, doc, _ = await a.get(max_bytes=20_001)
    assert status == 400 and doc["error"] == "bad_request"
    assert "max_bytes must be 1..20000 (max_response_bytes)" in doc["message"]


async def test_get_entries_returns_one_entry_larger_than_max_bytes(make_api: Any) -> None:
    a = await _assigned(make_api)
    await _write(a, 3, pad=3000)
    status, doc, _ = await a.get(max_bytes=100)
    assert status == 200
    assert [e["sequence"] for e in doc["entries"]] == [1]  # progress, never an empty page
    assert (doc["next_sequence"], doc["more"]) == (2, True)


async def test_get_entries_past_the_end_says_where_to_continue(make_api: Any) -> None:
    a = await _assigned(make_api)
    await _write(a, 2, pad=10)
    status, doc, _ = await a.get(**{"from": 3})
    assert status == 200
    assert doc == {"entries": [], "last_sequence": 2, "next_sequence": 3, "more": False}


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"max_bytes": "0"}, "max_bytes must be 1.."),
        ({"max_bytes": "lots"}, "max_bytes must be an integer"),
        ({"from": str(2**63)}, "from must be at most"),
        ({"from": "0"}, "from must be >= 1 and limit 1..10000"),
    ],
)
async def test_get_entries_refuses_bad_parameters(
    make_api: Any, params: dict[str, str], fragment: str
) -> None:
    a = await _assigned(make_api)
    status, doc, _ = await a.get(**params)
    assert status == 400 and doc["error"] == "bad_request"
    assert fragment in doc["message"]


async def test_get_entries_serves_a_deeply_nested_stored_payload_as_base64(
    make_api: Any,
) -> None:
    a = await _assigned(make_api)
    deep = (DEEP + "]" * 100_000).encode()
    body = {"entries": [{"payload": None, "payload_b64": base64.b64encode(deep).decode()}]}
    status, doc = await a.post(json.dumps(body))
    assert status == 200, doc
    status, doc, _ = await a.get()
    assert status == 200, doc
    assert base64.b64decode(doc["entries"][0]["payload_b64"]) == deep


# ---- JSON of any depth is a 400 ----------------------------------------------------------------


async def test_deeply_nested_json_write_body_is_a_400(make_api: Any) -> None:
    a = await _assigned(make_api)
    status, doc = await a.post(DEEP)
    assert status == 400 and doc["error"] == "bad_request", doc
    assert "nested deeper than 128 levels" in doc["message"]


async def test_deeply_nested_ndjson_line_is_a_400(make_api: Any) -> None:
    a = await _assigned(make_api)
    status, doc = await a.post('{"ok": 1}\n' + DEEP + "\n", "application/x-ndjson")
    assert status == 400 and doc["error"] == "bad_request", doc
    assert doc["message"].startswith("line 2: not JSON: nested deeper than 128 levels")


async def test_payload_nested_past_the_limit_is_refused_and_at_it_accepted(make_api: Any) -> None:
    a = await _assigned(make_api)
    # The document's own two levels ({"entries": [{...}]}) count, and the entry object's.
    at_limit = "[" * 125 + "]" * 125
    status, doc = await a.post('{"entries": [{"payload": ' + at_limit + "}]}")
    assert status == 200, doc
    over = "[" * 126 + "]" * 126
    status, doc = await a.post('{"entries": [{"payload": ' + over + "}]}")
    assert status == 400, doc


def test_load_json_reads_what_json_loads_reads_and_bounds_nesting_past_bracket_counts() -> None:
    # load_json skips the nesting walk when a document has no more brackets than the limit;
    # brackets inside strings only make it walk, and any encoding json.loads detects still reads.
    many_in_strings = json.dumps({"a": "[" * 500, "b": ["{" * 500, [1, [2]]]})
    assert api.load_json(many_in_strings) == json.loads(many_in_strings)
    assert api.load_json(many_in_strings.encode()) == json.loads(many_in_strings)
    for codec in ("utf-8-sig", "utf-16", "utf-32"):
        raw = '{"payload": ["é", 1.5, null]}'.encode(codec)
        assert api.load_json(raw) == json.loads(raw), codec
    at_limit = "[" * api.MAX_JSON_DEPTH + "]" * api.MAX_JSON_DEPTH
    assert api.load_json(at_limit + " " * 10) == json.loads(at_limit)
    # Deep, with padding strings that push the bracket count up either way.
    over = '["[[["' + ", " + "[" * api.MAX_JSON_DEPTH + "]" * api.MAX_JSON_DEPTH + "]"
    with pytest.raises(api.JsonError, match="nested deeper than 128 levels"):
        api.load_json(over)
    with pytest.raises(api.JsonError, match="NaN is not a JSON value"):
        api.load_json(b"[NaN]")
    with pytest.raises(api.JsonError):
        api.load_json(b"\xff\xfe{")


async def test_nan_and_infinity_are_not_json(make_api: Any) -> None:
    a = await _assigned(make_api)
    status, doc = await a.post("NaN\n", "application/x-ndjson")
    assert status == 400 and "NaN is not a JSON value" in doc["message"], doc
    status, doc = await a.post('{"entries": [{"payload": Infinity}]}')
    assert status == 400 and "Infinity is not a JSON value" in doc["message"], doc
    status, doc = await a.post('{"entries": [{"payload": [1e400]}]}')
    assert status == 400 and doc["message"].startswith("entries[0].payload: Out of range"), doc


async def test_stored_number_beyond_a_double_is_served_as_base64(make_api: Any) -> None:
    a = await _assigned(make_api)
    status, doc = await a.post('{"x": 1e400}\n', "application/x-ndjson")  # stored as sent
    assert status == 200, doc
    r = await a.client.get(f"/v1/spaces/{SPACE}/entries")
    text = await r.text()
    assert "Infinity" not in text
    entry = json.loads(text)["entries"][0]
    assert base64.b64decode(entry["payload_b64"]) == b'{"x": 1e400}'


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", f"/v1/spaces/{SPACE}/assignment"),
        ("POST", "/v1/lease"),
        ("POST", f"/v1/spaces/{SPACE}/fence"),
    ],
)
async def test_deeply_nested_json_control_plane_bodies_are_a_400(
    make_api: Any, method: str, path: str
) -> None:
    a = await _assigned(make_api)
    r = await a.client.request(method, path, data=DEEP, headers=a.auth)
    doc = await r.json()
    assert r.status == 400 and doc["error"] == "bad_request", doc


# ---- numbers bound for the disk or the wire ----------------------------------------------------


@pytest.mark.parametrize("epoch", [2**70, 2**64, 2**63, 0, -1, True, 1.5])
async def test_assignment_epoch_outside_int64_is_a_400(make_api: Any, epoch: Any) -> None:
    a = await make_api()
    status, doc = await a.assign(epoch)
    assert status == 400 and doc["error"] == "bad_request", doc
    assert "epoch must be an integer 1..9223372036854775807" in doc["message"]
    assert a.node.lookup(SPACE) is None  # nothing was created or saved


async def test_assignment_epoch_at_int64_max_is_accepted_and_writable(make_api: Any) -> None:
    a = await make_api()
    status, doc = await a.assign(2**63 - 1)
    assert status == 200, doc
    status, doc = await a.post('{"entries": [{"payload": 1}]}')
    assert status == 200 and doc["epoch"] == 2**63 - 1, doc


# ---- payload and request sizes against the frame -----------------------------------------------


def test_ndjson_lines_get_the_payload_size_check_of_json_entries() -> None:
    line = json.dumps({"pad": "x" * 200}).encode()
    with pytest.raises(ValueError, match="line 2: payload over 100 bytes"):
        api._parse_entries(b"1\n" + line, "application/x-ndjson", None, 10, max_payload=100)
    body = json.dumps({"entries": [{"payload": {"pad": "x" * 200}}]}).encode()
    with pytest.raises(ValueError, match=r"entries\[0\]: payload over 100 bytes"):
        api._parse_entries(body, "application/json", None, 10, max_payload=100)
    assert api._parse_entries(line, "application/x-ndjson", None, 10, max_payload=len(line))


async def test_json_payload_that_grows_when_stored_past_a_frame_is_a_413(make_api: Any) -> None:
    frame = batch_body_bytes(4096, 4)
    a = await _assigned(
        make_api,
        max_request_bytes="4096",
        max_entries_per_request="4",
        max_frame_bytes=str(frame),
    )
    # 2 bytes of UTF-8 in the request, stored as the 6-byte escape \u00e9.
    body = json.dumps({"entries": [{"payload": "é" * 1900}]}, ensure_ascii=False).encode()
    assert len(body) <= 4096
    status, doc = await a.post(body)
    assert status == 413 and doc["error"] == "too_large", doc
    assert f"the limit is max_frame_bytes ({frame})" in doc["message"]
    sp = a.node.lookup(SPACE)
    assert sp is not None and sp.log.last_sequence == 0  # nothing written
    status, doc = await a.post(json.dumps({"entries": [{"payload": "e" * 1900}]}))
    assert status == 200, doc


def _config(**flags: str) -> Any:
    return load_config(flags={"node": "n0", **flags}, env={})


def test_config_defaults_fit_a_request_in_one_frame() -> None:
    cfg = _config()
    assert (
        batch_body_bytes(cfg.max_request_bytes, cfg.max_entries_per_request) <= cfg.max_frame_bytes
    )
    assert cfg.max_response_bytes == 8 * 1024 * 1024


def test_config_refuses_max_request_bytes_over_max_frame_bytes() -> None:
    with pytest.raises(ConfigError, match="a request's entries must fit one frame") as err:
        _config(max_request_bytes=str(32 * 1024 * 1024))
    assert "max_frame_bytes (16777216)" in str(err.value)
    assert f"64 × max_entries_per_request (10000) + {BATCH_BODY_RESERVE}" in str(err.value)


def test_config_request_rule_counts_the_entry_headers() -> None:
    frame = 1024 * 1024
    room = frame - 1000 * 64 - BATCH_BODY_RESERVE
    fits = {"max_frame_bytes": str(frame), "max_entries_per_request": "1000"}
    assert _config(max_request_bytes=str(room), **fits).max_request_bytes == room
    with pytest.raises(ConfigError, match="must be at most max_frame_bytes"):
        _config(max_request_bytes=str(room + 1), **fits)
    with pytest.raises(ConfigError, match="max_request_bytes"):
        _config(max_request_bytes=str(frame), max_frame_bytes=str(frame))


def test_config_refuses_a_zero_response_cap() -> None:
    with pytest.raises(ConfigError, match="max_response_bytes=0: must be greater than 0"):
        _config(max_response_bytes="0")
