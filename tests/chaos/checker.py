"""The history checker: what the clients were told against what the logs hold at the end.

Pure functions over the recorded history (`history.Op`s), the WAL of every node as the project's
own reader decodes it (`engram_sidecar.log.verify.dump`, the code behind `engram-replication wal
dump`; each entry's bytes are sliced from its segment file exactly as stored), the final
placement, and the promotion decision records. Checks, per space:

1. **lost** (`quorum`, `one`): every acknowledged entry is in the final primary's log at the
   sequence and epoch it was acknowledged with, with the same payload. Zero allowed.
2. **async loss bound**: under `async`, the acknowledged entries missing from the final primary
   number at most the sum of `entriesPossiblyLost` over the space's decision records.
3. **conflicting acks**: no sequence acknowledged at two different epochs (nor twice at one epoch
   with different payloads): two primaries must never both acknowledge a sequence.
4. **divergent**: every member's log is a byte-for-byte prefix of the final primary's: each entry
   it holds equals the primary's entry at that sequence, byte for byte, and it holds nothing past
   the primary's last sequence.
5. **corrupt**: a member's WAL that the reader refuses (a bad CRC, a gap), other than a torn tail.

Reported but not failed on (they break no stated guarantee, yet point at bugs): entries of
*refused* writes found in the log (the API says nothing was written), payloads stored twice,
non-members whose stale copy diverges, and a cluster that did not converge after the heal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.history import Op, payload_hash

from engram_sidecar.log.verify import Problem, dump, verify_space


@dataclass(frozen=True)
class LogEntry:
    sequence: int
    epoch: int
    hash: str
    raw: bytes  # the whole entry, header and payload, as stored


@dataclass
class NodeLog:
    node: str
    space: str
    entries: dict[int, LogEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    torn_tail: str = ""
    exists: bool = True

    @property
    def first(self) -> int:
        return min(self.entries, default=0)

    @property
    def last(self) -> int:
        return max(self.entries, default=0)


def read_log(node: str, space: str, space_dir: Path) -> NodeLog:
    """A node's WAL of one space, through the project's reader. Never raises on bad data."""
    out = NodeLog(node, space)
    if not (space_dir / "wal").is_dir():
        out.exists = False
        return out
    items: list[tuple[str, int, Any]] = list(dump(space_dir))
    files: dict[str, bytes] = {}
    for i, (path, offset, item) in enumerate(items):
        if isinstance(item, Problem):
            break
        if path not in files:
            files[path] = Path(path).read_bytes()
        data = files[path]
        nxt = items[i + 1] if i + 1 < len(items) else None
        end = nxt[1] if nxt is not None and nxt[0] == path else len(data)
        out.entries[item.sequence] = LogEntry(
            item.sequence, item.epoch, payload_hash(item.payload), data[offset:end]
        )
    report = verify_space(space_dir)
    for p in report.problems:
        text = str(p)
        if "no WAL segments" in text:
            continue
        if "torn tail" in text:
            out.torn_tail = text
        else:
            out.problems.append(text)
    return out


@dataclass
class Violation:
    check: str  # "lost", "async-over-bound", "conflict", "divergent", "corrupt"
    space: str
    text: str
    op: Op | None = None

    def __str__(self) -> str:
        return f"[{self.check}] {self.space}: {self.text}"


@dataclass
class SpaceResult:
    space: str
    policy: str
    members: tuple[str, ...]
    final_primary: str
    final_epoch: int
    acked_ops: int = 0
    acked_entries: int = 0
    refused_ops: int = 0
    indeterminate_ops: int = 0
    lost_entries: int = 0
    lost_ops: int = 0
    conflicts: int = 0
    divergent: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    promotions: int = 0
    possibly_lost: int = 0  # sum of entriesPossiblyLost over the decision records
    possibly_lost_unknown: int = 0  # records whose entriesPossiblyLost was null
    indeterminate_present: int = 0  # entries of indeterminate writes that survived
    reacked: int = 0  # async: sequences acknowledged again after an acknowledged loss
    beyond_model: bool = False  # the faults went beyond what this policy promises to survive
    refused_present: int = 0  # entries of refused writes found in the log
    duplicates: int = 0
    stale_divergent: list[str] = field(default_factory=list)  # non-members
    final_last: int = 0
    converged: str | None = None  # None: converged; else what was still missing
    decisions: list[Mapping[str, Any]] = field(default_factory=list)  # the promotions
    violations: list[Violation] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    def warnings(self) -> list[str]:
        out = []
        if self.beyond_model and self.lost_entries:
            bound = f" (records: at most {self.possibly_lost})" if self.policy == "async" else ""
            out.append(
                f"{self.lost_entries} acknowledged entries lost{bound} under faults beyond "
                f"what {self.policy} promises to survive"
            )
        if self.refused_present:
            out.append(f"{self.refused_present} entries of refused writes are in the log")
        if self.duplicates:
            out.append(f"{self.duplicates} payloads are stored at two sequences")
        if self.stale_divergent:
            out.append(f"non-members hold divergent copies: {', '.join(self.stale_divergent)}")
        if self.converged is not None:
            out.append(f"did not converge after the heal: {self.converged}")
        return out


def _prefix_problem(member: NodeLog, primary: NodeLog) -> str | None:
    """None when `member` is a byte-for-byte prefix of `primary`; otherwise the first reason."""
    if not member.entries:
        return None
    expect = member.first
    for seq in sorted(member.entries):
        if seq != expect:
            return f"gap: holds {seq} after {expect - 1}"
        expect = seq + 1
        mine, theirs = member.entries[seq], primary.entries.get(seq)
        if theirs is None:
            return (
                f"holds sequence {seq} (epoch {mine.epoch}) past the primary's last {primary.last}"
            )
        if mine.raw != theirs.raw:
            return (
                f"differs at sequence {seq}: epoch {mine.epoch} payload {mine.hash[:8]} vs the "
                f"primary's epoch {theirs.epoch} payload {theirs.hash[:8]}"
            )
    return None


def check_space(
    *,
    space: str,
    policy: str,
    ops: Sequence[Op],
    logs: Mapping[str, NodeLog],
    primary: str,
    epoch: int,
    members: Sequence[str],
    decisions: Sequence[Mapping[str, Any]],
    converged: str | None = None,
    loss_promised: bool = True,
) -> SpaceResult:
    """Check one space. `loss_promised=False` (a fault model beyond what the policy promises
    to survive, e.g. `one` under two failures at once): its losses, and async's bound, are
    reported as warnings, not violations; conflicts and divergence are violations always."""
    final = logs.get(primary) or NodeLog(primary, space, exists=False)
    r = SpaceResult(
        space=space,
        policy=policy,
        members=tuple(members),
        final_primary=primary,
        final_epoch=epoch,
        final_last=final.last,
        converged=converged,
    )
    # A record without a winner is a promotion that was planned or refused, not carried out.
    promotions = [d for d in decisions if d.get("winner")]
    r.promotions = len(promotions)
    r.decisions = list(promotions)
    for d in promotions:
        # entriesLost: measured when the deposed primary cut its divergent tail (exact, and
        # it includes every acknowledged write the failover lost); else the decision-time
        # estimate, which can't see writes acknowledged after the old primary's last report.
        measured, lost = d.get("entriesLost"), d.get("entriesPossiblyLost")
        if measured is not None:
            r.possibly_lost += max(int(measured), int(lost or 0))
        elif lost is None:
            r.possibly_lost_unknown += 1
        else:
            r.possibly_lost += int(lost)
    ops = [op for op in ops if op.space == space]
    acked = [op for op in ops if op.outcome == "ok"]
    r.acked_ops = len(acked)
    r.acked_entries = sum(len(op.hashes) for op in acked)
    r.refused_ops = sum(1 for op in ops if op.outcome == "refused")
    r.indeterminate_ops = sum(1 for op in ops if op.outcome == "indeterminate")

    # 1 and 2: acknowledged entries on the final primary.
    for op in acked:
        missing = []
        for seq, h in zip(op.sequences, op.hashes, strict=False):
            e = final.entries.get(seq)
            if e is None or e.hash != h or e.epoch != op.epoch:
                there = "nothing" if e is None else f"epoch {e.epoch} payload {e.hash[:8]}"
                missing.append(f"{seq} (holds {there})")
        if missing:
            r.lost_entries += len(missing)
            r.lost_ops += 1
            if policy in ("quorum", "one") and (loss_promised or policy == "quorum"):
                r.violations.append(
                    Violation(
                        "lost",
                        space,
                        f"{op.describe()}; the final primary {primary} (epoch {epoch}) at "
                        f"sequence {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}",
                        op,
                    )
                )
    if not loss_promised and policy != "quorum":
        r.beyond_model = True
    elif policy == "async" and r.lost_entries > r.possibly_lost:
        unknown = (
            f" ({r.possibly_lost_unknown} records said unknown)" if r.possibly_lost_unknown else ""
        )
        lost_ops = [op for op in acked if _lost_in(op, final)]
        which = "; ".join(
            f"#{op.id} seq {op.first}..{op.last} epoch {op.epoch} acked by {op.node} at "
            f"{op.t1:.2f}s"
            for op in lost_ops[:4]
        )
        r.violations.append(
            Violation(
                "async-over-bound",
                space,
                f"{r.lost_entries} acknowledged entries lost, but the {r.promotions} promotion "
                f"records say at most {r.possibly_lost} were possibly lost{unknown}. Lost: "
                f"{which}{' …' if len(lost_ops) > 4 else ''}",
                lost_ops[0] if lost_ops else None,
            )
        )

    # 3: one sequence, one acknowledged (epoch, payload). Where an acknowledged entry may be lost
    # (async; any policy under faults beyond its promise), the next primary writes that
    # sequence again at its own epoch: that is a conflict only when the two acknowledgements
    # overlapped in time (the old primary still acknowledging after the new one had started),
    # never when the older one was answered before the newer one was sent. Consecutive
    # sequences with the same clash are reported as one violation.
    sequential_ok = policy == "async" or not loss_promised
    by_seq: dict[int, list[tuple[int | None, str, Op]]] = defaultdict(list)
    for op in acked:
        for seq, h in zip(op.sequences, op.hashes, strict=False):
            by_seq[seq].append((op.epoch, h, op))
    runs: list[tuple[int, int, tuple[int | None, int | None], Op, Op]] = []
    for seq in sorted(by_seq):
        acks = sorted(by_seq[seq], key=lambda a: (a[0] or 0, a[2].t0))
        if len({(e, h) for e, h, _ in acks}) < 2:
            continue
        clash = [
            (a, b)
            for i, a in enumerate(acks)
            for b in acks[i + 1 :]
            if (a[0], a[1]) != (b[0], b[1])
            and (not sequential_ok or a[0] == b[0] or a[2].t1 >= b[2].t0)
        ]
        if not clash:
            r.reacked += 1
            continue
        r.conflicts += 1
        (ea, _, oa), (eb, _, ob) = clash[0]
        if runs and runs[-1][1] == seq - 1 and runs[-1][2] == (ea, eb):
            first, _, key, o1, o2 = runs[-1]
            runs[-1] = (first, seq, key, o1, o2)
        else:
            runs.append((seq, seq, (ea, eb), oa, ob))
    for first, last, (ea, eb), oa, ob in runs:
        what = f"at epochs {ea} and {eb}" if ea != eb else f"twice at epoch {ea}"
        seqs = f"sequence {first}" if first == last else f"sequences {first}..{last}"
        r.violations.append(
            Violation(
                "conflict",
                space,
                f"{seqs} acknowledged {what}; the first: {oa.describe()}; and {ob.describe()}",
                ob,
            )
        )

    # 4 and 5: every member a byte-for-byte prefix of the final primary; logs readable.
    for node, log in sorted(logs.items()):
        if log.problems and (node in members or node == primary):
            r.corrupt.append(node)
            r.violations.append(
                Violation("corrupt", space, f"{node}'s WAL: {'; '.join(log.problems[:2])}")
            )
        if node == primary:
            continue
        why = _prefix_problem(log, final)
        if why is None:
            continue
        if node in members:
            r.divergent.append(node)
            r.violations.append(
                Violation("divergent", space, f"{node}'s log is not a prefix of {primary}'s: {why}")
            )
        else:
            r.stale_divergent.append(f"{node} ({why})")

    # Reported only: what else the final log says about the history.
    where: dict[str, list[int]] = defaultdict(list)
    for seq, e in final.entries.items():
        where[e.hash].append(seq)
    r.duplicates = sum(1 for seqs in where.values() if len(seqs) > 1)
    for op in ops:
        present = sum(1 for h in op.hashes if h in where)
        if op.outcome == "refused":
            r.refused_present += present
        elif op.outcome == "indeterminate":
            r.indeterminate_present += present
    return r


def _lost_in(op: Op, final: NodeLog) -> bool:
    return any(
        (e := final.entries.get(seq)) is None or e.hash != h or e.epoch != op.epoch
        for seq, h in zip(op.sequences, op.hashes, strict=False)
    )


def timeline_around(events: Iterable[Any], t0: float, t1: float, *, before: float = 12.0) -> str:
    """The events between t0 - before and t1 + 3 seconds, one per line."""
    return "\n".join(str(e) for e in events if t0 - before <= e.t <= t1 + 3.0)
