"""Where the CPU goes: µs of CPU per entry on each hop (primary, replica), at max load.

A primary and one replica (sidecar processes, fsync always, ackPolicy async) take the
throughput writer (8 concurrent requests of 1,000 entries, closed loop) for a fixed time, once
with binary bodies and once with NDJSON ones (the same payloads). Each process's CPU time
(user + system, every thread: /proc/<pid>/stat) over the run, divided by the entries it
handled, is its cost per entry: the primary's hop is HTTP ingest, encoding, the WAL append and
fsync, and shipping; the replica's is receiving, the one validation, the append, fsync and the
ack. Then the binary run again under py-spy (`pip install py-spy`, in the dev extra; sampling
without pausing the process), which attributes that cost to the functions on top of the
stack. Without py-spy, or where it can't attach, the breakdown is skipped and the notes say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engram_bench.load import closed_loop, http_send
from engram_bench.report import Section, fmt_rate
from engram_bench.sidecars import BenchCluster, bench_dir, binary_body, ndjson_body
from engram_contract.formats.records import CONTENT_TYPE

PAYLOAD: Final = 100
REQUEST: Final = 1_000
CONCURRENCY: Final = 8
TOP: Final = 12  # functions shown per hop
_TICK: Final = os.sysconf("SC_CLK_TCK")
_LINE: Final = re.compile(r":\d+\)$")


@dataclass(frozen=True)
class Budget:
    run_s: float
    profile_s: int  # py-spy's --duration is whole seconds


FULL: Final = Budget(5.0, 5)
QUICK: Final = Budget(0.5, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, every thread (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


async def _writer(c: BenchCluster, space: str, *, binary: bool, seconds: float) -> int:
    body = (binary_body if binary else ndjson_body)(REQUEST, PAYLOAD, space)
    send = http_send(
        c.http("p"),
        "POST",
        f"/v1/spaces/{space}/entries",
        body,
        timeout=30.0,
        content_type=CONTENT_TYPE if binary else "application/x-ndjson",
    )
    res = await closed_loop(send, concurrency=CONCURRENCY, duration=seconds)
    return res.ok_requests * REQUEST


async def _measured(c: BenchCluster, space: str, *, binary: bool, seconds: float) -> dict[str, Any]:
    pids = {hop: c[n].pid for hop, n in (("primary", "p"), ("replica", "r"))}
    before = {hop: cpu_seconds(pid) for hop, pid in pids.items()}
    first = int((await c.space_view("p", space))["last_sequence"])
    t0 = time.perf_counter()
    await _writer(c, space, binary=binary, seconds=seconds)
    last = int((await c.space_view("p", space))["last_sequence"])
    t_applied = await c.wait_applied(space, ["r"], last, timeout=120.0)
    entries = last - first
    out: dict[str, Any] = {
        "path": "binary" if binary else "NDJSON",
        "entries": entries,
        "applied_per_s": entries / (t_applied - t0),
    }
    for hop, pid in pids.items():
        used = cpu_seconds(pid) - before[hop]
        out[hop] = {"cpu_s": used, "us_per_entry": used / max(entries, 1) * 1e6}
    return out


def parse_raw(text: str) -> Counter[str]:
    """py-spy `--format raw` (collapsed stacks, "frame;frame;... count") → samples per leaf
    function, line numbers dropped so one function is one row."""
    leaves: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        leaves[_LINE.sub(")", leaf)] += int(count)
    return leaves


async def _profile(
    c: BenchCluster, space: str, spy: str, out_dir: Path, seconds: int
) -> tuple[dict[str, Counter[str]], str | None]:
    """The binary writer under py-spy on both hops; samples per leaf function, or why not."""
    procs = {}
    for hop, node in (("primary", "p"), ("replica", "r")):
        procs[hop] = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(c[node].pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out_dir / f"{hop}.txt"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    await asyncio.sleep(0.3)  # attached before the load starts
    await _writer(c, space, binary=True, seconds=float(seconds))
    result: dict[str, Counter[str]] = {}
    why = None
    for hop, proc in procs.items():
        try:
            _, err = await asyncio.wait_for(proc.communicate(), seconds + 30.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            why = why or f"py-spy on the {hop} did not finish"
            continue
        path = out_dir / f"{hop}.txt"
        if proc.returncode != 0 or not path.exists():
            first = err.decode(errors="replace").strip().splitlines()[:1]
            why = why or f"py-spy could not profile the {hop}: {' '.join(first) or 'no output'}"
            continue
        result[hop] = parse_raw(path.read_text())
    return result, why


async def _main(b: Budget) -> dict[str, Any]:
    data: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix=".engram-bench-cpu-", dir=bench_dir()) as tmp:
        root = Path(tmp)
        async with BenchCluster(root / "nodes") as c:
            c.add_node("p")
            c.add_node("r")
            await c.start()
            for space in ("cpu-bin", "cpu-nd", "cpu-prof"):
                await c.assign(space, "p", ["r"])
                await c.wait_streaming(space, "p")
            # Warm-up: connections open, code paths hot.
            await _writer(c, "cpu-bin", binary=True, seconds=0.2)
            await _writer(c, "cpu-nd", binary=False, seconds=0.2)
            data["runs"] = [
                await _measured(c, "cpu-bin", binary=True, seconds=b.run_s),
                await _measured(c, "cpu-nd", binary=False, seconds=b.run_s),
            ]
            spy = py_spy()
            if spy is None:
                data["profile_skipped"] = "py-spy is not installed (pip install py-spy)"
            else:
                leaves, why = await _profile(c, "cpu-prof", spy, root, b.profile_s)
                data["profile"] = {hop: dict(v.most_common()) for hop, v in leaves.items()}
                if why:
                    data["profile_skipped"] = why
    return data


def run(*, quick: bool) -> list[Section]:
    b = QUICK if quick else FULL
    data = asyncio.run(_main(b))
    s = Section(
        key="cpu",
        title="CPU per entry per hop at max load (fsync always, ackPolicy async)",
        headers=[
            "write path",
            "applied by the replica",
            "primary: µs CPU/entry",
            "replica: µs CPU/entry",
        ],
    )
    for r in data["runs"]:
        s.rows.append(
            [
                r["path"],
                fmt_rate(r["applied_per_s"]),
                f"{r['primary']['us_per_entry']:.2f}",
                f"{r['replica']['us_per_entry']:.2f}",
            ]
        )
    s.notes = [
        f"Writer: {CONCURRENCY} concurrent requests of {REQUEST:,} entries of {PAYLOAD} bytes, "
        f"closed loop, {b.run_s:g} s per path. CPU = user + system time of the process, every "
        "thread (a rotation's fsyncs run in worker threads), over the run, ÷ the entries it "
        "handled. The writer and both processes share the machine's "
        f"{os.cpu_count()} cores; µs per entry, not a rate, is what this table compares.",
        "The replica's cost is the same for both paths (it receives the same stored bytes); "
        "the primary's differs by what parsing the request costs.",
    ]
    sections = [s]
    binary = data["runs"][0]
    profile = data.get("profile", {})
    for hop in ("primary", "replica"):
        leaves = Counter(profile.get(hop, {}))
        total = sum(leaves.values())
        if not total:
            continue
        per_entry = binary[hop]["us_per_entry"]
        p = Section(
            key=f"cpu-{hop}",
            title=f"Where the {hop}'s CPU goes (binary writes, py-spy, top {TOP} functions)",
            headers=["function (where)", "share of samples", "≈ µs/entry"],
        )
        for name, n in leaves.most_common(TOP):
            p.rows.append([name, f"{n / total:.1%}", f"{n / total * per_entry:.2f}"])
        rest = total - sum(n for _, n in leaves.most_common(TOP))
        p.rows.append(["everything else", f"{rest / total:.1%}", f"{rest / total * per_entry:.2f}"])
        p.notes = [
            f"py-spy record --nonblocking --rate 250 for {b.profile_s} s on the {hop} while the "
            f"binary writer ran; {total:,} samples of the busy thread(s) (idle ones are left "
            "out), by the function on top of the stack (self time; C calls such as crc32c are "
            "charged to the Python function that made them). '≈ µs/entry' = share × the "
            f"measured {per_entry:.2f} µs/entry of the table above.",
        ]
        sections.append(p)
    if data.get("profile_skipped"):
        s.notes.append(f"Profile breakdown skipped: {data['profile_skipped']}.")
    if quick:
        for sec in sections:
            sec.notes.append("Quick run (seconds-long smoke test): not the published figures.")
    s.data = data
    return sections
