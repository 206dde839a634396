"""Log matching (`replication.matching`): the replica's check, the primary's back-up, overlaps.

The exchange under test (design §4): a BATCH names the entry before its first one,
(prev_epoch, first_seq - 1). The replica appends only if it holds that very entry (`check_prev`);
otherwise it names its own entry at or below that point (NACK GAP/DIVERGED), and the primary
backs up (`resend_point`). The last tests simulate many clusters whose logs forked and check that
the exchange always stops, quickly, exactly at the fork.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from engram_contract.formats.batch import Batch, encode_batch
from engram_contract.formats.entry import encode_entry
from engram_contract.formats.frame import FrameDecoder
from engram_contract.ids import Epoch, SpaceId, space_wire_id
from engram_sidecar.log import epochs
from engram_sidecar.replication.matching import (
    History,
    Mismatch,
    check_prev,
    epoch_at,
    epoch_end,
    epoch_start,
    overlap,
    refusal_deposes,
    resend_point,
)

T0 = 1_700_000_000_000_000_000
# epoch 1 wrote 1..10, epoch 2 wrote 11..20, epoch 5 wrote 21 and on (epochs 3 and 4 wrote nothing
# this log kept: a replica that never held their entries, or held them and cut them).
H: History = [(1, 1), (2, 11), (5, 21)]


# --- epoch_at, epoch_start, epoch_end ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sequence", "want"),
    [
        (-1, 0),
        (0, 0),  # before the log: the empty prefix every log shares
        (1, 1),  # first entry of the first run
        (5, 1),
        (10, 1),  # last entry of a run
        (11, 2),  # first entry of the next
        (15, 2),
        (20, 2),
        (21, 5),
        (10**12, 5),  # past the log's end: still the newest epoch begun
    ],
)
def test_matching_epoch_at_inside_runs_and_on_boundaries(sequence: int, want: int) -> None:
    assert epoch_at(H, sequence) == want


def test_matching_epoch_at_empty_history_is_zero() -> None:
    for seq in (0, 1, 7, 2**63):
        assert epoch_at([], seq) == 0


def test_matching_epoch_at_before_the_first_recorded_epoch_is_zero() -> None:
    h = [(3, 5), (4, 9)]
    assert [epoch_at(h, s) for s in range(12)] == [0, 0, 0, 0, 0, 3, 3, 3, 3, 4, 4, 4]


def test_matching_epoch_at_skips_epochs_that_wrote_nothing() -> None:
    # Epoch 2 began at 11 (a promotion) and wrote nothing before epoch 3 began at 11 too, as
    # epochs.record allows; a promotion not followed by a write starts past the log's end.
    h = [(1, 1), (2, 11), (3, 11), (4, 16)]
    assert [epoch_at(h, s) for s in (10, 11, 15, 16)] == [1, 3, 3, 4]


def test_matching_epoch_at_agrees_with_the_epoch_history_module() -> None:
    rng = random.Random(11)
    for _ in range(300):
        h = _random_history(rng)
        for seq in range(0, (h[-1][1] if h else 1) + 5):
            assert epoch_at(h, seq) == epochs.epoch_at(h, seq), (h, seq)


def test_matching_epoch_start() -> None:
    assert [epoch_start(H, e) for e in (1, 2, 5)] == [1, 11, 21]
    with pytest.raises(KeyError, match="epoch 3 is not in the history"):
        epoch_start(H, 3)
    with pytest.raises(KeyError):
        epoch_start([], 1)


@pytest.mark.parametrize(
    ("history", "epoch", "last", "want"),
    [
        (H, 1, 30, (1, 10)),
        (H, 2, 30, (2, 20)),
        (H, 3, 30, (2, 20)),  # no epoch 3 here: the highest below it, and where it ends
        (H, 4, 30, (2, 20)),
        (H, 5, 30, (5, 30)),  # the newest epoch ends with the log
        (H, 99, 30, (5, 30)),
        (H, 2, 15, (2, 15)),  # the log ends inside epoch 2
        (H, 1, 7, (1, 7)),  # the log ends inside epoch 1
        (H, 0, 30, (0, 0)),  # every epoch is above
        ([(3, 1)], 2, 9, (0, 0)),
        ([], 4, 0, (0, 0)),
        ([], 4, 12, (0, 0)),
    ],
)
def test_matching_epoch_end(history: History, epoch: int, last: int, want: tuple[int, int]) -> None:
    assert epoch_end(history, epoch, last) == want


def test_matching_epoch_end_of_an_epoch_that_wrote_nothing_ends_before_it() -> None:
    # resend_point relies on the end: the last sequence written in an epoch at or below the one
    # asked for. An epoch without entries ends where the run before it ended.
    assert epoch_end([(1, 1), (2, 11), (3, 11)], 2, 15)[1] == 10
    assert epoch_end([(1, 1), (2, 11)], 2, 10)[1] == 10  # promoted, nothing written yet


def test_matching_epoch_end_agrees_with_the_epoch_history_module() -> None:
    rng = random.Random(12)
    for _ in range(300):
        h = _random_history(rng)
        if not h:
            continue  # no epoch at all: epoch_end says (0, 0), end_of_epoch the log's end
        last = _random_last(rng, h)
        for e in range(0, (h[-1][0] if h else 0) + 3):
            _, end = epoch_end(h, e, last)
            assert end == epochs.end_of_epoch(h, e, last), (h, e, last)


# --- check_prev: the replica's side ---------------------------------------------------------------


def test_matching_check_prev_match_applies() -> None:
    assert check_prev(history=H, last=30, prev_seq=15, prev_epoch=2) is None
    assert check_prev(history=H, last=30, prev_seq=10, prev_epoch=1) is None  # end of a run
    assert check_prev(history=H, last=30, prev_seq=21, prev_epoch=5) is None  # start of a run
    assert check_prev(history=H, last=30, prev_seq=30, prev_epoch=5) is None  # the last entry


def test_matching_check_prev_before_the_log_always_matches() -> None:
    # A batch that starts the log follows entry 0 of epoch 0, which every log holds.
    assert check_prev(history=[], last=0, prev_seq=0, prev_epoch=0) is None
    assert check_prev(history=H, last=30, prev_seq=0, prev_epoch=0) is None


def test_matching_check_prev_gap_names_the_last_entry() -> None:
    got = check_prev(history=H, last=15, prev_seq=20, prev_epoch=2)
    assert got == Mismatch(True, 16, 2, "log ends at 15, batch follows 20")
    got = check_prev(history=H, last=30, prev_seq=40, prev_epoch=7)
    assert got is not None
    assert (got.gap, got.resend_from, got.epoch_hint) == (True, 31, 5)


def test_matching_check_prev_gap_on_an_empty_log_resends_everything() -> None:
    got = check_prev(history=[], last=0, prev_seq=6, prev_epoch=3)
    assert got is not None
    assert (got.gap, got.resend_from, got.epoch_hint) == (True, 1, 0)


def test_matching_check_prev_replica_epoch_higher_skips_its_whole_run() -> None:
    # Entry 25 is epoch 5 here, epoch 3 on the primary: the primary's entries below 25 are all of
    # epoch <= 3, so none of this log's epoch-5 entries (21..) is the primary's.
    got = check_prev(history=H, last=30, prev_seq=25, prev_epoch=3)
    assert got == Mismatch(False, 21, 2, "entry 25 is epoch 5 here, 3 on the primary")
    # On the run's first entry: the point named is the run before it.
    got = check_prev(history=H, last=30, prev_seq=21, prev_epoch=2)
    assert got is not None
    assert (got.gap, got.resend_from, got.epoch_hint) == (False, 21, 2)
    # The whole log is one divergent run: back to the empty prefix.
    got = check_prev(history=[(2, 1)], last=5, prev_seq=3, prev_epoch=1)
    assert got is not None
    assert (got.gap, got.resend_from, got.epoch_hint) == (False, 1, 0)


def test_matching_check_prev_replica_epoch_lower_names_the_same_point() -> None:
    # Entry 15 is epoch 2 here, 4 on the primary: say so; the primary knows where its epochs
    # at or below 2 end.
    got = check_prev(history=H, last=30, prev_seq=15, prev_epoch=4)
    assert got == Mismatch(False, 16, 2, "entry 15 is epoch 2 here, 4 on the primary")
    got = check_prev(history=H, last=30, prev_seq=10, prev_epoch=2)
    assert got is not None
    assert (got.gap, got.resend_from, got.epoch_hint) == (False, 11, 1)


def test_matching_check_prev_names_its_own_entry_at_or_below_the_point() -> None:
    rng = random.Random(13)
    for _ in range(2_000):
        h = _random_history(rng)
        last = _random_last(rng, h)
        prev_seq = rng.randrange(0, last + 5)
        prev_epoch = 0 if prev_seq == 0 else rng.randrange(1, 12)
        got = check_prev(history=h, last=last, prev_seq=prev_seq, prev_epoch=prev_epoch)
        mine = epoch_at(h, prev_seq) if prev_seq <= last else None
        if got is None:
            assert mine == prev_epoch
            continue
        named = got.resend_from - 1
        assert got.resend_from >= 1  # a NACK GAP/DIVERGED must carry one
        assert named <= min(prev_seq, last)
        assert got.epoch_hint == epoch_at(h, named)  # an entry this log really holds
        assert got.gap is (prev_seq > last)
        if mine is not None and mine > prev_epoch:
            assert named < prev_seq


# --- resend_point: the primary's side ------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "last", "replica", "want"),
    [
        (H, 30, (2, 15), 16),  # the same entry: right after it
        (H, 30, (5, 30), 31),  # caught up
        (H, 30, (0, 0), 1),  # an empty replica
        (H, 30, (1, 15), 11),  # its epoch 1 went on past where the primary's ended
        (H, 30, (4, 25), 21),  # no epoch 4 here: after the primary's epoch 2 ended
        (H, 25, (5, 28), 26),  # ahead in the same epoch: after the primary's last
        (H, 25, (2, 28), 21),  # ahead in an older epoch: after that epoch's end here
        ([(1, 1), (3, 21)], 25, (2, 15), 15),  # entry 15 is epoch 1 here: the fork is below 15
        ([(3, 1)], 5, (2, 4), 1),  # every epoch here is above the replica's: from the start
        ([], 0, (2, 4), 1),
    ],
)
def test_matching_resend_point(
    history: History, last: int, replica: tuple[int, int], want: int
) -> None:
    epoch, seq = replica
    assert resend_point(history=history, last=last, replica_seq=seq, replica_epoch=epoch) == want


def test_matching_resend_point_never_passes_the_named_entry_or_the_log() -> None:
    rng = random.Random(14)
    for _ in range(2_000):
        h = _random_history(rng)
        last = _random_last(rng, h)
        seq = rng.randrange(0, last + 6)
        epoch = 0 if seq == 0 else rng.randrange(1, 12)
        got = resend_point(history=h, last=last, replica_seq=seq, replica_epoch=epoch)
        assert 1 <= got <= min(seq, last) + 1
        if got == seq + 1:  # only after an entry the primary holds itself
            assert seq <= last
            assert epoch_at(h, seq) == epoch


# --- overlap and entry_epochs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_seq", "batch_epochs", "want"),
    [
        (31, [5, 5], (0, None)),  # nothing held yet
        (18, [2, 2, 2, 5, 5], (5, None)),  # all held, identical, across a run boundary
        (28, [5, 5, 5, 5, 5], (3, None)),  # 28..30 held, 31.. new
        (19, [2, 6, 6], (1, 20)),  # 19 held; 20 is epoch 2 here, 6 in the batch
        (11, [1, 1], (0, 11)),  # differs at once
        (21, [4, 4, 4], (0, 21)),
        (5, [], (0, None)),
    ],
)
def test_matching_overlap(
    first_seq: int, batch_epochs: list[int], want: tuple[int, int | None]
) -> None:
    assert overlap(history=H, last=30, first_seq=first_seq, epochs=batch_epochs) == want


def _stored(epochs_by_seq: list[tuple[int, int]], *, size: int = 0) -> bytes:
    return b"".join(
        encode_entry(
            sequence=s, timestamp_ns=T0 + s, entry_type=1, epoch=e, payload=bytes([s % 251]) * size
        )
        for s, e in epochs_by_seq
    )


def test_matching_compares_the_epochs_the_frame_decoder_read() -> None:
    # The receiver compares an overlap by the epochs in `Batch.checked`, parsed and checked once
    # by the frame decoder, instead of decoding the entries again.
    data = _stored([(7, 1), (8, 1), (9, 2), (10, 5)], size=33)
    frame = encode_batch(
        space=space_wire_id(SpaceId("orders")),
        epoch=5,
        prev_epoch=1,
        first_seq=7,
        last_seq=10,
        count=4,
        entries=data,
    )
    (decoded,) = FrameDecoder().feed(frame)
    batch = Batch.from_frame(decoded)
    assert batch.checked is not None
    assert batch.checked.entry_epochs() == [1, 1, 2, 5]
    assert (batch.checked.first, batch.checked.last) == (7, 10)
    assert batch.checked.epochs == [(1, 7), (2, 9), (5, 10)]
    assert batch == Batch(
        batch.space, batch.epoch, batch.first_seq, batch.last_seq, 4, data, Epoch(1)
    )


# --- the exchange, on simulated clusters ---------------------------------------------------------


@dataclass
class Log:
    """One node's log as the matching rules see it: each entry's epoch, and the epoch history
    kept the way the WAL keeps it (a promotion records its epoch at the next sequence, even if
    nothing is written; truncation drops epochs that began past the cut)."""

    entries: list[int] = field(default_factory=list)  # entries[s - 1] = epoch of entry s
    history: list[tuple[int, int]] = field(default_factory=list)

    @property
    def last(self) -> int:
        return len(self.entries)

    def note(self, epoch: int) -> None:
        if not self.history or epoch > self.history[-1][0]:
            self.history.append((epoch, self.last + 1))

    def write(self, epoch: int, n: int) -> None:
        for _ in range(n):
            self.note(epoch)
            assert epoch == self.history[-1][0], "the WAL refuses an epoch going back"
            self.entries.append(epoch)

    def write_all(self, entry_epochs: list[int]) -> None:
        for e in entry_epochs:
            self.write(e, 1)

    def forget_unwritten(self) -> None:
        """As the receiver does before applying a batch (wal.forget_unwritten_epochs)."""
        self.history = epochs.cut_after(self.history, self.last)

    def truncate(self, keep: int) -> None:
        if keep < self.last:
            del self.entries[keep:]
            self.history = epochs.cut_after(self.history, keep)

    def copy(self) -> Log:
        return Log(list(self.entries), list(self.history))


def fork(a: Log, b: Log) -> int:
    """The last sequence where the two logs agree: entries are (epoch, sequence)."""
    n = 0
    while n < min(a.last, b.last) and a.entries[n] == b.entries[n]:
        n += 1
    return n


@dataclass
class Exchange:
    matched: int  # the previous entry of the batch the replica finally accepted
    refusals: int  # NACK GAP/DIVERGED round trips before it
    tried: list[int]  # every previous entry tried, in order


def exchange(primary: Log, replica: Log, *, start: int | None = None) -> Exchange:
    """Run the stream: a first guess, then batches and refusals until the replica appends.

    `start` None: the probe (the replica's ACK names its last entry, the primary picks with
    resend_point). Otherwise the primary's cursor was already at `start` (a live stream).
    """
    if start is None:
        nxt = resend_point(
            history=primary.history,
            last=primary.last,
            replica_seq=replica.last,
            replica_epoch=epoch_at(replica.history, replica.last),
        )
    else:
        nxt = start
    tried: list[int] = []
    limit = primary.last + replica.last + 2
    while True:
        prev = nxt - 1
        tried.append(prev)
        assert len(tried) <= limit, f"no convergence: tried {tried}"
        verdict = check_prev(
            history=replica.history,
            last=replica.last,
            prev_seq=prev,
            prev_epoch=epoch_at(primary.history, prev),
        )
        if verdict is None:
            return Exchange(prev, len(tried) - 1, tried)
        point = resend_point(
            history=primary.history,
            last=primary.last,
            replica_seq=verdict.resend_from - 1,
            replica_epoch=verdict.epoch_hint,
        )
        assert point - 1 < prev, f"refusal of {prev} did not back up: {verdict}"
        nxt = max(1, min(nxt, point))  # as stream.on_nack: back up, never forward


def apply(primary: Log, replica: Log, matched: int) -> None:
    """What the receiver does with the batch after `matched`: compare, cut, append."""
    batch = primary.entries[matched:]
    held, diverged_at = overlap(
        history=replica.history, last=replica.last, first_seq=matched + 1, epochs=batch
    )
    want_diverged = matched + 1 if replica.last > matched and batch else None
    assert (held, diverged_at) == (0, want_diverged), "matched below the fork point"
    replica.forget_unwritten()
    if diverged_at is not None:
        replica.truncate(diverged_at - 1)
    replica.write_all(batch[held:])


def test_matching_worked_example_of_the_wire_format_doc() -> None:
    # docs/wire-format.md "Log matching": node-b, deposed at epoch 2 with 11..15 of its own.
    b = Log()
    b.write(1, 10)
    b.write(2, 5)
    c = Log()
    c.write(1, 20)
    c.write(3, 5)
    assert b.history == [(1, 1), (2, 11)]
    assert c.history == [(1, 1), (3, 21)]
    got = exchange(c, b)
    assert got.tried == [14, 10]
    assert (got.matched, got.refusals) == (10, 1) == (fork(b, c), 1)
    verdict = check_prev(history=b.history, last=b.last, prev_seq=14, prev_epoch=1)
    assert verdict == Mismatch(False, 11, 1, "entry 14 is epoch 2 here, 1 on the primary")
    apply(c, b, got.matched)
    assert b == c


def _deposed_pair(rng: random.Random) -> tuple[Log, Log]:
    """A common log; A, its primary at epoch e, writes more; B, holding only part of the common
    log, is promoted at a higher epoch and writes more. Returns (B the primary, A the replica)."""
    common = Log()
    epoch = 0
    for _ in range(rng.randrange(0, 4)):
        epoch += rng.randrange(1, 3)
        common.write(epoch, rng.randrange(0, 8))
    a = common.copy()
    epoch_a = epoch + rng.randrange(0, 2)  # A may have led the common log's last epoch
    a.write(epoch_a, rng.randrange(0, 8))
    b = common.copy()
    b.truncate(rng.randrange(0, common.last + 1))
    b.note(epoch_a + rng.randrange(1, 3))  # promoted: the epoch begins even if nothing follows
    b.write(b.history[-1][0], rng.randrange(0, 8))
    return b, a


@pytest.mark.parametrize("seed", range(5))
def test_matching_deposed_primary_found_by_the_probe_alone(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        primary, replica = _deposed_pair(rng)
        want = fork(primary, replica)
        got = exchange(primary, replica)
        assert (got.matched, got.refusals) == (want, 0), (primary, replica, got)
        live = exchange(primary, replica, start=primary.last + 1)
        assert live.matched == want
        assert live.refusals <= 1, (primary, replica, live)
        apply(primary, replica, got.matched)
        assert replica.entries[: primary.last] == primary.entries


def _cluster(rng: random.Random) -> list[Log]:
    """Random history of a cluster: every epoch one leader (any node, stale or not) writes a few
    entries and ships a prefix of its log to some members, which cut what disagrees first."""
    nodes = [Log() for _ in range(rng.randrange(2, 6))]
    for epoch in range(1, rng.randrange(2, 12)):
        if rng.random() < 0.2:
            continue  # an epoch nobody recorded: its leader never got going
        # Often the most behind node: the elections that make forks (a lagging failover).
        leader = rng.choice(nodes) if rng.random() < 0.5 else min(nodes, key=lambda n: n.last)
        leader.note(epoch)
        leader.write(epoch, rng.choice([0, 1, 2, 5, 9]))
        for node in nodes:
            if node is leader or rng.random() < 0.4:
                continue
            f = fork(leader, node)
            upto = rng.randrange(f, leader.last + 1)
            if upto > f:  # the node follows the leader up to `upto`, cutting what disagrees
                node.forget_unwritten()
                node.truncate(f)
                node.write_all(leader.entries[f:upto])
    return nodes


@pytest.mark.parametrize("seed", range(8))
def test_matching_exchange_always_lands_on_the_fork_point(seed: int) -> None:
    rng = random.Random(1000 + seed)
    worst = 0
    for _ in range(300):
        nodes = _cluster(rng)
        top = max(
            range(len(nodes)), key=lambda i: nodes[i].history[-1][0] if nodes[i].history else 0
        )
        primary = nodes[top]
        for i, replica in enumerate(nodes):
            if i == top:
                continue
            want = fork(primary, replica)
            # Epoch runs of either log above the fork: each refusal skips at least one.
            runs = sum(1 for _, s in replica.history if s > want) + sum(
                1 for _, s in primary.history if s > want
            )
            for start in (None, primary.last + 1, rng.randrange(want + 1, primary.last + 2)):
                got = exchange(primary, replica, start=start)
                assert got.matched == want, (primary, replica, got)
                assert got.tried == sorted(set(got.tried), reverse=True)  # strictly down
                assert got.refusals <= runs + 1, (primary, replica, got)
                worst = max(worst, got.refusals)
            copy = replica.copy()
            apply(primary, copy, want)
            # Identical, but for a divergent tail the primary has no entry to replace yet (it is
            # never acknowledged: only matched entries are).
            assert copy.entries[: primary.last] == primary.entries
            assert primary.last in (copy.last, want)
            assert all(epoch_at(copy.history, s) == e for s, e in enumerate(copy.entries, 1))
    assert worst <= 3  # the most refusals any of these clusters needs (docs/wire-format.md)


# --- helpers --------------------------------------------------------------------------------------


def _random_history(rng: random.Random) -> list[tuple[int, int]]:
    """A WAL-shaped history: epochs strictly increasing, first sequences non-decreasing from 1."""
    out: list[tuple[int, int]] = []
    epoch, start = 0, 1
    for _ in range(rng.randrange(0, 5)):
        epoch += rng.randrange(1, 4)
        out.append((epoch, start))
        start += rng.choice([0, 1, 1, 3, 10])
    return out


def _random_last(rng: random.Random, h: History) -> int:
    """A last sequence the history fits: at least the start of its newest epoch minus one."""
    if not h:
        return 0 if rng.random() < 0.5 else rng.randrange(0, 5)
    return h[-1][1] - 1 + rng.randrange(0, 8)


def test_matching_only_a_newer_epoch_in_a_refusal_deposes_the_primary() -> None:
    # Re-asserted at epoch 2, the epoch its replica took while the control plane was cut off:
    # a late refusal of a frame it sent at epoch 1 names 2, which deposes nobody.
    assert not refusal_deposes(2, 2)
    assert not refusal_deposes(1, 2)
    # Still assigned at epoch 1 while a replica holds 2: deposed.
    assert refusal_deposes(2, 1)
