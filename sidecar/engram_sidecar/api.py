"""The sidecar's HTTP API (aiohttp). docs/api.md documents every route with examples.

Errors are JSON `{"error": <code>, "message": <what to fix>}` with the status the doc lists; a
write is either wholly acknowledged or refused: never a silent partial success.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from engram_contract.assignment import (
    INCARNATION_RULE,
    MAX_EPOCH,
    Assignment,
    AssignmentError,
    valid_incarnation,
)
from engram_contract.formats import records as records_format
from engram_contract.formats.entry import (
    ENTRY_TYPE_NAMES,
    MAX_PAYLOAD,
    Entry,
    Record,
    iter_entries,
)
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE
from engram_contract.ids import validate_space_id
from engram_contract.tokens import KeyFile
from engram_sidecar.config import BATCH_BODY_RESERVE, batch_body_bytes
from engram_sidecar.errors import EngramError, InvalidSpaceId, SequenceError, WalError
from engram_sidecar.grants import Grant
from engram_sidecar.log.offload import prepare_read
from engram_sidecar.log.wal import SpaceLog
from engram_sidecar.node import Node, OtherIncarnation, StaleAssignment, incarnation_of
from engram_sidecar.replication.matching import epoch_at
from engram_sidecar.space.hosted import Space
from engram_sidecar.space.membership import NotWritable

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
# How a write's parse gives the loop a turn between slices; injectable to observe it.
PAUSE_KEY: web.AppKey[Callable[[], Awaitable[None]]] = web.AppKey("pause")
TOKEN_KEY: web.AppKey[KeyFile] = web.AppKey("token", KeyFile)
_TYPE_BY_NUMBER: dict[int, str] = {int(v): k for k, v in ENTRY_TYPE_NAMES.items()}
# Deeper than any real payload, and far enough under the interpreter's recursion limit that a
# document that passed can be re-encoded anywhere in a handler without a RecursionError.
MAX_JSON_DEPTH: Final = 128
MAX_SEQUENCE: Final = MAX_EPOCH  # sequences are u64 on disk and wire; int64 for every consumer
_READ_CHUNK: Final = 1 << 20  # WAL bytes read per step of GET …/entries
# Entries a write parses between turns of the event loop: well under 1 ms of json.loads, so a
# lease renewal never waits behind a whole 10,000-entry request. 256 measured worse (a heartbeat
# waited ~3x longer under 8 concurrent writers) and 64 cost no throughput (docs/design-notes.md).
PARSE_SLICE: Final = 64


class JsonError(ValueError):
    """A body is not JSON this API accepts; the message says why."""


def load_json(raw: bytes | str) -> Any:
    """Parse JSON strictly and with bounded nesting: every handler's one way to read a body.

    json.loads recurses per level, so 100000 `[` raise RecursionError (a 500, not a 400); the
    depth is bounded here instead. NaN and Infinity are not JSON (RFC 8259): stored, they would
    be served back as a body no strict client can parse.
    """
    try:
        # What json.loads does, minus building a decoder per call (it does whenever given an
        # option): that was a quarter of an NDJSON line's parse (issue 13).
        text = (
            raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
        )
        doc = _DECODER.decode(text)
    except RecursionError:
        raise JsonError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:
        raise JsonError(str(err)) from None
    # A document with no more brackets than the limit can't nest deeper than it: the walk is
    # only for the rest (counting is C speed; the walk was another quarter of a line's parse).
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and not _nesting_within(
        doc, MAX_JSON_DEPTH
    ):
        raise JsonError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


async def read_json(request: web.Request) -> Any:
    """The request's body through `load_json` (aiohttp's size limit applies to the read)."""
    return load_json(await request.read())


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_DECODER: Final = json.JSONDecoder(parse_constant=_not_json)


def _nesting_within(doc: Any, limit: int) -> bool:
    """True if no array or object in `doc` sits more than `limit` levels deep. No recursion."""
    level = [doc]
    for _ in range(limit):
        level = [c for v in level for c in _children(v) if isinstance(c, dict | list)]
        if not level:
            return True
    return False


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        return value.values()
    return value if isinstance(value, list) else ()


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


def _space(request: web.Request) -> Space | web.Response:
    name = request.match_info["space"]
    node = request.app[NODE_KEY]
    try:
        validate_space_id(name)
    except InvalidSpaceId as err:
        return _error(400, "invalid_space", str(err))
    sp = node.lookup(name)
    if sp is None or sp.assignment is None:
        return _error(404, "unknown_space", f"space {name!r} is not assigned to node {node.name}")
    return sp


async def pass_the_loop() -> None:
    """One turn of the event loop to whatever else is ready (the default `PAUSE_KEY`)."""
    await asyncio.sleep(0)


async def parse_entries_in_slices(
    raw: bytes,
    content_type: str,
    default_type: str | None,
    max_entries: int,
    *,
    pause: Callable[[], Awaitable[None]] = pass_the_loop,
    max_payload: int = MAX_PAYLOAD,
) -> list[tuple[int, bytes]]:
    """`_parse_entries`, awaiting `pause` after every PARSE_SLICE entries.

    Parsing is per-entry Python work (a json.loads per NDJSON line): 10,000 entries hold the
    loop for tens of milliseconds, and a few such requests at once held it for up to a second,
    long enough to lapse a write lease whose renewal waited behind them (issue 13). In slices,
    a control request waits for at most one slice of each write in progress.
    """
    steps = _parse_steps(raw, content_type, default_type, max_entries, max_payload=max_payload)
    while (out := _next_slice(steps)) is None:
        await pause()
    return out


def _parse_entries(
    raw: bytes,
    content_type: str,
    default_type: str | None,
    max_entries: int,
    *,
    max_payload: int = MAX_PAYLOAD,
) -> list[tuple[int, bytes]]:
    """Entries of a write request as (type, payload bytes). Raises ValueError with the reason."""
    steps = _parse_steps(raw, content_type, default_type, max_entries, max_payload=max_payload)
    while (out := _next_slice(steps)) is None:
        pass
    return out


def _next_slice(
    steps: Generator[None, None, list[tuple[int, bytes]]],
) -> list[tuple[int, bytes]] | None:
    """Parse one more slice: the entries once the parse is done, else None (never empty: an
    empty request raises)."""
    try:
        next(steps)
    except StopIteration as done:
        out: list[tuple[int, bytes]] = done.value
        return out
    return None


def _parse_steps(
    raw: bytes,
    content_type: str,
    default_type: str | None,
    max_entries: int,
    *,
    max_payload: int = MAX_PAYLOAD,
) -> Generator[None, None, list[tuple[int, bytes]]]:
    """The parse, as a generator that stops after each PARSE_SLICE entries (its callers decide
    what happens in between) and returns the entries."""
    if content_type == "application/x-ndjson":
        etype = _entry_type(default_type or "episode", "type query parameter")
        out: list[tuple[int, bytes]] = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            if len(out) % PARSE_SLICE == PARSE_SLICE - 1:
                yield
            try:
                load_json(line)
            except ValueError as err:
                raise ValueError(f"line {i + 1}: not JSON: {err}") from err
            payload = line.strip()
            if len(payload) > max_payload:
                raise ValueError(f"line {i + 1}: payload over {max_payload} bytes")
            out.append((etype, payload))
    else:
        try:
            doc = load_json(raw)
        except ValueError as err:
            raise ValueError(f"body is not valid JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise ValueError('body must be {"entries": [{"type": ..., "payload": ...}, ...]}')
        out = []
        for i, e in enumerate(doc["entries"]):
            if i % PARSE_SLICE == PARSE_SLICE - 1:
                yield
            if not isinstance(e, dict) or "payload" not in e:
                raise ValueError(f"entries[{i}] must be an object with a payload")
            extra = set(e) - {"type", "payload", "payload_b64"}
            if extra:
                raise ValueError(f"entries[{i}]: unknown field(s) {', '.join(sorted(extra))}")
            etype = _entry_type(e.get("type", "episode"), f"entries[{i}].type")
            if e.get("payload_b64") is not None:
                try:
                    payload = base64.b64decode(e["payload_b64"], validate=True)
                except (binascii.Error, TypeError) as err:
                    raise ValueError(f"entries[{i}].payload_b64 is not base64: {err}") from err
            else:
                payload = _compact(e["payload"], f"entries[{i}].payload")
            if len(payload) > max_payload:
                raise ValueError(f"entries[{i}]: payload over {max_payload} bytes")
            out.append((etype, payload))
    if not out:
        raise ValueError("no entries in the request")
    if len(out) > max_entries:
        raise ValueError(f"{len(out)} entries in one request; the limit is {max_entries}")
    return out


def _compact(value: Any, where: str) -> bytes:
    try:
        # 1e400 parses as inf, which json.dumps would write as the non-JSON token Infinity.
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as err:
        raise ValueError(f"{where}: {err} (a number too large for a double)") from err


def _entry_type(value: Any, where: str) -> int:
    if isinstance(value, str) and value in ENTRY_TYPE_NAMES:
        return int(ENTRY_TYPE_NAMES[value])
    raise ValueError(f"{where} must be one of {', '.join(ENTRY_TYPE_NAMES)}, got {value!r}")


def _frame_overflow(records: Sequence[Record], max_frame_bytes: int) -> str | None:
    """Why the entries can't travel in one replication frame, or None if they can.

    Config keeps every request within a frame as sent; JSON payloads are re-encoded when stored
    (`\u00e9` escapes, number forms), which can grow them past it. Such a write would be
    acknowledged and then never reach a replica, so it is refused here.
    """
    need = batch_body_bytes(sum(len(p) for _, p in records), len(records))
    if need <= max_frame_bytes:
        return None
    return (
        f"the entries need {need} bytes in a replication frame (payloads as stored, "
        f"{ENTRY_HEADER_SIZE} bytes of header each, {BATCH_BODY_RESERVE} of batch overhead); "
        f"the limit is max_frame_bytes ({max_frame_bytes}). Split the write"
    )


async def post_entries(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    limit = node.cfg.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, "too_large", f"request body over {limit} bytes")
    try:
        # StreamReader.read(n) returns what has arrived so far, not the whole body: loop to EOF
        # (or just past the limit), else a large body is cut at a chunk boundary.
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await request.content.read(limit + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
    except (OSError, ValueError) as err:
        return _error(400, "bad_request", f"could not read the body: {err}")
    if len(buf) > limit:
        return _error(413, "too_large", f"request body over {limit} bytes")
    records: Sequence[Record]
    if request.content_type == records_format.CONTENT_TYPE:
        try:
            # Payloads as bytes, which the GC does not track (records.decode_records).
            records = records_format.decode_records(
                buf, max_records=node.cfg.max_entries_per_request
            )
        except records_format.RecordsError as err:
            return _error(400, err.code, str(err), record=err.record, offset=err.offset)
    else:
        try:
            records = await parse_entries_in_slices(
                bytes(buf),
                request.content_type,
                request.query.get("type"),
                node.cfg.max_entries_per_request,
                pause=request.app[PAUSE_KEY],
            )
        except ValueError as err:
            return _error(400, "bad_request", str(err))
    # The records hold copies of their payloads: the body need not wait for the fsync too.
    del buf
    overflow = _frame_overflow(records, node.cfg.max_frame_bytes)
    if overflow is not None:
        return _error(413, "too_large", overflow)
    try:
        first, last, epoch = await node.write(sp, records)
    except NotWritable as err:
        code = "not_primary" if err.status == 421 else err.code
        node.metrics.write_errors.labels(sp.id, code).inc()
        if err.status == 421:
            extra = {"primary": err.primary} if err.primary else {}
            return _error(421, "not_primary", err.reason, **extra)
        return _error(503, code, err.reason)
    except WalError as err:
        node.metrics.write_errors.labels(sp.id, "wal").inc()
        return _error(503, "wal_error", f"the write was not acknowledged: {err}")
    return web.json_response({"first_sequence": first, "last_sequence": last, "epoch": epoch})


async def get_entries(request: web.Request) -> web.Response:
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    cap = request.app[NODE_KEY].cfg.max_response_bytes
    try:
        start = int(request.query.get("from", "1"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(400, "bad_request", "from and limit must be integers")
    try:
        max_bytes = int(request.query.get("max_bytes", str(cap)))
    except ValueError:
        return _error(400, "bad_request", "max_bytes must be an integer")
    if start < 1 or not 1 <= limit <= 10_000:
        return _error(400, "bad_request", "from must be >= 1 and limit 1..10000")
    if start > MAX_SEQUENCE:
        return _error(400, "bad_request", f"from must be at most {MAX_SEQUENCE}")
    if not 1 <= max_bytes <= cap:
        return _error(400, "bad_request", f"max_bytes must be 1..{cap} (max_response_bytes)")
    log = sp.log
    if start < log.first_sequence and log.last_sequence >= log.first_sequence:
        return _error(410, "gone", f"entries before {log.first_sequence} are no longer kept")
    start = max(start, log.first_sequence)
    # Old segments the page may read are indexed in a worker thread, not by the read on the loop.
    offload = request.app[NODE_KEY].offload
    for seg in log.segments:
        if seg.first_sequence < start + limit and seg.last_sequence >= start:
            await prepare_read(log, max(start, seg.first_sequence), offload)
    try:
        items, next_seq = _read_page(_entries_from(log, start, limit), max_bytes, start)
    except SequenceError:
        # Retention released the range between the check above and the read.
        return _error(410, "gone", f"entries before {log.first_sequence} are no longer kept")
    except WalError as err:
        return _error(500, "wal_error", str(err))
    more = next_seq <= log.last_sequence
    # Assembled by hand so each entry is encoded once, and its size known as it is added.
    body = (
        '{"entries": [' + ", ".join(items) + f'], "last_sequence": {log.last_sequence}, '
        f'"next_sequence": {next_seq}, "more": {json.dumps(more)}}}'
    )
    return web.Response(text=body, content_type="application/json")


def _entries_from(log: SpaceLog, start: int, limit: int) -> Iterable[Entry]:
    """Up to `limit` entries from `start`, read from the WAL a chunk at a time, as consumed."""
    seq, left = start, limit
    while left > 0 and seq <= log.last_sequence:
        r = log.read(seq, max_entries=left, max_bytes=_READ_CHUNK)
        if r.count == 0:
            return
        yield from iter_entries(r.data)
        seq, left = r.last_sequence + 1, left - r.count


def _read_page(entries: Iterable[Entry], max_bytes: int, start: int) -> tuple[list[str], int]:
    """Encoded entries whose list stays within `max_bytes`, cut at an entry boundary, and the
    sequence to continue from. The first entry is kept even if larger: a reader must progress.
    """
    items: list[str] = []
    used = 0
    next_seq = start
    for e in entries:
        item = _encode_entry(e)
        cost = len(item) + (2 if items else 0)  # ASCII (ensure_ascii): characters are bytes
        if items and used + cost > max_bytes:
            return items, e.sequence
        items.append(item)
        used += cost
        next_seq = e.sequence + 1
        if used >= max_bytes:
            break
    return items, next_seq


def _encode_entry(e: Entry) -> str:
    item: dict[str, Any] = {
        "sequence": e.sequence,
        "epoch": e.epoch,
        "timestamp_ns": e.timestamp_ns,
        "type": _TYPE_BY_NUMBER.get(e.entry_type, str(e.entry_type)),
    }
    try:
        item["payload"] = load_json(e.payload)
        return json.dumps(item, allow_nan=False)
    except ValueError:
        # Not JSON, too deep, or a number out of a double's range (an NDJSON line is stored as
        # sent): the bytes, so the answer stays JSON every client can parse.
        item.pop("payload", None)
        item["payload_b64"] = base64.b64encode(e.payload).decode()
        return json.dumps(item)


async def get_space(request: web.Request) -> web.Response:
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    return web.json_response(request.app[NODE_KEY].space_view(sp))


async def get_epochs(request: web.Request) -> web.Response:
    """The space's epoch history: a deposed primary uses it to find its fork point."""
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    return web.json_response(
        {
            "epoch": sp.accepted_epoch,
            "epochs": [[e, q] for e, q in sp.log.history],
            "last_sequence": sp.log.last_sequence,
        }
    )


