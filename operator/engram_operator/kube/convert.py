"""Pure translations from MemorySpace objects to the control-plane model, and back for placements.

Owns how `spec` becomes a `SpaceSpec` (with the CRD's defaults and rules, because an API server
without the CRD's schema — or an old object — may hand us anything), how `status` becomes the
placement, switchover and promotion the core needs (`status_patch` writes the operator's part
back), and how a decision record fits an Event. No I/O, no clocks read here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from engram_contract.assignment import AckPolicy, AssignmentError, Tuning, parse_duration
from engram_contract.ids import Epoch, NodeName
from engram_operator.model import Placement, SpaceSpec, SwitchoverProgress

# The CRD allows at most 8 replicas (each is one more stream the primary ships).
MAX_REPLICAS: Final = 8
_NODE_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ACK_POLICIES: Final[Mapping[str, AckPolicy]] = {"async": "async", "one": "one", "quorum": "quorum"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecResult:
    """A parsed spec, or the first problem found with it (saying what to fix)."""

    spec: SpaceSpec | None
    problem: str | None = None


def _int(raw: Mapping[str, Any], key: str, default: int, low: int, high: int | None) -> int:
    value = raw.get(key, default)
    if value is None:
        return default
    top = "" if high is None else f" to {high}"
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise ValueError(f"spec.{key} must be an integer from {low}{top}, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool, where: str = "spec") -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _tuning(raw: Mapping[str, Any]) -> Tuning:
    """spec.batch, spec.lag and spec.catchupThreshold, checked as the CRD's schema does (a
    kmock or an edited CRD may let anything through): a bad value is the spec's problem."""
    batch, lag = raw.get("batch") or {}, raw.get("lag") or {}
    if not isinstance(batch, Mapping) or not isinstance(lag, Mapping):
        raise ValueError("spec.batch and spec.lag must be objects")
    doc: dict[str, Any] = {"batch": {}, "lag": {}}
    if batch.get("maxEntries") is not None:
        doc["batch"]["maxEntries"] = batch["maxEntries"]
    if batch.get("maxDelay") is not None:
        delay = batch["maxDelay"]
        if not isinstance(delay, str):
            raise ValueError(f"spec.batch.maxDelay must be a duration like 10ms, got {delay!r}")
        try:
            doc["batch"]["maxDelaySeconds"] = parse_duration(delay)
        except ValueError as err:
            raise ValueError(f"spec.batch.maxDelay: {err}") from None
    for key in ("warningSeconds", "criticalSeconds"):
        if lag.get(key) is not None:
            doc["lag"][key] = lag[key]
    if raw.get("catchupThreshold") is not None:
        doc["catchupThreshold"] = raw["catchupThreshold"]
    try:
        return Tuning.from_json(doc)
    except AssignmentError as err:
        raise ValueError(f"spec.{err}") from None


def parse_spec(raw: Mapping[str, Any]) -> SpecResult:
    """The SpaceSpec that `raw` (MemorySpace.spec) asks for, with the CRD's defaults."""
    try:
        replicas = _int(raw, "replicas", 2, 0, MAX_REPLICAS)
        ack = _ACK_POLICIES.get(str(raw.get("ackPolicy") or "async"))
        if ack is None:
            raise ValueError(
                f"spec.ackPolicy must be async, one or quorum, got {raw.get('ackPolicy')!r}"
            )
        if ack == "one" and replicas < 1:
            raise ValueError("spec.ackPolicy one waits for a replica's ack: needs replicas >= 1")
        if ack == "quorum" and replicas < 2:
            raise ValueError(
                "spec.ackPolicy quorum needs replicas >= 2; use ackPolicy one, or add replicas"
            )
        compression = raw.get("compression") or "none"
        if compression not in ("none", "zstd"):
            raise ValueError(f"spec.compression must be none or zstd, got {compression!r}")
        target = raw.get("targetPrimary")
        if target is not None and (not isinstance(target, str) or not _NODE_RE.fullmatch(target)):
            raise ValueError(f"spec.targetPrimary must be a node name, got {target!r}")
        failover = raw.get("failover") or {}
        if not isinstance(failover, Mapping):
            raise ValueError(f"spec.failover must be an object, got {failover!r}")
        spec = SpaceSpec(
            replicas=replicas,
            ack_policy=ack,
            max_lag_on_failover=_int(raw, "maxLagOnFailover", 10_000, 0, None),
            allow_lagging_failover=_bool(raw, "allowLaggingFailover", False),
            failover_automatic=_bool(failover, "automatic", True, "spec.failover"),
            paused=_bool(raw, "paused", False),
            target_primary=NodeName(target) if target else None,
            compression=compression == "zstd",
            tuning=_tuning(raw),
        )
    except ValueError as err:
        return SpecResult(spec=None, problem=str(err))
    return SpecResult(spec=spec)


