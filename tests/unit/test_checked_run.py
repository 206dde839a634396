"""`entry.check_run`: the one validation of a run of stored entries per hop, and what it hands
the appender (`CheckedRun`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engram_contract.formats.entry import (
    HEADER_SIZE,
    CheckedRun,
    RunProblem,
    check_run,
    encode_entry,
    stored_prefix,
    walk_entries,
)


def _entry(seq: int, epoch: int, payload: bytes = b"p", ts: int = 0) -> bytes:
    return encode_entry(
        sequence=seq, timestamp_ns=ts or seq * 10, entry_type=1, epoch=epoch, payload=payload
    )


def _run(*entries: tuple[int, int]) -> bytes:
    return b"".join(_entry(s, e, b"x" * s) for s, e in entries)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_check_run_gives_what_the_appender_needs() -> None:
    data = _run((7, 1), (8, 1), (9, 2), (10, 5))
    run = check_run(data, first_sequence=7, min_epoch=1, max_epoch=5)
    assert isinstance(run, CheckedRun)
    assert (run.first, run.last, run.count, run.last_epoch) == (7, 10, 4, 5)
    assert run.ends == [h_end for h_end in _ends(data)]
    assert run.epochs == [(1, 7), (2, 9), (5, 10)]
    assert run.entry_epochs() == [h.epoch for h in walk_entries(data)]
    assert (run.first_timestamp_ns, run.last_timestamp_ns) == (70, 100)


def _ends(data: bytes) -> list[int]:
    out, pos = [], 0
    for h in walk_entries(data):
        pos += HEADER_SIZE + h.payload_size
        out.append(pos)
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_checked_run_without_first(n: int) -> None:
    data = _run((7, 1), (8, 1), (9, 2), (10, 5))
    run = check_run(data)
    assert isinstance(run, CheckedRun)
    cut, rest = run.without_first(n)
    if n == 4:
        assert rest is None and cut == len(data)
        return
    again = check_run(data[cut:])
    assert isinstance(again, CheckedRun)
    # The rest keeps the whole run's first timestamp: no later than its own first entry's.
    assert rest == replace(again, first_timestamp_ns=run.first_timestamp_ns)
    assert rest.first_timestamp_ns <= again.first_timestamp_ns


@pytest.mark.parametrize(
    ("data", "kwargs", "index", "reason", "corrupt"),
    [
        (_flip(_run((1, 1), (2, 1)), 2 * HEADER_SIZE + 2), {}, 1, "payload CRC32C", True),
        (_flip(_run((1, 1), (2, 1)), 6), {}, 0, "header CRC32C", True),
        (_flip(_run((1, 1)), 60), {}, 0, "reserved header bytes are not zero", True),
        (_run((1, 1), (3, 1)), {}, 1, "sequence 3, expected 2", False),
        (_run((1, 1)), {"first_sequence": 2}, 0, "sequence 1, expected 2", False),
        (_run((1, 2), (2, 1)), {}, 1, "entry epoch 1 after epoch 2", False),
        (_run((1, 1)), {"min_epoch": 2}, 0, "entry epoch 1 after epoch 2", False),
        (_run((1, 3)), {"max_epoch": 2}, 0, "entry epoch 3 above the frame's 2", False),
        (_run((1, 1), (2, 1)), {"count": 1}, 1, "more than the 1 entries", False),
        (_run((1, 1), (2, 1))[:-1], {}, 1, "payload runs 1 bytes past", True),
        (_run((1, 1)) + b"\0" * 10, {}, 1, "short header", True),
        (b"", {}, 0, "no entries", False),
    ],
)
def test_check_run_refuses_with_the_reason(
    data: bytes, kwargs: dict[str, int], index: int, reason: str, corrupt: bool
) -> None:
    got = check_run(data, **kwargs)
    assert isinstance(got, RunProblem)
    assert got.index == index
    assert reason in got.reason
    assert got.corrupt is corrupt


# ---- stored_prefix: what a WAL read serves, checked in the same fused loop -------------------


def test_stored_prefix_stops_at_a_cut_entry_and_at_max_entries() -> None:
    data = _run((7, 1), (8, 1), (9, 2), (10, 5))
    ends = _ends(data)
    assert stored_prefix(data, first_sequence=7, max_entries=10) == (4, len(data))
    assert stored_prefix(data, first_sequence=7, max_entries=2) == (2, ends[1])
    # Cut inside the third entry's payload, then inside its header: two whole entries.
    assert stored_prefix(data[: ends[2] - 1], first_sequence=7, max_entries=10) == (2, ends[1])
    assert stored_prefix(data[: ends[1] + 5], first_sequence=7, max_entries=10) == (2, ends[1])


def test_stored_prefix_names_the_size_of_a_first_entry_larger_than_the_read() -> None:
    data = _entry(3, 1, b"z" * 500)
    assert stored_prefix(data[:100], first_sequence=3, max_entries=5) == (0, len(data))


@pytest.mark.parametrize("at", [0, 4, 20, 31, 35, 44, 60, HEADER_SIZE, HEADER_SIZE + 1])
def test_stored_prefix_refuses_any_flipped_bit_of_an_entry(at: int) -> None:
    data = _run((1, 1), (2, 1), (3, 1), (4, 1))
    second = _ends(data)[0]
    got = stored_prefix(_flip(data, second + at), first_sequence=1, max_entries=10)
    assert isinstance(got, RunProblem)
    assert (got.index, got.offset, got.corrupt) == (1, second, True)


def test_stored_prefix_refuses_a_sequence_out_of_order_as_not_corrupt() -> None:
    data = _run((5, 1), (6, 1), (8, 1))
    got = stored_prefix(data, first_sequence=5, max_entries=10)
    assert isinstance(got, RunProblem)
    assert (got.index, got.corrupt) == (2, False)
    assert "sequence 8, expected 7" in got.reason
    wrong_start = stored_prefix(data, first_sequence=4, max_entries=10)
    assert isinstance(wrong_start, RunProblem) and wrong_start.index == 0


def test_stored_prefix_agrees_with_check_run_on_whole_runs() -> None:
    data = _run(*[(s, 1 + s // 3) for s in range(1, 30)])
    run = check_run(data, first_sequence=1)
    assert isinstance(run, CheckedRun)
    assert stored_prefix(data, first_sequence=1, max_entries=1000) == (run.count, run.ends[-1])
