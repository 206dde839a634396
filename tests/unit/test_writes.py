"""The binary write clients' own parts (`engram_contract.writes`); against real sidecars in
tests/integration/test_binary_writes.py."""

from __future__ import annotations

import json

import pytest

from engram_contract.formats.records import decode_records
from engram_contract.writes import (
    EntriesClient,
    SyncEntriesClient,
    WriteError,
    WriteResult,
    encode_body,
    entries_path,
    parse_answer,
)


def test_encode_body_takes_payloads_or_typed_records() -> None:
    body = encode_body([b"a", b"bc"], entry_type=3)
    assert [(t, bytes(p)) for t, p in decode_records(body)] == [(3, b"a"), (3, b"bc")]
    body = encode_body([(2, b"x"), (6, b"")])
    assert [(t, bytes(p)) for t, p in decode_records(body)] == [(2, b"x"), (6, b"")]
    with pytest.raises(ValueError, match="at least one record"):
        encode_body([])


def test_parse_answer_success_and_errors() -> None:
    ok = json.dumps({"first_sequence": 4, "last_sequence": 9, "epoch": 2}).encode()
    assert parse_answer(200, ok, where="w") == WriteResult(4, 9, 2)
    moved = {"error": "not_primary", "message": "n1 is not", "primary": "10.0.0.1:8080"}
    with pytest.raises(WriteError) as err:
        parse_answer(421, json.dumps(moved).encode(), where="w")
    assert (err.value.status, err.value.code, err.value.primary) == (
        421,
        "not_primary",
        moved["primary"],
    )
    with pytest.raises(WriteError) as err:
        parse_answer(502, b"<html>bad gateway</html>", where="w")
    assert (err.value.status, err.value.code, err.value.body) == (502, "", None)
    with pytest.raises(WriteError):
        parse_answer(200, b'{"first_sequence": 1}', where="w")  # an answer without the fields


def test_addresses_and_paths() -> None:
    assert EntriesClient("127.0.0.1:8080").base_url == "http://127.0.0.1:8080"
    assert SyncEntriesClient("http://h:81/").base_url == "http://h:81"
    with pytest.raises(ValueError, match="not an http"):
        SyncEntriesClient("ftp://h:1")
    assert entries_path("tenant-a") == "/v1/spaces/tenant-a/entries"


def test_sync_client_without_a_server_raises_write_error() -> None:
    from engram_contract.launcher import free_port

    with (
        SyncEntriesClient(f"127.0.0.1:{free_port()}", timeout=2.0) as c,
        pytest.raises(WriteError) as err,
    ):
        c.write("tenant-a", [b"x"])
    assert err.value.status == 0