async def put_assignment(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "PUT assignment needs Authorization: Bearer <token>")
    name = request.match_info["space"]
    try:
        doc = await read_json(request)
        a = Assignment.from_json(doc)
        changed, sp = await node.accept(name, a, grant=_pushed_grant(request))
    except (ValueError, AssignmentError, InvalidSpaceId) as err:
        return _error(400, "bad_request", str(err))
    except StaleAssignment as err:
        return _error(409, "stale_epoch", str(err))
    except EngramError as err:  # the assignment or the log could not be stored
        return _error(507, "storage_error", f"cannot apply the assignment: {err}")
    return web.json_response({"changed": changed, **node.space_view(sp)})


def _authorized(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    got = auth.encode()
    # Every key of the file (two during a rotation); compare with each, whatever matched.
    matches = [hmac.compare_digest(got, b"Bearer " + k) for k in request.app[TOKEN_KEY].accepted()]
    return any(matches)


def _pushed_grant(request: web.Request) -> Grant | None:
    """The control plane's send stamp on a pushed assignment (headers), if it sent one."""
    source = request.headers.get("X-Engram-Control-Plane", "")
    sent = request.headers.get("X-Engram-Sent-Mono-Ns", "")
    if not source or not sent.isdigit() or len(sent) > 20:
        return None
    try:
        seconds = _lease_seconds(request.headers.get("X-Engram-Lease-Seconds"))
    except ValueError:
        return None
    return Grant(source=source[:128], sent_ns=int(sent), seconds=seconds)


def _lease_seconds(value: object) -> float | None:
    """The lease length a grant offers (None: the node's own). Raises ValueError if invalid."""
    if value is None:
        return None
    seconds = float(value) if isinstance(value, (int, float, str)) else math.nan
    if isinstance(value, bool) or not 0 < seconds <= 3600:
        raise ValueError("lease_seconds must be a number of seconds in (0, 3600]")
    return seconds


async def post_lease(request: web.Request) -> web.Response:
    """Control-plane heartbeat: renews write leases, answers with the node's status.

    Body: {"control_plane": id, "sent_mono_ns": its monotonic clock at send, "epochs": {space:
    epoch}}. Without the first two (an older control plane) nothing is granted: a grant that
    can't be judged late or not is not trusted.
    """
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "POST /v1/lease needs Authorization: Bearer <token>")
    try:
        doc = await read_json(request)
        if not isinstance(doc, dict):
            raise ValueError("the body must be a JSON object")
        epochs = doc.get("epochs", {})
        source = doc.get("control_plane", "")
        sent = doc.get("sent_mono_ns", 0)
        if not isinstance(epochs, dict) or not all(
            isinstance(v, int) and 0 < v <= MAX_EPOCH for v in epochs.values()
        ):
            raise ValueError("epochs must map space ids to epochs (integers 1..2^63-1)")
        if not isinstance(source, str) or not isinstance(sent, int) or not 0 <= sent <= MAX_EPOCH:
            raise ValueError("control_plane must be a string and sent_mono_ns an integer >= 0")
        seconds = _lease_seconds(doc.get("lease_seconds"))
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        return _error(400, "bad_request", f"lease body: {err}")
    if doc.get("handles_drain") is True:
        node.note_drain_handler()
    if source and epochs:
        grants = node.grant_leases(
            Grant(source=source[:128], sent_ns=sent, seconds=seconds), epochs
        )
    else:
        grants = {sid: False for sid in epochs}
    return web.json_response({"granted": grants, **node.status()})


