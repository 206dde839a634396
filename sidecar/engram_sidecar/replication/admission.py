"""Admission of incoming replication connections, before anyone has authenticated.

Anyone who can reach the replication port can open sockets, and until the handshake succeeds
nothing proves they hold the shared secret. So what an unauthenticated socket may cost is bounded
here, at accept: at most `max_connections` open connections in all (each is a file descriptor and
a task), and at most `max_handshakes_per_source` from one source address that have not yet
authenticated. Authenticated connections leave the per-source count: one source may be several
legitimate peers (all of local mode's nodes are 127.0.0.1; pods can share a NAT address), and a
peer that proved the secret is no longer the threat. The transport bounds the rest: a small
frame-body limit and one deadline for the whole handshake (`transport.server_handshake`).

Sans-IO: the listener calls `admit` on accept, `authenticated` after WELCOME and `release` when
the connection ends. Over a cap, `admit` raises `Refused` and the socket is closed at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

RefusalReason = Literal["max_connections", "max_handshakes_per_source"]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = (
    "max_connections",
    "max_handshakes_per_source",
)


class Refused(Exception):
    """A connection over a cap; `reason` names the cap (a metric label)."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted connection. Identity, not value: two sockets from one source are two tickets."""

    source: str
    authenticated: bool = False
    released: bool = False


class Admission:
    __slots__ = ("_handshaking", "_max_connections", "_max_per_source", "_open")

    def __init__(self, *, max_connections: int, max_handshakes_per_source: int) -> None:
        if max_connections < 1 or max_handshakes_per_source < 1:
            raise ValueError("connection caps must be at least 1")
        self._max_connections = max_connections
        self._max_per_source = max_handshakes_per_source
        self._open = 0
        self._handshaking: dict[str, int] = {}

    @property
    def open(self) -> int:
        """Connections admitted and not yet released, authenticated or not."""
        return self._open

    @property
    def handshaking(self) -> int:
        """Admitted connections that have not authenticated yet."""
        return sum(self._handshaking.values())

    def handshaking_from(self, source: str) -> int:
        return self._handshaking.get(source, 0)

    def admit(self, source: str) -> Ticket:
        """A ticket for a new connection from `source`, or Refused when a cap is reached."""
        if self._open >= self._max_connections:
            raise Refused(
                "max_connections",
                f"{self._open} replication connections open, the limit (max_peer_connections)",
            )
        if self.handshaking_from(source) >= self._max_per_source:
            raise Refused(
                "max_handshakes_per_source",
                f"{source} already has {self._max_per_source} handshakes in progress, the limit "
                "(max_peer_handshakes_per_source)",
            )
        self._open += 1
        self._handshaking[source] = self.handshaking_from(source) + 1
        return Ticket(source)

    def authenticated(self, ticket: Ticket) -> None:
        """The connection proved the secret: it no longer counts against its source."""
        if ticket.released or ticket.authenticated:
            return
        ticket.authenticated = True
        self._leave_source(ticket.source)

    def release(self, ticket: Ticket) -> None:
        """The connection ended. Safe to call more than once."""
        if ticket.released:
            return
        ticket.released = True
        self._open -= 1
        if not ticket.authenticated:
            self._leave_source(ticket.source)

    def _leave_source(self, source: str) -> None:
        left = self._handshaking[source] - 1
        if left:
            self._handshaking[source] = left
        else:
            # Drop the key: the table must not grow with every address that ever connected.
            del self._handshaking[source]
