"""A WAL writer for the crash test: appends until killed, printing each acknowledged entry.

    python wal_writer.py DATA_DIR SPACE EPOCH SEED SEGMENT_BYTES TASKS

On start it prints `open <last_sequence> <truncated_bytes>`. Then TASKS concurrent tasks append
through a GroupCommit with fsync `always`, and after each append returns, the writer prints one
line per entry, `<sequence> <sha256 of the payload, 16 hex digits>`, with a single unbuffered
write(2) (each line is far below PIPE_BUF, so lines never interleave). A printed line is an
acknowledged entry: the test that SIGKILLs this process checks that every one of them survives.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
from pathlib import Path

from engram_contract.formats.entry import EntryType
from engram_contract.ids import validate_space_id
from engram_sidecar.log.groupcommit import GroupCommit
from engram_sidecar.log.wal import SpaceLog


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def emit(text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(1, data) :]


async def run(
    *, data_dir: Path, space: str, epoch: int, seed: int, segment_bytes: int, tasks: int
) -> None:
    sid = validate_space_id(space)
    lg = SpaceLog(data_dir / sid, space=sid, segment_bytes=segment_bytes)
    emit(f"open {lg.last_sequence} {lg.recovery.truncated_bytes}\n")
    if epoch > lg.last_epoch:
        lg.begin_epoch(epoch)
    gc = GroupCommit(lg, policy="always")
    rng = random.Random(seed)

    async def writer(t: int) -> None:
        i = 0
        while True:
            n = rng.choice((1, 1, 1, 2, 3))  # mostly single entries, some small batches
            payloads = [
                f"{seed}:{t}:{i}:{j}:".encode() + rng.randbytes(rng.randrange(0, 300))
                for j in range(n)
            ]
            first, last = await gc.append(
                [(EntryType.EPISODE_STORE, p) for p in payloads], epoch=epoch
            )
            assert last - first + 1 == n
            emit("".join(f"{first + j} {digest(p)}\n" for j, p in enumerate(payloads)))
            i += 1

    await asyncio.gather(*(writer(t) for t in range(tasks)))


def main(argv: list[str]) -> None:
    data_dir, space, epoch, seed, segment_bytes, tasks = argv
    asyncio.run(
        run(
            data_dir=Path(data_dir),
            space=space,
            epoch=int(epoch),
            seed=int(seed),
            segment_bytes=int(segment_bytes),
            tasks=int(tasks),
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
