"""Connection authentication: HMAC-SHA256 mutual challenge-response on a shared secret.

Sans-IO state machines over wire frames. The transport feeds each decoded `Frame` to
`receive()`, writes whatever bytes come back, and stops when `state` is DONE or FAILED (on
FAILED it writes the returned NACK, if any, then closes and raises `error`).

    client                                   server
    HELLO(node_c, nonce_c)            ->
                                      <-     CHALLENGE(node_s, nonce_s, proof_s)
    AUTH(proof_c)                     ->     (or NACK UNAUTHENTICATED if proof_s is wrong)
                                      <-     WELCOME (or NACK UNAUTHENTICATED)

Each side proves the secret over both nonces, so neither proof can be replayed on another
connection; the proofs carry distinct labels, so a server's proof can't be reflected back as a
client's. Mismatched secrets fail on both sides: the client detects it first and NACKs, so the
server reports it too instead of timing out. Timeouts are the transport's job.

A secret may hold several keys, one per line, during a rotation (engram_contract.tokens): each
side proves with its first key and accepts a proof under any of its keys; the client answers
with the key the server proved, so two nodes authenticate whenever their key sets intersect and
the server's first key is among the client's.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os

from engram_contract.errors import WireError
from engram_contract.formats.frame import Frame, MessageType
from engram_contract.formats.messages import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Hello,
    Nack,
    NackReason,
    Welcome,
)
from engram_contract.ids import NodeName

_SERVER_LABEL = b"engram-server\0"
_CLIENT_LABEL = b"engram-client\0"


class AuthenticationFailed(WireError):
    """The peer could not prove it holds the shared secret, or refused our proof."""


class HandshakeState(enum.Enum):
    AWAITING = "awaiting"
    DONE = "done"
    FAILED = "failed"


def server_proof(
    secret: bytes, *, client_nonce: bytes, server_nonce: bytes, server_node: str, client_node: str
) -> bytes:
    """HMAC-SHA256(secret, "engram-server\\0" ‖ nonce_c ‖ nonce_s ‖ node_s ‖ "\\0" ‖ node_c)."""
    msg = b"".join(
        (
            _SERVER_LABEL,
            client_nonce,
            server_nonce,
            server_node.encode(),
            b"\0",
            client_node.encode(),
        )
    )
    return hmac.digest(secret, msg, hashlib.sha256)


def client_proof(
    secret: bytes, *, client_nonce: bytes, server_nonce: bytes, client_node: str, server_node: str
) -> bytes:
    """HMAC-SHA256(secret, "engram-client\\0" ‖ nonce_s ‖ nonce_c ‖ node_c ‖ "\\0" ‖ node_s)."""
    msg = b"".join(
        (
            _CLIENT_LABEL,
            server_nonce,
            client_nonce,
            client_node.encode(),
            b"\0",
            server_node.encode(),
        )
    )
    return hmac.digest(secret, msg, hashlib.sha256)


def _nonce(nonce: bytes | None) -> bytes:
    if nonce is None:
        return os.urandom(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return nonce


def _secret(secret: bytes) -> tuple[bytes, ...]:
    """The keys of a shared secret: one per line (a rotation holds two). The first proves who we
    are; a peer's proof under any of them is accepted."""
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("the shared secret must be non-empty bytes")
    keys = tuple(k.strip() for k in secret.splitlines() if k.strip())
    if not keys:
        raise ValueError("the shared secret holds no key")
    return keys


class _Handshake:
    __slots__ = ("_error", "_keys", "_node", "_nonce", "_peer", "_secret", "_state")

    def __init__(self, *, secret: bytes, node: NodeName, nonce: bytes | None) -> None:
        self._keys = _secret(secret)
        self._secret = self._keys[0]
        self._node = node
        self._nonce = _nonce(nonce)
        self._state = HandshakeState.AWAITING
        self._peer: NodeName | None = None
        self._error: WireError | None = None

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def done(self) -> bool:
        return self._state is HandshakeState.DONE

    @property
    def failed(self) -> bool:
        return self._state is HandshakeState.FAILED

    @property
    def peer(self) -> NodeName | None:
        """The peer's node name: claimed until DONE, authenticated once DONE."""
        return self._peer

    @property
    def error(self) -> WireError | None:
        """Why the handshake FAILED (an AuthenticationFailed whose cause is any decode error)."""
        return self._error

    def _check_open(self) -> None:
        if self._state is not HandshakeState.AWAITING:
            raise RuntimeError(f"handshake already {self._state.value}; it takes no more frames")

    def _fail(
        self, reason: str, *, tell_peer: bool = True, cause: Exception | None = None
    ) -> bytes:
        self._state = HandshakeState.FAILED
        err = AuthenticationFailed(reason)
        err.__cause__ = cause
        self._error = err
        if not tell_peer:
            return b""
        return Nack(NackReason.UNAUTHENTICATED, message=reason).encode()

    def _peer_refused(self, frame: Frame) -> bytes:
        try:
            nack = Nack.from_frame(frame)
        except WireError as exc:
            return self._fail(f"peer sent a malformed NACK: {exc}", tell_peer=False, cause=exc)
        who = self._peer or "peer"
        return self._fail(
            f"{who} refused the handshake ({nack.reason.name}): {nack.message}", tell_peer=False
        )


