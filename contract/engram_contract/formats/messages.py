"""Wire protocol v2, message layer: the body of every frame type but BATCH (see wire_batch).

Each message is a frozen dataclass with `encode() -> bytes` (a whole frame) and
`from_frame(frame)` (validates the header fields the type uses, the ones it must leave zero, and
the exact body length). `decode_message` dispatches on the type. Sans-IO like `wire`: no sockets,
no event loop. Layouts and golden vectors: docs/wire-format.md.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Final, Self

from engram_contract.formats.batch import Batch
from engram_contract.formats.frame import (
    DEFAULT_MAX_BODY,
    NO_SPACE,
    Frame,
    MalformedFrame,
    MessageType,
    encode_frame,
)
from engram_contract.ids import Epoch, NodeName, Sequence

PROTOCOL_VERSION: Final = 2
NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32  # HMAC-SHA256
MAX_NODE_NAME: Final = 253  # bytes of UTF-8; a DNS name, the longest pod name
MAX_NACK_MESSAGE: Final = 512  # bytes of UTF-8; diagnostics, not payload
NO_SEQUENCE: Final = Sequence(0)
NO_EPOCH: Final = Epoch(0)

_HELLO: Final = struct.Struct("<H32s")  # version, nonce; node name follows
_CHALLENGE: Final = struct.Struct("<H32s32s")  # version, nonce, proof; node name follows
# sequence (matched and durable), timestamp_ns, then the replica's log end: last_seq, last_epoch
_ACK: Final = struct.Struct("<QQQQ")
_HEARTBEAT: Final = struct.Struct("<QQQQ")  # last_seq, last_timestamp_ns, sent_ns, last_epoch
_NACK: Final = struct.Struct("<HQQ")  # reason, resend_from, epoch_hint; message follows
_SNAPSHOT_ACK: Final = struct.Struct("<QB")  # sequence held, installed flag


class NackReason(enum.IntEnum):
    STALE_EPOCH = 1  # the frame's epoch is below the receiver's; header epoch = receiver's
    GAP = 2  # the batch does not follow what the receiver holds; resend from `resend_from`
    CHECKSUM = 3  # a batch's entries failed their CRCs although the frame's CRC passed
    UNKNOWN_SPACE = 4  # the receiver hosts no such space
    UNAUTHENTICATED = 5  # handshake failed or not done
    NOT_REPLICA = 6  # the receiver is not a replica of this space at this epoch
    INTERNAL = 7  # the receiver failed (disk full, bug); retry later
    # The entry before the batch is not the one the receiver holds at that sequence. The receiver
    # names its own entry (epoch_hint, resend_from - 1) at or below it; the sender backs up.
    DIVERGED = 8


_RESEND_REASONS: Final = frozenset({NackReason.GAP, NackReason.DIVERGED})


def _check_header(
    frame: Frame, want: MessageType, *, connection: bool, space_optional: bool = False
) -> None:
    if frame.msg_type is not want:
        raise MalformedFrame(f"expected a {want.name} frame, got {frame.msg_type.name}")
    if connection and (frame.epoch != 0 or frame.space != NO_SPACE):
        raise MalformedFrame(f"{want.name} is connection-level: epoch and space must be zero")
    if not connection and not space_optional and frame.space == NO_SPACE:
        raise MalformedFrame(f"{want.name} must name a space")
    if want is not MessageType.BATCH and (frame.first_seq or frame.last_seq or frame.count):
        raise MalformedFrame(f"{want.name} must leave first_seq, last_seq and count zero")


def _check_length(frame: Frame, size: int, *, at_least: bool = False) -> None:
    n = len(frame.body)
    if n < size if at_least else n != size:
        bound = "at least " if at_least else ""
        raise MalformedFrame(f"{frame.msg_type.name} body is {n} bytes, must be {bound}{size}")


def _node_bytes(name: str) -> bytes:
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NODE_NAME:
        raise ValueError(f"node name must be 1-{MAX_NODE_NAME} bytes of UTF-8, got {len(raw)}")
    # Control characters (NUL above all) would make the proofs' NUL-separated input ambiguous.
    if any(c < 0x20 or c == 0x7F for c in raw):
        raise ValueError(f"node name {name!r} contains control characters")
    return raw


def _node_name(frame: Frame, raw: bytes) -> NodeName:
    try:
        name = raw.decode("utf-8")
        _node_bytes(name)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedFrame(f"{frame.msg_type.name} carries an invalid node name: {exc}") from None
    return NodeName(name)


def _need_space(what: str, space: bytes) -> None:
    if space == NO_SPACE:
        raise ValueError(f"{what} must name a space (a 16-byte contract.space_wire_id)")


def _check_fixed(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(value)}")


@dataclass(frozen=True, slots=True)
class Hello:
    """Client → server, first frame: who I am, the highest protocol version I speak, my nonce."""

    node: NodeName
    nonce: bytes
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        _check_fixed("nonce", self.nonce, NONCE_SIZE)
        body = _HELLO.pack(self.version, self.nonce) + _node_bytes(self.node)
        return encode_frame(MessageType.HELLO, body)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.HELLO, connection=True)
        _check_length(frame, _HELLO.size + 1, at_least=True)
        version, nonce = _HELLO.unpack_from(frame.body)
        return cls(_node_name(frame, frame.body[_HELLO.size :]), nonce, version)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Server → client: who I am, the version we'll speak, my nonce, and proof I hold the secret."""

    node: NodeName
    nonce: bytes
    proof: bytes
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        _check_fixed("nonce", self.nonce, NONCE_SIZE)
        _check_fixed("proof", self.proof, PROOF_SIZE)
        body = _CHALLENGE.pack(self.version, self.nonce, self.proof) + _node_bytes(self.node)
        return encode_frame(MessageType.CHALLENGE, body)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.CHALLENGE, connection=True)
        _check_length(frame, _CHALLENGE.size + 1, at_least=True)
        version, nonce, proof = _CHALLENGE.unpack_from(frame.body)
        return cls(_node_name(frame, frame.body[_CHALLENGE.size :]), nonce, proof, version)


