"""The sidecar's HTTP API (aiohttp). docs/api.md documents every route with examples.

Errors are JSON `{"error": <code>, "message": <what to fix>}` with the status the doc lists; a
write is either wholly acknowledged or refused: never a silent partial success.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from engram_sidecar.assignment import Assignment, AssignmentError
from engram_sidecar.contract import validate_space_id
from engram_sidecar.entry import ENTRY_TYPE_NAMES, MAX_PAYLOAD
from engram_sidecar.errors import InvalidSpaceId, WalError
from engram_sidecar.node import Node, StaleAssignment
from engram_sidecar.space import NotWritable, Space

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)
_TYPE_BY_NUMBER: dict[int, str] = {int(v): k for k, v in ENTRY_TYPE_NAMES.items()}


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


def _parse_entries(
    raw: bytes, content_type: str, default_type: str | None, max_entries: int
) -> list[tuple[int, bytes]]:
    """Entries of a write request as (type, payload bytes). Raises ValueError with the reason."""
    if content_type == "application/x-ndjson":
        etype = _entry_type(default_type or "episode", "type query parameter")
        out = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError as err:
                raise ValueError(f"line {i + 1}: not JSON: {err}") from err
            out.append((etype, line.strip()))
    else:
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"body is not valid JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise ValueError('body must be {"entries": [{"type": ..., "payload": ...}, ...]}')
        out = []
        for i, e in enumerate(doc["entries"]):
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
                payload = json.dumps(e["payload"], separators=(",", ":")).encode()
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"entries[{i}]: payload over {MAX_PAYLOAD} bytes")
            out.append((etype, payload))
    if not out:
        raise ValueError("no entries in the request")
    if len(out) > max_entries:
        raise ValueError(f"{len(out)} entries in one request; the limit is {max_entries}")
    return out


def _entry_type(value: Any, where: str) -> int:
    if isinstance(value, str) and value in ENTRY_TYPE_NAMES:
        return int(ENTRY_TYPE_NAMES[value])
    raise ValueError(f"{where} must be one of {', '.join(ENTRY_TYPE_NAMES)}, got {value!r}")


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
        raw = bytes(buf)
    except (OSError, ValueError) as err:
        return _error(400, "bad_request", f"could not read the body: {err}")
    if len(raw) > limit:
        return _error(413, "too_large", f"request body over {limit} bytes")
    try:
        records = _parse_entries(
            raw, request.content_type, request.query.get("type"), node.cfg.max_entries_per_request
        )
    except ValueError as err:
        return _error(400, "bad_request", str(err))
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
    try:
        start = int(request.query.get("from", "1"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(400, "bad_request", "from and limit must be integers")
    if start < 1 or not 1 <= limit <= 10_000:
        return _error(400, "bad_request", "from must be >= 1 and limit 1..10000")
    if start < sp.log.first_sequence and sp.log.last_sequence >= sp.log.first_sequence:
        return _error(410, "gone", f"entries before {sp.log.first_sequence} are no longer kept")
    try:
        entries = sp.log.read_entries(max(start, sp.log.first_sequence), limit=limit)
    except WalError as err:
        return _error(500, "wal_error", str(err))
    out = []
    for e in entries:
        item: dict[str, Any] = {
            "sequence": e.sequence,
            "epoch": e.epoch,
            "timestamp_ns": e.timestamp_ns,
            "type": _TYPE_BY_NUMBER.get(e.entry_type, str(e.entry_type)),
        }
        try:
            item["payload"] = json.loads(e.payload)
        except ValueError:
            item["payload_b64"] = base64.b64encode(e.payload).decode()
        out.append(item)
    return web.json_response({"entries": out, "last_sequence": sp.log.last_sequence})


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
        doc = await request.json()
        a = Assignment.from_json(doc)
        changed, sp = node.assign(name, a)
    except (ValueError, AssignmentError, InvalidSpaceId) as err:
        return _error(400, "bad_request", str(err))
    except StaleAssignment as err:
        return _error(409, "stale_epoch", str(err))
    return web.json_response({"changed": changed, **node.space_view(sp)})


def _authorized(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    want = "Bearer " + request.app[TOKEN_KEY]
    return hmac.compare_digest(auth.encode(), want.encode())


async def post_lease(request: web.Request) -> web.Response:
    """Control-plane heartbeat: renews write leases, answers with the node's status."""
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "POST /v1/lease needs Authorization: Bearer <token>")
    try:
        doc = await request.json()
        granted = doc["granted_at_ns"]
        epochs = doc.get("epochs", {})
        if not isinstance(granted, int) or not isinstance(epochs, dict):
            raise ValueError("granted_at_ns must be an integer and epochs an object")
        if not all(isinstance(v, int) for v in epochs.values()):
            raise ValueError("epochs must map space ids to integers")
    except (ValueError, KeyError, TypeError) as err:
        return _error(400, "bad_request", f"lease body: {err}")
    grants = node.grant_leases(granted, epochs)
    return web.json_response({"granted": grants, **node.status()})


async def post_fence(request: web.Request) -> web.Response:
    """Switchover step 1: `epoch` has begun elsewhere; stop writes, report the final sequence."""
    node = request.app[NODE_KEY]
    if not _authorized(request):
        return _error(401, "unauthorized", "POST fence needs Authorization: Bearer <token>")
    sp = _space(request)
    if isinstance(sp, web.Response):
        return sp
    try:
        doc = await request.json()
        epoch = doc["epoch"]
        if not isinstance(epoch, int) or epoch < 1:
            raise ValueError("epoch must be a positive integer")
    except (ValueError, KeyError, TypeError) as err:
        return _error(400, "bad_request", f"fence body: {err}")
    if epoch <= sp.accepted_epoch:
        return _error(409, "stale_epoch", f"epoch {epoch} is not above {sp.accepted_epoch}")
    sp.note_epoch(epoch)
    node.metrics.epoch.labels(sp.id).set(sp.accepted_epoch)
    return web.json_response(
        {
            "last_sequence": sp.log.last_sequence,
            "epoch": sp.accepted_epoch,
            "fenced": sp.fenced_reason,
        }
    )


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].status())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    if node.replication_port == 0:
        return _error(503, "starting", "replication listener not up yet")
    return web.json_response({"ok": True})


def make_app(node: Node) -> web.Application:
    app = web.Application(client_max_size=node.cfg.max_request_bytes + 1024)
    app[NODE_KEY] = node
    app[TOKEN_KEY] = node.cfg.admin_token()
    app.router.add_post("/v1/spaces/{space}/entries", post_entries)
    app.router.add_get("/v1/spaces/{space}/entries", get_entries)
    app.router.add_get("/v1/spaces/{space}", get_space)
    app.router.add_get("/v1/spaces/{space}/epochs", get_epochs)
    app.router.add_put("/v1/spaces/{space}/assignment", put_assignment)
    app.router.add_get("/v1/status", get_status)
    app.router.add_post("/v1/lease", post_lease)
    app.router.add_post("/v1/spaces/{space}/fence", post_fence)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(node.metrics.registry))
    return app