async def post_fence(request: web.Request) -> web.Response:
    """`epoch` has begun (a promotion or switchover is under way): on any member, record it
    durably, so frames of older epochs are refused from now on; a primary stops acknowledging.

    Answers the last entry this node holds durably, (last_epoch, last_sequence): taken after
    the fence, so no write of an older epoch can be acknowledged through this node afterwards.
    The control plane elects among such answers (design §4). Idempotent for the same epoch.
    """
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "POST fence needs Authorization: Bearer <token>")
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    try:
        doc = await read_json(request)
        epoch = doc["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= MAX_EPOCH:
            raise ValueError("epoch must be an integer 1..2^63-1")
        incarnation = doc.get("incarnation")
        if incarnation is not None and not valid_incarnation(incarnation):
            raise ValueError(INCARNATION_RULE)
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        return _error(400, "bad_request", f"fence body: {err}")
    held = incarnation_of(sp)
    if incarnation is not None and held is not None and held != incarnation:
        # This node's log is another life of the space: it must not be elected for this one.
        return _error(
            409, "other_incarnation", f"space {sp.id} here is incarnation {held}, not {incarnation}"
        )
    if epoch < sp.accepted_epoch:
        return _error(409, "stale_epoch", f"epoch {epoch} is below {sp.accepted_epoch}")
    try:
        sp.note_epoch(epoch)
        if sp.role == "primary" and epoch > sp.assignment_epoch():
            sp.fence(f"control plane began epoch {epoch}")
        await sp.writer.sync_all()
    except (OSError, EngramError) as err:
        sp.writer.note_error(err)
        return _error(507, "storage_error", f"cannot record epoch {epoch}: {err}")
    node.metrics.epoch.labels(sp.id).set(sp.accepted_epoch)
    durable = sp.log.durable_sequence
    return web.json_response(
        {
            "epoch": sp.accepted_epoch,
            "last_sequence": durable,
            "last_epoch": epoch_at(sp.log.history, durable),
            "fenced": sp.fenced_reason,
            "role": sp.role,
        }
    )


async def post_retire(request: web.Request) -> web.Response:
    """The space's MemorySpace was deleted: stop it here for good, keep or delete its files.

    Body: {"incarnation": uid (optional), "delete": bool}. Idempotent; answers whether the
    space was hosted here and whether its files were kept (`Node.retire`)."""
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "POST retire needs Authorization: Bearer <token>")
    name = request.match_info["space"]
    try:
        validate_space_id(name)
        doc = await read_json(request)
        if not isinstance(doc, dict):
            raise ValueError("the body must be a JSON object")
        incarnation, delete = doc.get("incarnation"), doc.get("delete", False)
        if incarnation is not None and not valid_incarnation(incarnation):
            raise ValueError(INCARNATION_RULE)
        if not isinstance(delete, bool):
            raise ValueError("delete must be true or false")
    except (ValueError, InvalidSpaceId, RecursionError) as err:
        return _error(400, "bad_request", f"retire body: {err}")
    try:
        answer = await node.retire(name, incarnation=incarnation, delete=delete)
    except OtherIncarnation as err:
        return _error(409, "other_incarnation", str(err))
    except OSError as err:
        return _error(507, "storage_error", f"cannot retire space {name}: {err}")
    return web.json_response(answer)


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].status())


