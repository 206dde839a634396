"""Benchmark: wire protocol BATCH frames, encode and decode, against a bare framing baseline.

A batch is 100 entries with 100-byte payloads (the seed's batch size). The baseline packs a
frame header (`frame.HEADER`) with `struct` and runs CRC32C over the header and the same entry
bytes: that is the least any framing with a checksum can cost in Python. The rows then add what
the protocol does on top: encoding, the incremental decoder, and the receiver's per-entry checks
(entry header CRC, payload CRC, sequence and epoch), without and with zstd.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from crc32c import crc32c

from engram_bench.report import Section, fmt_rate, ratio
from engram_contract.formats.batch import Batch, encode_batch
from engram_contract.formats.entry import HEADER_SIZE as ENTRY_HEADER_SIZE
from engram_contract.formats.entry import encode_entry
from engram_contract.formats.frame import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    FrameDecoder,
    MessageType,
)
from engram_contract.ids import SpaceId, space_wire_id

ENTRIES = 100
PAYLOAD = 100


def _entries() -> bytes:
    rng = random.Random(5)
    # Half random, half repeated text: episode payloads are serialized structs, partly compressible.
    return b"".join(
        encode_entry(
            sequence=s,
            timestamp_ns=1_700_000_000_000_000_000 + s,
            entry_type=1,
            epoch=1,
            payload=rng.randbytes(PAYLOAD // 2) + (b"episode-field:" * PAYLOAD)[: PAYLOAD // 2],
        )
        for s in range(1, ENTRIES + 1)
    )


def _rate(step: Callable[[], object], *, rounds: int, budget_s: float) -> float:
    """Best batches/s over `rounds` timed loops of about `budget_s` each (best resists noise)."""
    best = 0.0
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + budget_s
        while True:
            for _ in range(20):
                step()
            n += 20
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n / (now - t0))
    return best


def run(*, quick: bool) -> Section:
    rounds, budget = (1, 0.2) if quick else (5, 0.6)
    space = space_wire_id(SpaceId("bench"))
    body = _entries()
    assert len(body) == ENTRIES * (ENTRY_HEADER_SIZE + PAYLOAD)

    def bare() -> None:
        head = HEADER.pack(
            MAGIC, VERSION, MessageType.BATCH, 0, 1, space, 1, ENTRIES, ENTRIES, len(body), 0, 0
        )
        crc32c(body, crc32c(head))

    def encoder(compress: bool) -> Callable[[], bytes]:
        def encode() -> bytes:
            return encode_batch(
                space=space,
                epoch=1,
                first_seq=1,
                last_seq=ENTRIES,
                count=ENTRIES,
                entries=body,
                prev_epoch=0,
                compress=compress,
            )

        return encode

    def roundtrip(compress: bool) -> Callable[[], None]:
        encode = encoder(compress)
        decoder = FrameDecoder()

        def step() -> None:
            (frame,) = decoder.feed(encode())
            Batch.from_frame(frame)

        return step

    def frame_only() -> Callable[[], None]:
        data = encoder(False)()
        decoder = FrameDecoder()

        def step() -> None:
            (_frame,) = decoder.feed(data)

        return step

    def decode_only(compress: bool) -> Callable[[], None]:
        data = encoder(compress)()
        decoder = FrameDecoder()

        def step() -> None:
            (frame,) = decoder.feed(data)
            Batch.from_frame(frame)

        return step

    wire_raw = len(encoder(False)())
    wire_zstd = len(encoder(True)())
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("baseline: struct.pack header + crc32c", bare, HEADER_SIZE + len(body)),
        ("encode, raw", encoder(False), wire_raw),
        ("decode frame only (frame CRC), raw", frame_only(), wire_raw),
        ("decode + validate, raw", decode_only(False), wire_raw),
        ("encode + decode + validate, raw", roundtrip(False), wire_raw),
        ("encode, zstd 3", encoder(True), wire_zstd),
        ("decode + validate, zstd 3", decode_only(True), wire_zstd),
        ("encode + decode + validate, zstd 3", roundtrip(True), wire_zstd),
    ]
    rates = {name: _rate(step, rounds=rounds, budget_s=budget) * ENTRIES for name, step, _ in cases}
    base = rates[cases[0][0]]
    section = Section(
        key="wire",
        title="Wire protocol: BATCH frame encode and decode",
        headers=["operation", "entries/s", "µs per batch", "cost vs baseline", "bytes/frame"],
    )
    for name, _, size in cases:
        r = rates[name]
        section.rows.append(
            [name, fmt_rate(r), f"{ENTRIES / r * 1e6:.1f}", ratio(base, r), f"{size:,}"]
        )
    full = rates["encode + decode + validate, raw"]
    section.notes = [
        f"Batches of {ENTRIES} entries with {PAYLOAD}-byte payloads (half random, half text); "
        f"best of {rounds} run(s) of {budget:.2f} s each.",
        f"Baseline: the least a checksummed {HEADER_SIZE}-byte framing costs in Python (one "
        "struct.pack, one "
        "CRC32C over header and body). 'cost vs baseline' is time per batch relative to it "
        "(1.00x = no more than the baseline).",
        "Validate = the receiver's checks: entry header CRC, payload CRC, contiguous sequences, "
        "entry epoch <= frame epoch, plus zstd's declared-size bound when compressed.",
        f"Target: >= 100K entries/s per replica stream; one core encodes + decodes + validates "
        f"{full:,.0f} entries/s uncompressed ({full / 100_000:.1f}x the target).",
    ]
    section.data = {
        "entries_per_batch": ENTRIES,
        "payload_bytes": PAYLOAD,
        "quick": quick,
        "entries_per_s": rates,
        "bytes_per_frame": {name: size for name, _, size in cases},
    }
    return section
