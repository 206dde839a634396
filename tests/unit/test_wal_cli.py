"""`engram-replication wal dump` and `wal verify`, in-process and as the real console script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engram_contract.formats.entry import HEADER_SIZE, EntryType
from engram_contract.ids import SpaceId
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.walcli import main

SPACE = "cli-space"
_LINE = re.compile(r"^seq=(\d+) epoch=(\d+) type=(\S+) ts=\S+ len=(\d+) at=(\S+):(\d+) payload=")


def make_log(data: Path, *, segment_bytes: int = 1 << 20, n: int = 6) -> SpaceLog:
    lg = SpaceLog(data / SPACE, space=SpaceId(SPACE), segment_bytes=segment_bytes)
    types = [EntryType.EPISODE_STORE, EntryType.MEMORY_UPDATE, EntryType.MEMORY_DELETE]
    for i in range(n):
        lg.append([(types[i % 3], f"payload {i + 1}".encode())], epoch=1 + i // 3)
    lg.sync()
    return lg


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    # `engram-replication wal ...` execs `python -m engram_sidecar.walcli ...`: run that in
    # process (the console script's exec path has its own test below).
    assert argv[0] == "wal"
    rc = main(argv[1:])
    out, err = capsys.readouterr()
    return rc, out, err


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_wal_cli_dump_prints_one_line_per_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_log(tmp_path).close()
    rc, out, err = run(["wal", "dump", "--data-dir", str(tmp_path), "--space", SPACE], capsys)
    assert rc == 0, err
    rows = [m.groups() for line in out.splitlines() if (m := _LINE.match(line))]
    assert [(int(s), int(e), t) for s, e, t, *_ in rows] == [
        (1, 1, "episode_store"),
        (2, 1, "memory_update"),
        (3, 1, "memory_delete"),
        (4, 2, "episode_store"),
        (5, 2, "memory_update"),
        (6, 2, "memory_delete"),
    ]
    assert [int(r[5]) for r in rows] == [i * (HEADER_SIZE + 9) for i in range(6)]
    assert "payload=payload 1" in out.splitlines()[0]
    assert out.splitlines()[-1] == "# 6 entries"


def test_wal_cli_dump_from_a_sequence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_log(tmp_path, segment_bytes=250, n=12).close()
    rc, out, _ = run(
        ["wal", "dump", "--data-dir", str(tmp_path), "--space", SPACE, "--from", "5"], capsys
    )
    assert rc == 0
    rows = [m.groups() for line in out.splitlines() if (m := _LINE.match(line))]
    assert [int(r[0]) for r in rows] == list(range(5, 13))
    assert len({r[4] for r in rows}) > 1  # the dump crossed segment files
    assert out.splitlines()[-1] == "# 8 entries"


def test_wal_cli_dump_stops_at_corruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lg = make_log(tmp_path)
    path = lg.segments[0].path
    lg.close()
    flip(path, 2 * (HEADER_SIZE + 9) + HEADER_SIZE)
    rc, out, err = run(["wal", "dump", "--data-dir", str(tmp_path), "--space", SPACE], capsys)
    assert rc == 1
    assert len([line for line in out.splitlines() if _LINE.match(line)]) == 2
    assert str(path) in err
    assert f"offset {2 * (HEADER_SIZE + 9)}" in err


def test_wal_cli_verify_passes_a_good_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_log(tmp_path, segment_bytes=250, n=12).close()
    make_log(tmp_path / "other").close()
    rc, out, err = run(["wal", "verify", "--data-dir", str(tmp_path), "--space", SPACE], capsys)
    assert rc == 0, out + err
    assert f"{SPACE}: ok: 12 entries" in out
    rc, out, _ = run(["wal", "verify", "--data-dir", str(tmp_path / "other")], capsys)
    assert rc == 0
    assert f"{SPACE}: ok: 6 entries" in out


def test_wal_cli_verify_names_the_file_and_offset_of_a_flip_in_a_sealed_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lg = make_log(tmp_path, segment_bytes=250, n=12)
    sealed = lg.segments[1]
    assert len(lg.segments) > 2
    lg.close()
    bad_off = HEADER_SIZE + 9  # the second entry of that segment
    flip(sealed.path, bad_off + HEADER_SIZE + 2)
    before = {p: p.read_bytes() for p in sealed.path.parent.iterdir()}
    rc, out, _ = run(["wal", "verify", "--data-dir", str(tmp_path), "--space", SPACE], capsys)
    assert rc == 1
    assert "CORRUPT" in out
    assert f"{sealed.path}: offset {bad_off}: payload CRC32C mismatch" in out
    assert {p: p.read_bytes() for p in sealed.path.parent.iterdir()} == before  # read-only
    rc, out, _ = run(["wal", "verify", "--data-dir", str(tmp_path)], capsys)
    assert rc == 1
    assert f"{sealed.path}: offset {bad_off}" in out


def test_wal_cli_verify_reports_a_torn_tail_without_repairing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lg = make_log(tmp_path)
    path = lg.segments[-1].path
    lg.close()
    with path.open("ab") as f:
        f.write(b"\x00" * 10)
    size = path.stat().st_size
    rc, out, _ = run(["wal", "verify", "--data-dir", str(tmp_path), "--space", SPACE], capsys)
    assert rc == 1
    assert "torn tail" in out
    assert path.stat().st_size == size


@pytest.mark.parametrize("command", ["dump", "verify"])
@pytest.mark.parametrize("space", ["ab", "Bad-Space", "a/b", "x" * 65])
def test_wal_cli_rejects_a_bad_space_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, space: str
) -> None:
    rc, _, err = run(["wal", command, "--data-dir", str(tmp_path), "--space", space], capsys)
    assert rc == 2
    assert "invalid memory space id" in err
    assert "[a-z0-9_-]" in err


@pytest.mark.parametrize("command", ["dump", "verify"])
def test_wal_cli_missing_data_dir_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    missing = tmp_path / "nope"
    rc, out, err = run(["wal", command, "--data-dir", str(missing), "--space", SPACE], capsys)
    assert rc == 2
    assert err.startswith("error: ")
    assert str(missing) in err
    assert "Traceback" not in out + err


def test_wal_cli_verify_of_an_unknown_space_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(["wal", "verify", "--data-dir", str(tmp_path), "--space", "ghost"], capsys)
    assert rc == 2
    assert "no WAL for space 'ghost'" in err
    rc, _, err = run(["wal", "verify", "--data-dir", str(tmp_path)], capsys)
    assert rc == 2
    assert "no memory spaces" in err


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("engram-replication")  # the installed entry point
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "engram_operator.cli"]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_wal_cli_console_script_exit_codes(tmp_path: Path) -> None:
    lg = make_log(tmp_path, segment_bytes=250, n=12)
    sealed = lg.segments[0]
    lg.close()
    ok = _console("wal", "verify", "--data-dir", str(tmp_path), "--space", SPACE)
    assert ok.returncode == 0, ok.stderr
    dump = _console("wal", "dump", "--data-dir", str(tmp_path), "--space", SPACE, "--from", "12")
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.splitlines()[0].startswith("seq=12 epoch=4 type=")
    flip(sealed.path, 30)  # a header byte of the first entry
    bad = _console("wal", "verify", "--data-dir", str(tmp_path), "--space", SPACE)
    assert bad.returncode == 1
    assert f"{sealed.path}: offset 0: " in bad.stdout
    bad_id = _console("wal", "verify", "--data-dir", str(tmp_path), "--space", "NO")
    assert bad_id.returncode == 2
    assert "invalid memory space id" in bad_id.stderr


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("sidecar", "--help"), "--replication-port"),
        (("sidecar", "--node", "n0", "--help"), "--replication-port"),
        (("bench", "--help"), "--quick"),
        (("wal", "verify", "--help"), "--data-dir"),
    ],
)
def test_console_script_hands_each_program_its_own_options(
    args: tuple[str, ...], expect: str
) -> None:
    """`engram-replication sidecar|bench|wal …` execs the program with its options untouched:
    the product's parser must not read `--quick` or `--node` as its own (it used to refuse
    them: `bench --quick` in CI, `sidecar --node` in the chart)."""
    res = _console(*args)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout
