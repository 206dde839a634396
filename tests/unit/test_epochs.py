"""Epoch history (epoch -> first sequence) and the fork point a deposed primary truncates to."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engram_contract.errors import WalCorruption
from engram_sidecar.log import epochs
from engram_sidecar.log.epochs import History, fork_point


def test_epochs_record_only_increases() -> None:
    h: History = []
    h1 = epochs.record(h, 1, 1)
    assert h1 == [(1, 1)]
    assert epochs.record(h1, 1, 5) is None
    assert epochs.record(h1, 0, 5) is None
    assert epochs.record(h1, 3, 5) == [(1, 1), (3, 5)]
    assert h1 == [(1, 1)]  # not mutated


def test_epochs_cut_after_drops_epochs_that_start_later() -> None:
    h = [(1, 1), (2, 11), (5, 21)]
    assert epochs.cut_after(h, 30) == h
    assert epochs.cut_after(h, 21) == h
    assert epochs.cut_after(h, 20) == [(1, 1), (2, 11)]
    assert epochs.cut_after(h, 10) == [(1, 1)]
    assert epochs.cut_after(h, 0) == []


def test_epochs_end_of_epoch() -> None:
    h = [(1, 1), (3, 11), (4, 15)]
    assert epochs.end_of_epoch(h, 1, 20) == 10
    assert epochs.end_of_epoch(h, 2, 20) == 10  # never had 2: where the latest earlier one ended
    assert epochs.end_of_epoch(h, 3, 20) == 14
    assert epochs.end_of_epoch(h, 4, 20) == 20
    assert epochs.end_of_epoch(h, 9, 20) == 20
    assert epochs.end_of_epoch(h, 0, 20) == 0


def test_epochs_epoch_at() -> None:
    h = [(1, 1), (3, 11), (4, 15)]
    assert [epochs.epoch_at(h, s) for s in (0, 1, 10, 11, 14, 15, 99)] == [0, 1, 1, 3, 3, 4, 4]
    assert epochs.epoch_at([], 5) == 0
    assert epochs.epoch_at([(2, 6)], 5) == 0  # before the first recorded epoch
    # Two promotions with no write between them: the entry at 4 was written by the later one.
    assert epochs.epoch_at([(1, 1), (2, 4), (3, 4)], 4) == 3


@given(st.lists(st.integers(1, 3), max_size=60), st.integers(0, 70))
def test_epochs_epoch_at_matches_the_entries(entry_epochs: list[int], sequence: int) -> None:
    """epoch_at over the history is the epoch each entry was written at (0 for none)."""
    written, e = [], 1
    for step in entry_epochs:
        e += step - 1  # steps of 0..2: epochs never go back
        written.append(e)
    want = written[sequence - 1] if 1 <= sequence <= len(written) else 0
    if sequence > len(written):
        want = written[-1] if written else 0
    assert epochs.epoch_at(_history(written), sequence) == want


def test_epochs_store_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "epochs.json"
    assert epochs.load(path) == []
    epochs.store(path, [(1, 1), (2, 11), (7, 40)])
    assert epochs.load(path) == [(1, 1), (2, 11), (7, 40)]
    epochs.store(path, [(1, 1)])
    assert epochs.load(path) == [(1, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.json"]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"epochs": [[1]]}',
        '{"epochs": [["x", 1]]}',
        '{"epochs": [[2, 1], [1, 5]]}',  # epochs going back
        '{"epochs": [[1, 1], [1, 5]]}',  # epoch repeated
        '{"epochs": [[1, 9], [2, 5]]}',  # sequences going back
    ],
)
def test_epochs_load_rejects_a_bad_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "epochs.json"
    path.write_text(text)
    with pytest.raises(WalCorruption) as exc:
        epochs.load(path)
    assert exc.value.path == str(path)


# ---- fork point ------------------------------------------------------------------------------


def test_fork_point_follower_with_a_divergent_tail_from_a_deposed_epoch() -> None:
    # The old primary wrote 11..15 in epoch 2; the new leader (epoch 3) never saw them.
    local = [(1, 1), (2, 11)]
    leader = [(1, 1), (3, 11)]
    assert fork_point(local=local, local_last=15, leader=leader, leader_last=20) == 10


def test_fork_point_leader_got_part_of_the_deposed_epoch() -> None:
    # The new leader received 11..13 of epoch 2 before the old primary died.
    local = [(1, 1), (2, 11)]
    leader = [(1, 1), (2, 11), (3, 14)]
    assert fork_point(local=local, local_last=15, leader=leader, leader_last=20) == 13


def test_fork_point_follower_behind() -> None:
    assert fork_point(local=[(1, 1)], local_last=5, leader=[(1, 1), (2, 11)], leader_last=20) == 5
    local = [(1, 1), (2, 11)]
    assert fork_point(local=local, local_last=12, leader=local, leader_last=20) == 12


def test_fork_point_equal_logs() -> None:
    h = [(1, 1), (2, 6)]
    assert fork_point(local=h, local_last=10, leader=h, leader_last=10) == 10


def test_fork_point_follower_whose_last_epochs_the_leader_never_had() -> None:
    local = [(1, 1), (2, 5), (4, 9)]
    leader = [(1, 1), (3, 5)]
    assert fork_point(local=local, local_last=12, leader=leader, leader_last=20) == 4


def test_fork_point_follower_ahead_within_the_leaders_epoch() -> None:
    # Epoch 1's primary wrote up to 12; the new leader had 7 when it began epoch 2.
    leader = [(1, 1), (2, 8)]
    assert fork_point(local=[(1, 1)], local_last=12, leader=leader, leader_last=20) == 7
    assert fork_point(local=[(1, 1)], local_last=12, leader=leader, leader_last=7) == 7


def test_fork_point_empty_logs() -> None:
    assert fork_point(local=[], local_last=0, leader=[(1, 1)], leader_last=9) == 0
    assert fork_point(local=[(1, 1)], local_last=5, leader=[], leader_last=0) == 0


def test_fork_point_follower_epoch_older_than_the_leaders_history() -> None:
    assert fork_point(local=[(1, 1)], local_last=10, leader=[(2, 5)], leader_last=20) == 4


def _history(entry_epochs: list[int], start: int = 1) -> History:
    h: History = []
    for i, e in enumerate(entry_epochs):
        if not h or e > h[-1][0]:
            h.append((e, start + i))
    return h


def _epochs(draw: st.DrawFn, first: int, n: int) -> list[int]:
    """n non-decreasing epochs from `first`: the epoch of each entry of a run."""
    out, e = [], first
    for step in draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)):
        out.append(e)
        e += step
    return out


@st.composite
def _diverged(draw: st.DrawFn) -> tuple[History, int, History, int, int]:
    """Two logs sharing a prefix, then each going its own way, with one leader per epoch."""
    shared = _epochs(draw, 1, draw(st.integers(0, 25)))
    last = shared[-1] if shared else 1
    # The follower went on alone: in the epoch it led, or later ones nobody else saw.
    follower = shared + _epochs(draw, last + draw(st.integers(0, 2)), draw(st.integers(0, 10)))
    # The leader's epoch is newer than anything the follower wrote; it may have written nothing.
    lead_e = max(follower, default=1) + 1 + draw(st.integers(0, 2))
    leader_entries = shared + _epochs(draw, lead_e, draw(st.integers(0, 10)))
    leader = _history(leader_entries)
    if not leader or leader[-1][0] < lead_e:
        leader.append((lead_e, len(shared) + 1))  # begun, nothing written yet
    return _history(follower), len(follower), leader, len(leader_entries), len(shared)


@given(_diverged())
def test_fork_point_is_the_common_prefix(case: tuple[History, int, History, int, int]) -> None:
    local, local_last, leader, leader_last, common = case
    got = fork_point(local=local, local_last=local_last, leader=leader, leader_last=leader_last)
    assert got == common
