"""Format numbers are declared once, in engram_contract.formats, and imported everywhere else.

A light guard, not a parser: in the code (not the comments or strings) of the benchmark, the
tests and both planes, no line that handles frames, entries or headers may type one of the
layouts' sizes or offsets as a literal. `frame.HEADER_SIZE`, `frame.BODY_LENGTH_OFFSET`,
`entry.HEADER_SIZE`, `entry.PAYLOAD_SIZE_OFFSET` and friends say what the number is, and move
with the format. A second check catches the entry's HEADER_SIZE counting frame bytes.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Callable
from pathlib import Path

import pytest

from engram_contract.formats import entry, frame

ROOT = Path(__file__).resolve().parents[2]
SCANNED = (
    ROOT / "bench" / "engram_bench",
    ROOT / "tests",
    ROOT / "sidecar" / "engram_sidecar",
    ROOT / "operator" / "engram_operator",
    ROOT / "contract" / "engram_contract",
)
# Where the numbers are declared, and the tests that pin the published layout (golden vectors,
# docs/wire-format.md and docs/wal-format.md tables) on purpose.
DECLARED = ROOT / "contract" / "engram_contract" / "formats"
PINNING = {
    "tests/unit/test_wire.py",
    "tests/unit/test_entry.py",
    "tests/unit/test_docs.py",
    "tests/unit/test_format_numbers.py",
    # Engram's own layout, built and read field by field, independent of formats.engram_wal.
    "tests/unit/test_engram_wal.py",
    "tests/integration/test_engram_tail.py",
}
# Hand-typed numbers in files that other work of issue 12 is changing at the same time, each as
# (file, the line's code, stripped). Remove an entry when its line is fixed; nothing may join.
KNOWN: set[tuple[str, str]] = {
    ("tests/unit/test_http_limits.py", "room = frame - 1000 * 64 - BATCH_BODY_RESERVE"),
}

# The layouts' sizes and the offsets readers peek at, plus an entry with the benchmarks' 100-byte
# payload. (Not the CRC offsets: 60 and 32 are too common to tell apart from other numbers.)
NUMBERS = {
    frame.HEADER_SIZE,
    frame.BODY_LENGTH_OFFSET,
    entry.HEADER_SIZE,
    entry.PAYLOAD_SIZE_OFFSET,
    entry.HEADER_SIZE + 100,
}
# A line handles frames, entries or headers when one of its names says so.
NEAR = re.compile(
    r"header|\bhead\b|hdr|frame|payload|entry_bytes|entry_size|readexactly|pack_into|unpack_from"
    r"|from_bytes|struct",
    re.IGNORECASE,
)
_SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}


def _sources() -> list[Path]:
    out = []
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in path.parts or path.is_relative_to(DECLARED) or rel in PINNING:
                continue
            out.append(path)
    return out


def _code_lines(source: str) -> dict[int, list[tokenize.TokenInfo]]:
    """Line number -> that line's tokens, without comments and string contents."""
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _SKIPPED_TOKENS:
            lines.setdefault(tok.start[0], []).append(tok)
    return lines


def typed_numbers(source: str) -> list[tuple[int, str]]:
    """(line number, line) of each code line that types a format number near frame/entry code."""
    text = source.splitlines()
    found = []
    for number, toks in _code_lines(source).items():
        literals = {int(t.string) for t in toks if t.type == tokenize.NUMBER and t.string.isdigit()}
        names = " ".join(t.string for t in toks if t.type == tokenize.NAME)
        if literals & NUMBERS and NEAR.search(names):
            found.append((number, text[number - 1].strip()))
    return found


def entry_header_for_frames(source: str) -> list[tuple[int, str]]:
    """Lines that add the entry's HEADER_SIZE (imported bare from formats.entry) to a frame."""
    if not re.search(
        r"from engram_contract\.formats\.entry import [^\n]*\bHEADER_SIZE\b(?! as)", source
    ):
        return []
    text = source.splitlines()
    found = []
    for number, toks in _code_lines(source).items():
        names = [t.string for t in toks if t.type == tokenize.NAME]
        if "HEADER_SIZE" in names and "frame" in names:
            found.append((number, text[number - 1].strip()))
    return found


def test_format_numbers_scan_sees_the_tree() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert "tests/faultproxy.py" in files
    assert any(f.startswith("bench/engram_bench/") for f in files)
    assert any(f.startswith("sidecar/engram_sidecar/") for f in files)
    assert not any(f.startswith("contract/engram_contract/formats/") for f in files)


def test_format_numbers_scan_catches_typed_numbers() -> None:
    src = (
        "head = bytearray(64)\n"
        'struct.pack_into("<I", head, 52, n)\n'
        "await r.readexactly(64)  # 64 in a comment is prose\n"
        'n = int.from_bytes(header[24:28], "little")\n'
        "size = 164 + len(payload)\n"
        'label = "a 64-byte frame"\n'
        "writers = 64\n"
        "frame = bytes(HEADER_SIZE)\n"
    )
    assert [n for n, _ in typed_numbers(src)] == [1, 2, 3, 4, 5]
    bad = "from engram_contract.formats.entry import HEADER_SIZE\nn = HEADER_SIZE + len(frame)\n"
    assert [n for n, _ in entry_header_for_frames(bad)] == [2]
    good = "from engram_contract.formats.frame import HEADER_SIZE\nn = HEADER_SIZE + len(frame)\n"
    assert entry_header_for_frames(good) == []


@pytest.mark.parametrize("check", [typed_numbers, entry_header_for_frames])
def test_format_numbers_are_imported_not_typed(
    check: Callable[[str], list[tuple[int, str]]],
) -> None:
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for number, line in check(path.read_text()):
            if (rel, line) not in KNOWN:
                found.append(f"{rel}:{number}: {line}")
    assert found == [], (
        "format numbers typed by hand; import them from engram_contract.formats:\n"
        + "\n".join(found)
    )