async def healthz(request: web.Request) -> web.Response:
    # The name lets a prober tell this node from another that now holds its old address (a
    # reused pod IP): an answer from the wrong node must not make a dead one look alive.
    return web.json_response({"ok": True, "node": request.app[NODE_KEY].name})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every hosted space is caught up (a rollout moves on only then)."""
    node = request.app[NODE_KEY]
    if node.replication_port == 0:
        return _error(503, "starting", "replication listener not up yet")
    why = node.readiness()
    if why is not None:
        return _error(503, "draining" if node.draining else "not_caught_up", why)
    return web.json_response({"ok": True, "node": node.name})


def make_app(
    node: Node, *, pause: Callable[[], Awaitable[None]] = pass_the_loop
) -> web.Application:
    app = web.Application(client_max_size=node.cfg.max_request_bytes + 1024)
    app[NODE_KEY] = node
    app[PAUSE_KEY] = pause
    app[TOKEN_KEY] = node.cfg.admin_tokens()
    app.router.add_post("/v1/spaces/{space}/entries", post_entries)
    app.router.add_get("/v1/spaces/{space}/entries", get_entries)
    app.router.add_get("/v1/spaces/{space}", get_space)
    app.router.add_get("/v1/spaces/{space}/epochs", get_epochs)
    app.router.add_put("/v1/spaces/{space}/assignment", put_assignment)
    app.router.add_get("/v1/status", get_status)
    app.router.add_post("/v1/lease", post_lease)
    app.router.add_post("/v1/spaces/{space}/fence", post_fence)
    app.router.add_post("/v1/spaces/{space}/retire", post_retire)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(node.metrics.registry))
    return app
