"""The HMAC-SHA256 challenge-response handshake (engram_sidecar.auth), driven frame by frame.

Protocol v2: HELLO and CHALLENGE carry version 2 in their bodies and every frame's header
carries version 2, so a v1 peer fails on the first frame it reads.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from pathlib import Path

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_contract.formats.frame import (
    CRC_OFFSET,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    MalformedFrame,
    MessageType,
    encode_frame,
)
from engram_contract.formats.handshake import (
    AuthenticationFailed,
    ClientHandshake,
    HandshakeState,
    ServerHandshake,
    client_proof,
    server_proof,
)
from engram_contract.formats.messages import (
    PROTOCOL_VERSION,
    Auth,
    Challenge,
    Hello,
    Nack,
    NackReason,
    Welcome,
)
from engram_contract.ids import NodeName
from engram_contract.tokens import parse_keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"
SECRET = b"engram-test-secret"
CLIENT_NONCE = bytes(range(32))
SERVER_NONCE = bytes(range(32, 64))
C, S = NodeName("node-0"), NodeName("node-1")


def golden(name: str) -> bytes:
    m = re.search(rf"<!-- golden:{name} -->\n```text\n([0-9a-f\s]+?)```", DOC.read_text())
    assert m is not None, f"golden vector {name!r} missing from {DOC}"
    return bytes.fromhex("".join(m.group(1).split()))


def frame(data: bytes) -> Frame:
    (only,) = FrameDecoder().feed(data)
    return only


def pair(
    client_secret: bytes = SECRET, server_secret: bytes = SECRET
) -> tuple[ClientHandshake, ServerHandshake]:
    client = ClientHandshake(secret=client_secret, node=C, nonce=CLIENT_NONCE)
    server = ServerHandshake(secret=server_secret, node=S, nonce=SERVER_NONCE)
    return client, server


def run(client: ClientHandshake, server: ServerHandshake) -> list[bytes]:
    """Shuttle frames until neither side has anything to say; return what crossed the wire."""
    wire = [client.start()]
    to_server = True
    while wire[-1]:
        hs = server if to_server else client
        if hs.state is not HandshakeState.AWAITING:
            break
        wire.append(hs.receive(frame(wire[-1])))
        to_server = not to_server
    return wire


def test_auth_handshake_succeeds_with_golden_frames() -> None:
    client, server = pair()
    wire = run(client, server)
    assert wire[:4] == [golden("hello"), golden("challenge"), golden("auth"), golden("welcome")]
    assert client.done and server.done
    assert (client.peer, server.peer) == (S, C)
    assert client.error is None and server.error is None


def test_auth_golden_frames_speak_version_2() -> None:
    assert PROTOCOL_VERSION == 2
    for name in ("hello", "challenge", "auth", "welcome"):
        assert golden(name)[4] == 2, name  # the frame header's version byte
    assert Hello.from_frame(frame(golden("hello"))).version == 2
    assert Challenge.from_frame(frame(golden("challenge"))).version == 2
    assert golden("hello")[HEADER_SIZE : HEADER_SIZE + 2] == struct.pack("<H", 2)


def _as_v1(data: bytes) -> bytes:
    """`data` with header version 1 and a CRC that matches: what a v1 peer would send."""
    out = bytearray(data)
    out[4] = 1
    out[CRC_OFFSET:HEADER_SIZE] = bytes(4)
    crc = crc32c(bytes(out[HEADER_SIZE:]), crc32c(bytes(out[:HEADER_SIZE])))
    struct.pack_into("<I", out, CRC_OFFSET, crc)
    return bytes(out)


@pytest.mark.parametrize("name", ["hello", "challenge", "welcome"])
def test_auth_v1_peer_fails_at_its_first_header(name: str) -> None:
    v1 = _as_v1(golden(name))
    dec = FrameDecoder()
    with pytest.raises(
        MalformedFrame, match=r"unsupported frame version 1 \(this decoder speaks 2\)"
    ):
        dec.feed(v1[:HEADER_SIZE])  # refused on the header alone, before any body byte
    assert dec.poisoned


def test_auth_proofs_match_documented_formula() -> None:
    want_s = hmac.new(
        SECRET, b"engram-server\0" + CLIENT_NONCE + SERVER_NONCE + b"node-1\0node-0", hashlib.sha256
    ).digest()
    want_c = hmac.new(
        SECRET, b"engram-client\0" + SERVER_NONCE + CLIENT_NONCE + b"node-0\0node-1", hashlib.sha256
    ).digest()
    kw = {"client_nonce": CLIENT_NONCE, "server_nonce": SERVER_NONCE}
    assert server_proof(SECRET, server_node=S, client_node=C, **kw) == want_s
    assert client_proof(SECRET, client_node=C, server_node=S, **kw) == want_c
    challenge = Challenge.from_frame(frame(golden("challenge")))
    assert challenge.proof == want_s
    assert Auth.from_frame(frame(golden("auth"))).proof == want_c


def test_auth_wrong_secret_fails_on_both_sides() -> None:
    client, server = pair(client_secret=b"another-secret")
    wire = run(client, server)
    assert client.failed and server.failed
    assert isinstance(client.error, AuthenticationFailed)
    assert "server node-1 failed to prove it holds the shared secret" in str(client.error)
    nack = Nack.from_frame(frame(wire[2]))
    assert nack.reason is NackReason.UNAUTHENTICATED
    assert isinstance(server.error, AuthenticationFailed)
    assert "node-0 refused the handshake (UNAUTHENTICATED)" in str(server.error)
    assert wire[3] == b""  # the server has nothing left to say; both close


def test_auth_bad_client_proof_fails_on_both_sides() -> None:
    client, server = pair()
    hello = client.start()
    challenge = server.receive(frame(hello))
    auth = client.receive(frame(challenge))
    assert Auth.from_frame(frame(auth))
    refusal = server.receive(frame(Auth(bytes(32)).encode()))
    assert server.failed
    assert "client node-0 failed to prove it holds the shared secret" in str(server.error)
    assert client.receive(frame(refusal)) == b""
    assert client.failed
    assert "node-1 refused the handshake (UNAUTHENTICATED)" in str(client.error)


def test_auth_replayed_client_proof_fails_with_fresh_server_nonce() -> None:
    client, server = pair()
    wire = run(client, server)
    replay_server = ServerHandshake(secret=SECRET, node=S, nonce=bytes(32))
    replay_server.receive(frame(wire[0]))
    out = replay_server.receive(frame(wire[2]))
    assert replay_server.failed
    assert Nack.from_frame(frame(out)).reason is NackReason.UNAUTHENTICATED


def test_auth_client_refuses_unexpected_server_name() -> None:
    client = ClientHandshake(secret=SECRET, node=C, expect_server=NodeName("node-2"), nonce=None)
    server = ServerHandshake(secret=SECRET, node=S)
    run(client, server)
    assert client.failed and server.failed
    assert "dialled node-2 but reached node-1" in str(client.error)


@pytest.mark.parametrize(
    "first",
    [
        encode_frame(MessageType.BATCH, b""),
        Welcome().encode(),
        Auth(bytes(32)).encode(),
        encode_frame(MessageType.HELLO, bytes(34) + b"x", epoch=1),
    ],
    ids=["batch", "welcome", "auth", "hello-with-epoch"],
)
def test_auth_server_refuses_anything_but_a_valid_hello_first(first: bytes) -> None:
    server = ServerHandshake(secret=SECRET, node=S)
    out = server.receive(frame(first))
    assert server.failed
    assert isinstance(server.error, AuthenticationFailed)
    assert Nack.from_frame(frame(out)).reason is NackReason.UNAUTHENTICATED


def test_auth_client_refuses_welcome_before_challenge() -> None:
    client, _ = pair()
    client.start()
    out = client.receive(frame(Welcome().encode()))
    assert client.failed
    assert "expected CHALLENGE, got WELCOME" in str(client.error)
    assert Nack.from_frame(frame(out)).reason is NackReason.UNAUTHENTICATED


def test_auth_client_refuses_unsupported_version() -> None:
    client, _ = pair()
    client.start()
    proof = server_proof(
        SECRET, client_nonce=CLIENT_NONCE, server_nonce=SERVER_NONCE, server_node=S, client_node=C
    )
    client.receive(frame(Challenge(S, SERVER_NONCE, proof, version=3).encode()))
    assert client.failed
    assert "protocol version 3" in str(client.error)


def test_auth_server_negotiates_down_to_its_version() -> None:
    server = ServerHandshake(secret=SECRET, node=S)
    out = server.receive(frame(Hello(C, CLIENT_NONCE, version=7).encode()))
    assert Challenge.from_frame(frame(out)).version == 2


def test_auth_state_machine_misuse_raises() -> None:
    client, server = pair()
    with pytest.raises(RuntimeError, match="before start"):
        client.receive(frame(Welcome().encode()))
    run(client, server)
    with pytest.raises(RuntimeError, match="already done"):
        server.receive(frame(Welcome().encode()))
    with pytest.raises(RuntimeError, match="twice"):
        client.start()
    with pytest.raises(ValueError, match="nonce must be 32 bytes"):
        ClientHandshake(secret=SECRET, node=C, nonce=b"short")
    with pytest.raises(ValueError, match="non-empty"):
        ServerHandshake(secret=b"", node=S)
    with pytest.raises(ValueError, match="control characters"):
        ServerHandshake(secret=SECRET, node=NodeName("bad\0name"))


def test_auth_random_nonces_differ_per_connection() -> None:
    a = Hello.from_frame(frame(ClientHandshake(secret=SECRET, node=C).start()))
    b = Hello.from_frame(frame(ClientHandshake(secret=SECRET, node=C).start()))
    assert a.nonce != b.nonce


names = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    client_secret=st.binary(min_size=1, max_size=64),
    server_secret=st.binary(min_size=1, max_size=64),
    client_name=names,
    server_name=names,
)
def test_auth_succeeds_iff_secrets_match(
    client_secret: bytes, server_secret: bytes, client_name: str, server_name: str
) -> None:
    client_keys, server_keys = parse_keys(client_secret), parse_keys(server_secret)
    if not client_keys or not server_keys:
        with pytest.raises(ValueError, match="no key"):
            ClientHandshake(secret=client_secret, node=NodeName(client_name))
            ServerHandshake(secret=server_secret, node=NodeName(server_name))
        return
    client = ClientHandshake(secret=client_secret, node=NodeName(client_name))
    server = ServerHandshake(secret=server_secret, node=NodeName(server_name))
    run(client, server)
    # One key per line: the server proves its first, which the client must hold; the client
    # then answers with that same key.
    ok = server_keys[0] in client_keys
    assert client.done is ok and server.done is ok
    assert client.failed is not ok and server.failed is not ok


# ---- rotation: several keys, one per line ----------------------------------------------------

OLD, NEW = b"old-secret-0123456789", b"new-secret-0123456789"
# The documented rotation (docs/operations.md): each step's file, on the way from OLD to NEW.
STEPS = [OLD, OLD + b"\n" + NEW, NEW + b"\n" + OLD, NEW]


@pytest.mark.parametrize("step", range(len(STEPS) - 1))
def test_auth_rotation_neighbours_authenticate_both_ways(step: int) -> None:
    """During a rolling rotation, nodes are at two neighbouring steps; any two must connect,
    whichever of them dials."""
    a, b = STEPS[step], STEPS[step + 1]
    for client_secret, server_secret in ((a, b), (b, a)):
        client, server = pair(client_secret, server_secret)
        run(client, server)
        assert client.done and server.done, (client_secret, server_secret)


def test_auth_rotation_skipping_a_step_fails() -> None:
    """OLD alone and NEW alone share no key: skipping the two-key steps locks nodes out."""
    client, server = pair(OLD, NEW)
    run(client, server)
    assert client.failed and server.failed


def test_auth_blank_lines_and_spaces_around_keys_are_ignored() -> None:
    client, server = pair(b"\n  " + OLD + b"  \n\n", OLD + b"\r\n")
    run(client, server)
    assert client.done and server.done
