"""The chaos harness's own parts, fast: the checker on made-up histories and logs, the schedule,
the report, the link routing, and the sidecar's test-only wall-clock offset on a real process."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from tests.chaos import report
from tests.chaos.checker import LogEntry, NodeLog, SpaceResult, check_space, read_log
from tests.chaos.harness import CLOCK_ENV, free_port
from tests.chaos.history import Op, classify, payload_hash
from tests.chaos.links import CP, LinkMatrix
from tests.chaos.nemesis import KINDS, make_schedule
from tests.chaos.run import RunConfig, RunResult

from engram_contract.formats.entry import encode_entry


def _entry(seq: int, epoch: int, payload: bytes) -> LogEntry:
    raw = encode_entry(sequence=seq, timestamp_ns=seq, entry_type=1, epoch=epoch, payload=payload)
    return LogEntry(seq, epoch, payload_hash(payload), raw)


def _log(node: str, items: list[tuple[int, int, bytes]]) -> NodeLog:
    log = NodeLog(node, "s1")
    for seq, epoch, payload in items:
        log.entries[seq] = _entry(seq, epoch, payload)
    return log


def _ok(op_id: int, epoch: int, first: int, payloads: list[bytes], t: float = 0.0) -> Op:
    return Op(
        id=op_id,
        client="c",
        space="s1",
        node="n0",
        t0=t,
        t1=t + 0.01,
        hashes=tuple(payload_hash(p) for p in payloads),
        outcome="ok",
        status=200,
        epoch=epoch,
        first=first,
        last=first + len(payloads) - 1,
    )


def _check(
    policy: str, ops: list[Op], logs: dict[str, NodeLog], decisions: list[dict[str, int]]
) -> SpaceResult:
    return check_space(
        space="s1",
        policy=policy,
        ops=ops,
        logs=logs,
        primary="n0",
        epoch=2,
        members=["n0", "n1", "n2"],
        decisions=[{"winner": "n0", **d} for d in decisions],
    )


def test_checker_passes_a_clean_history() -> None:
    ops = [_ok(1, 1, 1, [b"a", b"b"]), _ok(2, 2, 3, [b"c"])]
    full = [(1, 1, b"a"), (2, 1, b"b"), (3, 2, b"c")]
    logs = {"n0": _log("n0", full), "n1": _log("n1", full[:2]), "n2": _log("n2", full)}
    r = _check("quorum", ops, logs, [])
    assert not r.violations, r.violations
    assert (r.acked_ops, r.acked_entries, r.lost_entries) == (2, 3, 0)


def test_checker_finds_a_lost_write_and_says_which() -> None:
    ops = [_ok(1, 1, 1, [b"a"]), _ok(2, 1, 2, [b"b"], t=5.0)]
    logs = {"n0": _log("n0", [(1, 1, b"a"), (2, 2, b"other")])}
    r = _check("one", ops, logs, [])
    assert [v.check for v in r.violations] == ["lost"]
    assert r.violations[0].op is not None and r.violations[0].op.id == 2
    assert "sequence 2 (holds epoch 2 payload" in r.violations[0].text


def test_checker_bounds_async_losses_by_the_decision_records() -> None:
    ops = [_ok(1, 1, 1, [b"a", b"b", b"c"])]
    logs = {"n0": _log("n0", [(1, 1, b"a")])}
    assert not _check("async", ops, logs, [{"entriesPossiblyLost": 2}]).violations
    r = _check("async", ops, logs, [{"entriesPossiblyLost": 1}])
    assert [v.check for v in r.violations] == ["async-over-bound"]


def test_checker_finds_a_sequence_acknowledged_at_two_epochs() -> None:
    # Overlapping in time: the old primary answered after the new one had acknowledged.
    old = _ok(1, 1, 1, [b"a"], t=1.0)
    old.t1 = 3.0
    new = _ok(2, 2, 1, [b"b"], t=2.0)
    logs = {"n0": _log("n0", [(1, 2, b"b")])}
    r = _check("async", [old, new], logs, [{"entriesPossiblyLost": 1}])
    assert [v.check for v in r.violations] == ["conflict"]
    # One after the other, under async: a loss the records counted, then a new write.
    old.t1 = 1.5
    r = _check("async", [old, new], logs, [{"entriesPossiblyLost": 1}])
    assert not r.violations and r.reacked == 1
    # Under quorum both the loss and the second acknowledgement are violations.
    r = _check("quorum", [old, new], logs, [])
    assert sorted(v.check for v in r.violations) == ["conflict", "lost"]


def test_checker_finds_a_member_that_is_not_a_prefix() -> None:
    full = [(1, 1, b"a"), (2, 1, b"b")]
    logs = {
        "n0": _log("n0", full),
        "n1": _log("n1", [(1, 1, b"a"), (2, 1, b"B")]),  # divergent tail
        "n2": _log("n2", [*full, (3, 1, b"c")]),  # past the primary's end
        "n3": _log("n3", [(1, 1, b"z")]),  # not a member: reported, not failed
    }
    r = _check("quorum", [], logs, [])
    assert sorted(r.divergent) == ["n1", "n2"]
    assert [v.check for v in r.violations] == ["divergent", "divergent"]
    assert r.stale_divergent and r.stale_divergent[0].startswith("n3")


def test_checker_reads_a_real_wal_byte_for_byte(tmp_path: Path) -> None:
    wal = tmp_path / "s1" / "wal"
    wal.mkdir(parents=True)
    entries = [_entry(s, 1, f"p{s}".encode()) for s in (1, 2, 3)]
    (wal / "00000000000000000001.wal").write_bytes(b"".join(e.raw for e in entries))
    log = read_log("n0", "s1", tmp_path / "s1")
    assert [log.entries[s].raw for s in (1, 2, 3)] == [e.raw for e in entries]
    assert not log.problems


def test_history_classifies_answers() -> None:
    assert classify(200, {}) == "ok"
    assert classify(421, {"error": "not_primary"}) == "refused"
    assert classify(503, {"error": "unavailable"}) == "refused"
    assert classify(503, {"error": "not_acknowledged"}) == "indeterminate"
    assert classify(None, None) == "indeterminate"


def test_schedule_is_a_function_of_the_seed() -> None:
    nodes, spaces = ["node-0", "node-1", "node-2"], ["quorum", "one", "async"]
    a = make_schedule(7, 200, nodes, spaces, KINDS)
    assert a == make_schedule(7, 200, nodes, spaces, KINDS)
    assert a != make_schedule(8, 200, nodes, spaces, KINDS)
    assert {s.kind for s in a} == set(KINDS)
    without = make_schedule(7, 50, nodes, spaces, [k for k in KINDS if k != "disk-full"])
    assert all(s.kind != "disk-full" for s in without)


def test_report_keeps_the_hand_written_part(tmp_path: Path) -> None:
    path = tmp_path / "reliability.md"
    path.write_text("# Reliability\n\nWhat each guarantee assumes.\n\n" + report.MARKER + "\nold\n")
    result = RunResult(RunConfig(seed=3), tmp_path)
    result.faults.update({"kill": 2})
    report.write(path, [result], repo=tmp_path)
    text = path.read_text()
    assert text.startswith("# Reliability\n\nWhat each guarantee assumes.\n")
    assert "old" not in text and "| `kill` | 2 |" in text and text.count(report.MARKER) == 1


async def test_links_route_by_the_process_that_dialled() -> None:
    """This process (the control plane) and a child process (node a) dial the same router; each
    lands on its own FaultProxy, so cutting one directed link leaves the other working, and a
    process nobody knows is refused."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100))
        await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    owners: dict[int, str] = {os.getpid(): CP}
    matrix = LinkMatrix(["a", "b"], lambda n, k: port, lambda: owners)
    await matrix.start()
    host, rport = matrix.address("b", "http").split(":")

    async def dial_here(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(rport))
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(100), 0.5)
        except TimeoutError:
            return b"(timeout)"
        except ConnectionResetError:
            return b"(reset)"
        finally:
            writer.close()

    async def dial_from_child() -> bytes:
        code = (
            "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])));"
            "s.settimeout(2); s.sendall(b'child'); sys.stdout.write(s.recv(100).decode())"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, host, rport, stdout=asyncio.subprocess.PIPE
        )
        owners[proc.pid] = "a"
        out, _ = await asyncio.wait_for(proc.communicate(), 10.0)
        return out

    try:
        assert await dial_here(b"hello") == b"hello"
        assert await dial_from_child() == b"child"
        assert matrix.proxies[(CP, "b", "http")].stats["connections"] == 1
        assert matrix.proxies[("a", "b", "http")].stats["connections"] == 1
        matrix.drop(CP, "b")  # cut the control plane -> b only
        assert await dial_here(b"lost") == b"(timeout)"
        assert await dial_from_child() == b"child"
        await matrix.heal()
        assert matrix.faulty_links() == []
        assert await dial_here(b"back") == b"back"
        owners.clear()
        assert await dial_here(b"who") in (b"", b"(reset)")
        assert matrix.counters()["unidentified"] == 1
    finally:
        await matrix.stop()
        server.close()


@pytest.mark.timeout(60)
async def test_sidecar_wall_clock_offset_hook(tmp_path: Path) -> None:
    """ENGRAM_TEST_WALL_CLOCK_OFFSET_S skews the sidecar's wall clock (its log lines' times, which
    logging takes from time.time) and is not mistaken for a setting."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    http = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    env[CLOCK_ENV] = "-3600"
    args = [
        *("-m", "engram_sidecar", "--node", "n0", "--data-dir", str(tmp_path / "data")),
        *("--http-port", str(http), "--replication-port", str(free_port())),
        *("--secret-file", str(secret), "--kube-enabled", "false"),
    ]
    log_path = tmp_path / "n0.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            for _ in range(300):
                try:
                    async with s.get(f"http://127.0.0.1:{http}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the sidecar never got ready: {log_path.read_text()}")
        real = time.time()
        line = next(x for x in log_path.read_text().splitlines() if "wall clock is offset by" in x)
        assert "offset by -3600.000 s" in line, line
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        assert -3660 < stamp - real < -3540, (line, real)
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10.0)
