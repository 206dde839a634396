"""How the control plane's sidecar client reads an answer body (engram_contract.client._decode):
orjson for speed, the standard library for whatever orjson refuses, None for what neither reads,
so a faster decoder never turns an answer the operator used to read into "no answer"."""

from __future__ import annotations

import json

import pytest

from engram_contract.client import _decode


def test_json_objects_decode_as_the_standard_library_reads_them() -> None:
    doc = {"node": "n1", "spaces": {"s": {"lag_seconds": 0.25, "epoch": 3, "fenced": None}}}
    raw = json.dumps(doc).encode()
    assert _decode(raw) == doc == json.loads(raw)
    assert _decode('{"name": "é"}'.encode()) == {"name": "é"}


@pytest.mark.parametrize(
    "raw",
    [b'{"lag_seconds": NaN}', b'{"lag_seconds": Infinity}', '{"a": 1}'.encode("utf-16")],
)
def test_what_orjson_refuses_and_json_reads_still_decodes(raw: bytes) -> None:
    assert _decode(raw) is not None
    assert repr(_decode(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"  \n", b"<html>502</html>", b'{"cut": ', b"\xff\xfe\xfd"])
def test_empty_or_not_json_is_none(raw: bytes) -> None:
    assert _decode(raw) is None