@dataclass(frozen=True, slots=True)
class Auth:
    """Client → server: proof that the client holds the secret."""

    proof: bytes

    def encode(self) -> bytes:
        _check_fixed("proof", self.proof, PROOF_SIZE)
        return encode_frame(MessageType.AUTH, self.proof)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.AUTH, connection=True)
        _check_length(frame, PROOF_SIZE)
        return cls(frame.body)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server → client: authenticated; replication frames may flow."""

    def encode(self) -> bytes:
        return encode_frame(MessageType.WELCOME)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.WELCOME, connection=True)
        _check_length(frame, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class Ack:
    """Replica → primary: every entry up to `sequence` is durable and matches the primary's log.

    `sequence` counts only entries proven identical to the primary's at this epoch (log
    matching), so an ack can never vouch for a divergent tail. (`last_epoch`, `last_seq`) is the
    replica's last entry whatever its standing: where a primary starts shipping after a
    reconnect. `timestamp_ns` is the replica's wall clock when sending (RTT and skew readings).
    """

    space: bytes
    epoch: Epoch
    sequence: Sequence
    timestamp_ns: int
    last_seq: Sequence = NO_SEQUENCE
    last_epoch: Epoch = NO_EPOCH

    def encode(self) -> bytes:
        _need_space("ACK", self.space)
        if self.sequence > self.last_seq:
            raise ValueError(f"ACK of sequence {self.sequence} beyond last_seq {self.last_seq}")
        body = _ACK.pack(self.sequence, self.timestamp_ns, self.last_seq, self.last_epoch)
        return encode_frame(MessageType.ACK, body, epoch=self.epoch, space=self.space)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.ACK, connection=False)
        _check_length(frame, _ACK.size)
        seq, ts, last, last_epoch = _ACK.unpack(frame.body)
        if seq > last:
            raise MalformedFrame(f"ACK of sequence {seq} beyond the log's last entry {last}")
        return cls(
            frame.space, Epoch(frame.epoch), Sequence(seq), ts, Sequence(last), Epoch(last_epoch)
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Primary → replica when idle: where the log ends, so an idle, caught-up space reads lag 0.

    (`last_epoch`, `last_seq`) names the primary's last shipped entry: a replica holding that
    same entry has proven its whole log up to it (log matching) without a batch to carry it.
    """

    space: bytes
    epoch: Epoch
    last_seq: Sequence
    last_timestamp_ns: int  # timestamp of entry `last_seq` (0 if the log is empty)
    sent_ns: int  # sender's wall clock when sending
    last_epoch: Epoch = NO_EPOCH

    def encode(self) -> bytes:
        _need_space("HEARTBEAT", self.space)
        if self.last_epoch > self.epoch:
            raise ValueError(f"HEARTBEAT last_epoch {self.last_epoch} above epoch {self.epoch}")
        body = _HEARTBEAT.pack(self.last_seq, self.last_timestamp_ns, self.sent_ns, self.last_epoch)
        return encode_frame(MessageType.HEARTBEAT, body, epoch=self.epoch, space=self.space)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.HEARTBEAT, connection=False)
        _check_length(frame, _HEARTBEAT.size)
        last, last_ts, sent, last_epoch = _HEARTBEAT.unpack(frame.body)
        if last_epoch > frame.epoch:
            raise MalformedFrame(f"HEARTBEAT last_epoch {last_epoch} above its epoch {frame.epoch}")
        return cls(
            frame.space, Epoch(frame.epoch), Sequence(last), last_ts, sent, Epoch(last_epoch)
        )