def placement_from_status(status: Mapping[str, Any]) -> Placement | None:
    """The placement recorded in status, or None when there is none (or it is malformed)."""
    primary, replicas, epoch = status.get("primary"), status.get("replicas"), status.get("epoch")
    if not isinstance(primary, str) or not isinstance(replicas, list):
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return None
    try:
        return Placement(
            primary=NodeName(primary),
            replicas=tuple(NodeName(r) for r in replicas if isinstance(r, str)),
            epoch=Epoch(epoch),
        )
    except ValueError:
        return None


def placement_fields(placement: Placement) -> dict[str, object]:
    return {
        "primary": placement.primary,
        "replicas": list(placement.replicas),
        "epoch": int(placement.epoch),
    }


def _promotion(status: Mapping[str, Any]) -> tuple[Epoch | None, bool]:
    """(status.lastPromotion's newEpoch, whether it names a winner)."""
    record = status.get("lastPromotion")
    if not isinstance(record, Mapping):
        return None, False
    epoch = record.get("newEpoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return None, False
    return Epoch(epoch), record.get("winner") is not None


def last_promotion_epoch(status: Mapping[str, Any]) -> Epoch | None:
    """The epoch of the last promotion that named a winner."""
    epoch, won = _promotion(status)
    return epoch if won else None


def pending_epoch(status: Mapping[str, Any]) -> Epoch | None:
    """The epoch of a failover recorded but not finished: a lastPromotion without a winner, above
    the placement's epoch (its fence round ran, or may have; nobody was assigned at it)."""
    epoch, won = _promotion(status)
    placed = placement_from_status(status)
    if epoch is None or won or (placed is not None and epoch <= placed.epoch):
        return None
    return epoch


def switchover_from_status(
    status: Mapping[str, Any], *, now: float, wall: float
) -> SwitchoverProgress | None:
    """The switchover progress status recorded, on our monotonic clock (`now` ↔ `wall`)."""
    doc = status.get("switchover")
    if not isinstance(doc, Mapping) or not isinstance(doc.get("target"), str):
        return None

    def mono(key: str) -> float | None:
        value = doc.get(key)
        return None if not isinstance(value, int | float) else now - max(0.0, wall - value)

    started = mono("startedAtUnix")
    return SwitchoverProgress(
        target=NodeName(doc["target"]),
        started_at=now if started is None else started,
        aborted_at=mono("abortedAtUnix"),
        abort_reason=str(doc.get("abortReason", "")),
    )


def event_message(summary: str, record: Mapping[str, object], limit: int) -> str:
    """The summary, then the record as JSON, within `limit` characters.

    The JSON stays parseable: when it doesn't fit, the bulkiest parts go first (the summary it
    repeats, the fence round's per-member answers, then the candidate and exclusion lists; the
    whole record is in status.lastPromotion), and only then is the text cut."""
    doc = dict(record)
    doc.pop("summary", None)
    for step in ("fence", "exclusions", "candidates", None):
        text = f"{summary} | {json.dumps(doc, separators=(',', ':'), sort_keys=True)}"
        if len(text) <= limit or step is None:
            break
        fence = doc.get("fence")
        if step == "fence" and isinstance(fence, Mapping):
            doc["fence"] = {k: v for k, v in fence.items() if k != "members"}
        elif step != "fence":
            doc.pop(step, None)
    return text if len(text) <= limit else text[: limit - 1] + "…"
