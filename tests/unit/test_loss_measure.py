"""Decision records learn what a failover cost once the deposed primary has rejoined."""

from __future__ import annotations

from typing import Any

from engram_operator.losses import measure_losses


def _record(**kw: Any) -> dict[str, Any]:
    return {"winner": "n1", "oldPrimary": "n0", "newEpoch": 3, "entriesPossiblyLost": 4, **kw}


def test_a_cut_tail_is_the_measured_loss() -> None:
    d = [_record()]
    view = {"n0": {"truncations": [{"epoch": 2, "dropped": 9}, {"epoch": 3, "dropped": 7}]}}
    assert measure_losses(d, view)
    assert d[0]["entriesLost"] == 7  # the first cut at the record's epoch or later
    assert d[0]["entriesPossiblyLost"] == 4  # the estimate stays as it was
    assert not measure_losses(d, view)  # measured once


def test_a_fully_matched_old_primary_lost_nothing() -> None:
    d = [_record()]
    rejoining = {"role": "replica", "epoch": 3, "matched_sequence": 0, "last_sequence": 50}
    assert not measure_losses(d, {"n0": rejoining})  # not proven yet
    caught_up = {"role": "replica", "epoch": 3, "matched_sequence": 50, "last_sequence": 50}
    assert measure_losses(d, {"n0": caught_up})
    assert d[0]["entriesLost"] == 0


def test_records_without_a_winner_or_a_view_wait() -> None:
    d = [_record(winner=None), _record()]
    assert not measure_losses(d, {})
    assert all("entriesLost" not in r for r in d)