@dataclass(frozen=True, slots=True)
class Nack:
    """A refusal. `space` is zero for connection-level refusals; `resend_from` is 0 for "none".

    For GAP and DIVERGED, (`epoch_hint`, `resend_from - 1`) is the receiver's own entry at or
    below the batch's previous entry: the sender resends from there if its log holds the same
    entry, and backs up further if not (log matching, design §4).

    `encode` truncates `message` to MAX_NACK_MESSAGE bytes on a character boundary: a refusal
    must never fail to send because its diagnostic was long.
    """

    reason: NackReason
    resend_from: Sequence = NO_SEQUENCE
    message: str = ""
    space: bytes = NO_SPACE
    epoch: Epoch = NO_EPOCH
    epoch_hint: Epoch = NO_EPOCH

    def encode(self) -> bytes:
        if self.reason in _RESEND_REASONS and self.resend_from < 1:
            raise ValueError(
                f"a {self.reason.name} nack must say where to resend from (resend_from >= 1)"
            )
        text = self.message.encode("utf-8")[:MAX_NACK_MESSAGE]
        text = text.decode("utf-8", "ignore").encode("utf-8")
        body = _NACK.pack(self.reason, self.resend_from, self.epoch_hint) + text
        return encode_frame(MessageType.NACK, body, epoch=self.epoch, space=self.space)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.NACK, connection=False, space_optional=True)
        _check_length(frame, _NACK.size, at_least=True)
        if len(frame.body) > _NACK.size + MAX_NACK_MESSAGE:
            raise MalformedFrame(f"NACK message over {MAX_NACK_MESSAGE} bytes")
        code, resend, hint = _NACK.unpack_from(frame.body)
        try:
            reason = NackReason(code)
        except ValueError:
            raise MalformedFrame(f"unknown NACK reason {code}") from None
        if reason in _RESEND_REASONS and resend < 1:
            raise MalformedFrame(f"{reason.name} NACK without a resend_from sequence")
        try:
            text = frame.body[_NACK.size :].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedFrame(f"NACK message is not UTF-8: {exc}") from None
        return cls(reason, Sequence(resend), text, frame.space, Epoch(frame.epoch), Epoch(hint))


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    """Primary -> replica: a snapshot of entries `first_seq..last_seq` follows.

    Body: UTF-8 JSON {"epochs": [[epoch, first_seq], ...], "bytes": total, "segment_bytes": n},
    the primary's epoch history and what the snapshot will weigh, for progress and ETA.
    """

    space: bytes
    epoch: Epoch
    first_seq: Sequence
    last_seq: Sequence
    epochs: tuple[tuple[int, int], ...]
    total_bytes: int
    segment_bytes: int

    def encode(self) -> bytes:
        _need_space("SNAPSHOT_BEGIN", self.space)
        body = json.dumps(
            {
                "epochs": [list(e) for e in self.epochs],
                "bytes": self.total_bytes,
                "segment_bytes": self.segment_bytes,
            },
            separators=(",", ":"),
        ).encode()
        return encode_frame(
            MessageType.SNAPSHOT_BEGIN,
            body,
            epoch=self.epoch,
            space=self.space,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_snapshot_range(frame)
        try:
            doc = json.loads(frame.body)
            epochs = tuple((int(e), int(s)) for e, s in doc["epochs"])
            total, seg = int(doc["bytes"]), int(doc["segment_bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedFrame(f"SNAPSHOT_BEGIN body is not valid: {exc}") from None
        if total < 0 or seg < 4096:
            raise MalformedFrame("SNAPSHOT_BEGIN sizes out of range")
        return cls(
            frame.space,
            Epoch(frame.epoch),
            Sequence(frame.first_seq),
            Sequence(frame.last_seq),
            epochs,
            total,
            seg,
        )


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """Primary -> replica: every chunk of `first_seq..last_seq` was sent; install it."""

    space: bytes
    epoch: Epoch
    first_seq: Sequence
    last_seq: Sequence

    def encode(self) -> bytes:
        _need_space("SNAPSHOT_END", self.space)
        return encode_frame(
            MessageType.SNAPSHOT_END,
            b"",
            epoch=self.epoch,
            space=self.space,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
        )

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_snapshot_range(frame)
        _check_length(frame, 0)
        return cls(
            frame.space, Epoch(frame.epoch), Sequence(frame.first_seq), Sequence(frame.last_seq)
        )


@dataclass(frozen=True, slots=True)
class SnapshotAck:
    """Replica -> primary: the snapshot holds `sequence` (durable); `installed` once swapped in."""

    space: bytes
    epoch: Epoch
    sequence: Sequence
    installed: bool

    def encode(self) -> bytes:
        _need_space("SNAPSHOT_ACK", self.space)
        body = _SNAPSHOT_ACK.pack(self.sequence, int(self.installed))
        return encode_frame(MessageType.SNAPSHOT_ACK, body, epoch=self.epoch, space=self.space)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        _check_header(frame, MessageType.SNAPSHOT_ACK, connection=False)
        _check_length(frame, _SNAPSHOT_ACK.size)
        seq, installed = _SNAPSHOT_ACK.unpack(frame.body)
        if installed not in (0, 1):
            raise MalformedFrame(f"SNAPSHOT_ACK installed flag must be 0 or 1, got {installed}")
        return cls(frame.space, Epoch(frame.epoch), Sequence(seq), bool(installed))


def _check_snapshot_range(frame: Frame) -> None:
    if frame.space == NO_SPACE:
        raise MalformedFrame(f"{frame.msg_type.name} must name a space")
    if frame.first_seq < 1 or frame.last_seq < frame.first_seq - 1 or frame.count:
        raise MalformedFrame(
            f"{frame.msg_type.name} range {frame.first_seq}..{frame.last_seq} is invalid"
        )


Message = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | Batch
    | Ack
    | Heartbeat
    | Nack
    | SnapshotBegin
    | SnapshotEnd
    | SnapshotAck
)


def decode_message(frame: Frame, *, max_batch_size: int = DEFAULT_MAX_BODY) -> Message:
    """The message a frame carries, validated; raises a WireError subclass when it is malformed."""
    match frame.msg_type:
        case MessageType.BATCH:
            return Batch.from_frame(frame, max_size=max_batch_size)
        case MessageType.ACK:
            return Ack.from_frame(frame)
        case MessageType.HEARTBEAT:
            return Heartbeat.from_frame(frame)
        case MessageType.NACK:
            return Nack.from_frame(frame)
        case MessageType.HELLO:
            return Hello.from_frame(frame)
        case MessageType.CHALLENGE:
            return Challenge.from_frame(frame)
        case MessageType.AUTH:
            return Auth.from_frame(frame)
        case MessageType.WELCOME:
            return Welcome.from_frame(frame)
        case MessageType.SNAPSHOT_BEGIN:
            return SnapshotBegin.from_frame(frame)
        case MessageType.SNAPSHOT_CHUNK:
            return Batch.from_frame(frame, max_size=max_batch_size)
        case MessageType.SNAPSHOT_END:
            return SnapshotEnd.from_frame(frame)
        case MessageType.SNAPSHOT_ACK:
            return SnapshotAck.from_frame(frame)