class ClientHandshake(_Handshake):
    """The dialling side. `start()` gives the HELLO; then feed every frame to `receive()`.

    `expect_server`, when given, is the node the client meant to reach: a server that
    authenticates under another name is refused (a misrouted address, not a forgery).
    """

    __slots__ = ("_expect", "_started")

    def __init__(
        self,
        *,
        secret: bytes,
        node: NodeName,
        expect_server: NodeName | None = None,
        nonce: bytes | None = None,
    ) -> None:
        super().__init__(secret=secret, node=node, nonce=nonce)
        self._expect = expect_server
        self._started = False
        Hello(node, self._nonce).encode()  # fail at construction on a bad node name

    def start(self) -> bytes:
        """The HELLO frame to send first (once)."""
        if self._started:
            raise RuntimeError("ClientHandshake.start() called twice")
        self._started = True
        return Hello(self._node, self._nonce).encode()

    def receive(self, frame: Frame) -> bytes:
        """Consume one frame; return bytes to send (AUTH, or a NACK on failure, or nothing)."""
        self._check_open()
        if not self._started:
            raise RuntimeError("ClientHandshake.receive() before start()")
        if frame.msg_type is MessageType.NACK:
            return self._peer_refused(frame)
        if self._peer is None:
            return self._on_challenge(frame)
        if frame.msg_type is not MessageType.WELCOME:
            return self._fail(f"expected WELCOME, got {frame.msg_type.name}")
        try:
            Welcome.from_frame(frame)
        except WireError as exc:
            return self._fail(f"malformed WELCOME: {exc}", cause=exc)
        self._state = HandshakeState.DONE
        return b""

    def _on_challenge(self, frame: Frame) -> bytes:
        if frame.msg_type is not MessageType.CHALLENGE:
            return self._fail(f"expected CHALLENGE, got {frame.msg_type.name}")
        try:
            ch = Challenge.from_frame(frame)
        except WireError as exc:
            return self._fail(f"malformed CHALLENGE: {exc}", cause=exc)
        self._peer = ch.node
        if ch.version != PROTOCOL_VERSION:  # v2 only: v1 has no log matching
            return self._fail(f"server {ch.node} chose protocol version {ch.version}")
        if self._expect is not None and ch.node != self._expect:
            return self._fail(f"dialled {self._expect} but reached {ch.node}")
        # The server proved one of our keys: answer with that one, which it therefore holds.
        key = next(
            (
                k
                for k in self._keys
                if hmac.compare_digest(
                    server_proof(
                        k,
                        client_nonce=self._nonce,
                        server_nonce=ch.nonce,
                        server_node=ch.node,
                        client_node=self._node,
                    ),
                    ch.proof,
                )
            ),
            None,
        )
        if key is None:
            return self._fail(
                f"server {ch.node} failed to prove it holds the shared secret "
                f"(the secrets differ between {self._node} and {ch.node}, or it is not ours)"
            )
        proof = client_proof(
            key,
            client_nonce=self._nonce,
            server_nonce=ch.nonce,
            client_node=self._node,
            server_node=ch.node,
        )
        return Auth(proof).encode()


class ServerHandshake(_Handshake):
    """The accepting side. Feed every frame to `receive()`; send what it returns."""

    __slots__ = ("_client_nonce",)

    def __init__(self, *, secret: bytes, node: NodeName, nonce: bytes | None = None) -> None:
        super().__init__(secret=secret, node=node, nonce=nonce)
        self._client_nonce: bytes | None = None
        Hello(node, self._nonce).encode()  # fail at construction on a bad node name

    def receive(self, frame: Frame) -> bytes:
        """Consume one frame; return bytes to send (CHALLENGE, WELCOME, a NACK, or nothing)."""
        self._check_open()
        if frame.msg_type is MessageType.NACK:
            return self._peer_refused(frame)
        if self._client_nonce is None:
            return self._on_hello(frame)
        if frame.msg_type is not MessageType.AUTH:
            return self._fail(f"expected AUTH, got {frame.msg_type.name}")
        try:
            auth = Auth.from_frame(frame)
        except WireError as exc:
            return self._fail(f"malformed AUTH: {exc}", cause=exc)
        assert self._peer is not None
        proofs = [
            client_proof(
                k,
                client_nonce=self._client_nonce,
                server_nonce=self._nonce,
                client_node=self._peer,
                server_node=self._node,
            )
            for k in self._keys
        ]
        if not any(hmac.compare_digest(want, auth.proof) for want in proofs):
            return self._fail(
                f"client {self._peer} failed to prove it holds the shared secret "
                f"(the secrets differ between {self._node} and {self._peer}, or it is not ours)"
            )
        self._state = HandshakeState.DONE
        return Welcome().encode()

    def _on_hello(self, frame: Frame) -> bytes:
        if frame.msg_type is not MessageType.HELLO:
            return self._fail(f"expected HELLO, got {frame.msg_type.name}")
        try:
            hello = Hello.from_frame(frame)
        except WireError as exc:
            return self._fail(f"malformed HELLO: {exc}", cause=exc)
        if hello.version < PROTOCOL_VERSION:
            return self._fail(f"client {hello.node} speaks protocol version {hello.version}")
        self._peer = hello.node
        self._client_nonce = hello.nonce
        proof = server_proof(
            self._secret,
            client_nonce=hello.nonce,
            server_nonce=self._nonce,
            server_node=self._node,
            client_node=hello.node,
        )
        version = min(hello.version, PROTOCOL_VERSION)
        return Challenge(self._node, self._nonce, proof, version).encode()
