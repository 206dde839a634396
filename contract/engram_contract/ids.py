"""Ids both planes use: the memory space, the node, sequences and epochs, and their validation.

The 16-byte space id that crosses the wire is derived here, so every node computes the same
bytes with no registry.
"""

from __future__ import annotations

import re
import uuid
from typing import Final, NewType

from engram_contract.errors import InvalidSpaceId

SpaceId = NewType("SpaceId", str)
NodeName = NewType("NodeName", str)
Sequence = NewType("Sequence", int)
Epoch = NewType("Epoch", int)

ENV_PREFIX: Final = "ENGRAM_"
METRICS_PREFIX: Final = "engram_replication_"

_SPACE_RE: Final = re.compile(r"[a-z0-9_-]{3,64}")

# Frames carry a 16-byte space id. Engram's ids are strings, not UUIDs, so the wire id is the
# RFC 4122 version-5 UUID of the string under this fixed namespace (uuid5(SPACE_NAMESPACE, id)).
# It is a pure function of the name, so every node derives the same bytes with no registry.
SPACE_NAMESPACE: Final = uuid.UUID("6f1c2a7e-3b5d-5e0a-9c41-0d2e8b7f4a10")


def validate_space_id(space: str) -> SpaceId:
    """Return `space` as a SpaceId, or raise InvalidSpaceId with the rule it broke."""
    if not isinstance(space, str) or _SPACE_RE.fullmatch(space) is None:
        raise InvalidSpaceId(
            f"invalid memory space id {space!r}: use 3 to 64 characters from [a-z0-9_-]"
        )
    return SpaceId(space)


def space_wire_id(space: SpaceId) -> bytes:
    """The 16-byte id that frames carry for `space`."""
    return uuid.uuid5(SPACE_NAMESPACE, space).bytes
