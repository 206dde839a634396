"""The benchmark harness's pure parts: percentiles, open-loop scheduling (coordinated omission),
report rendering, RESP, Redis lag conversion, metric parsing, the assignments it sends and the
raw baselines' framing. Virtual time only: no assertion here depends on how fast this machine
is."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from pathlib import Path

import pytest

from engram_bench import load, redisreport, resp
from engram_bench.ackpolicy import acks_needed
from engram_bench.compression import mixed_body
from engram_bench.load import LoadResult, median_run
from engram_bench.publish import write_results
from engram_bench.redispeer import offset_lag
from engram_bench.replication import lag_goal_met
from engram_bench.report import Section, percentile, ratio
from engram_bench.sidecars import BenchCluster, metric_value, ndjson_body
from engram_bench.summary import goals_section

# ---- percentiles ---------------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100, shuffled order must not matter
    xs.reverse()
    assert percentile(xs, 50) == 50.0
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 99.9) == 100.0
    assert percentile(xs, 100) == 100.0
    assert percentile(xs, 0) == 1.0
    assert percentile([7.0], 99.9) == 7.0
    assert math.isnan(percentile([], 50))


def test_percentile_p999_needs_a_thousand_samples_to_differ_from_max() -> None:
    xs = [float(i) for i in range(1, 1001)]
    assert percentile(xs, 99.9) == 999.0
    assert percentile(xs, 99) == 990.0


def test_ratio_handles_zero_and_nan() -> None:
    assert ratio(2.0, 1.0) == "2.00x"
    assert ratio(1.0, 0.0) == "n/a"
    assert ratio(math.nan, 1.0) == "n/a"


# ---- open loop on virtual time -------------------------------------------------------------------


class VirtualClock:
    """perf_counter and sleep for `load.open_loop`: sleep lets ready tasks run *then* moves time,
    so a send that completes at once completes at the instant it was sent."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        self.now += max(0.0, seconds)


def test_schedule_is_fixed_rate() -> None:
    assert load.schedule(1.0, 4.0, 3) == [1.0, 1.25, 1.5]
    with pytest.raises(ValueError):
        load.schedule(0.0, 0.0, 1)


async def test_open_loop_without_stalls_measures_zero_latency() -> None:
    clock = VirtualClock()

    async def send() -> str:
        return "200"

    res = await load.open_loop(
        send,
        entries_per_request=10,
        request_rate=100.0,
        duration=1.0,
        clock=clock,
        sleep=clock.sleep,
    )
    assert res.scheduled == 100
    assert res.ok == 100
    assert not res.errors
    assert max(res.latencies) == pytest.approx(0.0, abs=1e-9)
    assert res.offered_per_s == 1000.0


async def test_open_loop_charges_a_stall_to_every_request_it_delayed() -> None:
    """Coordinated omission: a 500 ms stall at the third request must show in the ~50 requests
    scheduled during it, not only in the one that saw it (as a closed loop would report)."""
    clock = VirtualClock()
    calls = 0

    async def send() -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            clock.now += 0.5  # the server (or this process) stalls for 500 ms
        return "200"

    res = await load.open_loop(
        send,
        entries_per_request=1,
        request_rate=100.0,
        duration=1.0,
        clock=clock,
        sleep=clock.sleep,
    )
    assert res.ok == 100
    lat = sorted(res.latencies, reverse=True)
    assert lat[0] == pytest.approx(0.5)
    # Requests due 10 ms, 20 ms, ... after the stall began waited 490, 480, ... ms.
    delayed = [x for x in res.latencies if x > 0.005]
    assert len(delayed) >= 49
    assert res.p(99) >= 0.48
    assert res.p(50) >= 0.0
    assert res.p(90) > 0.2  # a closed loop would have reported ~0 here


async def test_open_loop_counts_unanswered_requests_as_errors_with_their_wait() -> None:
    clock = VirtualClock()
    never = asyncio.Event()

    async def send() -> str:
        await never.wait()
        return "200"

    res = await load.open_loop(
        send,
        entries_per_request=1,
        request_rate=10.0,
        duration=0.5,
        timeout=0.01,
        clock=clock,
        sleep=clock.sleep,
    )
    assert res.ok == 0
    assert res.unfinished == 5
    assert res.errors["unfinished"] == 5
    assert len(res.latencies) == 5
    assert not res.sustained


async def test_open_loop_records_error_labels() -> None:
    clock = VirtualClock()
    n = 0

    async def send() -> str:
        nonlocal n
        n += 1
        if n % 2:
            return "503"
        raise ConnectionResetError

    res = await load.open_loop(
        send, entries_per_request=1, request_rate=10.0, duration=0.4, clock=clock, sleep=clock.sleep
    )
    assert res.errors == {"503": 2, "ConnectionResetError": 2}
    assert res.summary()["errors"] == {"503": 2, "ConnectionResetError": 2}


# ---- report rendering ----------------------------------------------------------------------------


def test_section_markdown_table_notes_images() -> None:
    s = Section(key="k", title="T", headers=["a", "b|c"], rows=[["1", "x|y"]], notes=["n1"])
    s.images.append(("alt", "img/p.png"))
    md = s.to_markdown()
    assert md.startswith("## T\n")
    assert "| a | b\\|c |" in md
    assert "|---|---|" in md
    assert "| 1 | x\\|y |" in md
    assert "- n1" in md
    assert "![alt](img/p.png)" in md


def test_section_without_table_renders_notes_only() -> None:
    md = Section(key="k", title="Skipped", headers=[], notes=["why"]).to_markdown()
    assert "|" not in md
    assert "- why" in md


def test_quick_results_never_touch_docs(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "benchmarks.md"
    out = tmp_path / "results" / "latest.json"
    write_results(
        [Section(key="k", title="T", headers=["a"])], docs=docs, json_path=out, quick=True
    )
    assert not docs.exists()
    assert not (tmp_path / "docs").exists()
    assert json.loads(out.read_text())[0]["key"] == "k"


def _lag_series(n: int) -> list[list[float]]:
    return [[i * 0.05, 0.01 * (i % 5), float(i)] for i in range(n)]


def _sections() -> list[Section]:
    loads = [
        {"offered_per_s": x, "p50_s": 0.001, "p99_s": 0.004, "p999_s": 0.006, "achieved_per_s": x}
        for x in (1_000.0, 10_000.0)
    ]
    red = Section(key="redis-throughput-lag", title="Versus Redis", headers=["m"])
    red.data = {
        "redis_version": "7.0.15",
        "latency": [loads, loads],
        "lag": [{"series": _lag_series(10)}, {"series": _lag_series(10)}],
        "lag_offered_per_s": 40_000.0,
        "tput": [{"applied_per_s": 50_000.0}, {"applied_per_s": 200_000.0}],
        "goal": {"met": False},
    }
    lat = Section(key="redis-latency", title="Versus Redis latency", headers=["m"])
    lat.data = {"goal": {"met": False}}
    tput = Section(key="replication-throughput", title="Throughput", headers=["m"])
    tput.data = {"goal": {"goal": 100_000.0, "value": 54_000.0, "met": False}}
    slow = Section(key="lag-slowed", title="Slowed", headers=["m"])
    slow.data = {
        "runs": {
            k: {"series": _lag_series(8), "recovered_s": 0.1}
            for k in ("baseline", "delayed", "paused")
        },
        "goal": {"goal": 1.0, "value": 0.05, "met": True},
    }
    return [tput, slow, red, lat]


def test_goals_table_reports_met_and_not_met() -> None:
    g = goals_section(_sections())
    text = g.to_markdown()
    assert "54,000/s" in text
    assert "**NOT met**" in text
    assert "50,000/s vs Redis 200,000/s" in text
    assert "1,000/s: 4.000 ms vs 4.000 ms" in text
    assert any(r[2] == "met" for r in g.rows)


def test_lag_goal_needs_the_writer_to_have_offered_the_load() -> None:
    kept_up = load.LoadResult(
        offered_per_s=100.0, entries_per_request=1, request_rate=100.0, scheduled=10
    )
    kept_up.achieved_per_s = 99.0
    fell_short = load.LoadResult(
        offered_per_s=100.0, entries_per_request=1, request_rate=100.0, scheduled=10
    )
    fell_short.achieved_per_s = 60.0
    assert lag_goal_met(0.5, kept_up)
    assert not lag_goal_met(1.5, kept_up)
    assert not lag_goal_met(0.5, fell_short)  # a small lag at a load never offered
    lag = Section(key="replication-lag", title="Lag", headers=["m"])
    lag.data = {
        "max_rate_per_s": 250_000.0,
        "runs": [{"share": 0.8, "load": fell_short.summary()}],
        "goal": {"goal": 1.0, "share": 0.8, "value": 0.5, "met": False},
    }
    text = goals_section([lag]).to_markdown()
    assert "max 0.500 s at 200,000/s (writer achieved only 60/s)" in text
    assert "**NOT met**" in text
    ours = {"max_s": 0.5, "max_entries": 10.0}
    cell, met = redisreport._lag_target({**ours, "load": fell_short.summary()})
    assert not met and cell == "max 0.500 s, 10 entries (writer achieved only 60/s)"
    assert redisreport._lag_target({**ours, "load": kept_up.summary()}) == (
        "max 0.500 s, 10 entries",
        True,
    )


def test_full_results_write_docs_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    out = tmp_path / "latest.json"
    write_results(_sections(), docs=docs, json_path=out, quick=False)
    md = docs.read_text()
    assert md.startswith("# Benchmarks")
    assert "Machine: " in md
    assert "## Goals at a glance" in md
    for name in ("latency-vs-load.png", "lag-vs-redis.png", "lag-slowed.png"):
        assert f"](img/{name})" in md
        png = tmp_path / "docs" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = [s["key"] for s in json.loads(out.read_text())]
    assert keys[0] == "goals"


def test_a_full_run_keeps_the_hand_written_sections(tmp_path: Path) -> None:
    """A section no scenario produces (the Kubernetes API load, from tests/k8s) is marked as
    written by hand; regenerating the page keeps it whole, and drops the generated ones it
    replaces."""
    pytest.importorskip("matplotlib")
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    hand = (
        "## Kubernetes API load\n\n"
        "<!-- Written by hand from tests/k8s/test_k8s_api_load.py. -->\n\n"
        "| spaces x nodes | operator requests/s |\n|---|---|\n| 1,000 x 5 | 0.1 |\n"
    )
    docs.write_text(
        "# Benchmarks\n\n## Throughput\n\nan old generated figure\n\n"
        + hand
        + "\n## Gone\n\na section no scenario makes any more\n"
    )
    write_results(_sections(), docs=docs, json_path=tmp_path / "latest.json", quick=False)
    md = docs.read_text()
    assert hand in md
    assert md.index("## Throughput") < md.index("## Kubernetes API load")  # after the run's
    assert "an old generated figure" not in md and "## Gone" not in md
    # And again: a second full run neither loses it nor doubles it.
    write_results(_sections(), docs=docs, json_path=tmp_path / "latest.json", quick=False)
    assert docs.read_text().count("## Kubernetes API load") == 1
    assert hand in docs.read_text()


# ---- RESP ----------------------------------------------------------------------------------------


def test_resp_command_encoding() -> None:
    assert resp.command("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert resp.command("XADD", "s", "*", "p", b"a\r\nb", 7) == (
        b"*6\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$1\r\np\r\n$4\r\na\r\nb\r\n$1\r\n7\r\n"
    )


def test_resp_parse_each_kind() -> None:
    assert resp.parse(b"+OK\r\n") == ("OK", 5)
    assert resp.parse(b":42\r\n") == (42, 5)
    assert resp.parse(b"$3\r\nabc\r\n") == (b"abc", 9)
    assert resp.parse(b"$-1\r\n") == (None, 5)
    assert resp.parse(b"*2\r\n$1\r\na\r\n:1\r\n") == ([b"a", 1], 15)
    err, pos = resp.parse(b"-ERR nope\r\n") or (None, 0)
    assert isinstance(err, resp.RespError)
    assert str(err) == "ERR nope"
    assert pos == 11


def test_resp_parse_incomplete_and_garbage() -> None:
    assert resp.parse(b"$3\r\nab") is None
    assert resp.parse(b"*2\r\n$1\r\na\r\n") is None
    assert resp.parse(b"+OK") is None
    with pytest.raises(resp.RespError):
        resp.parse(b"?what\r\n")
    items, rest = resp.parse_all(b"+A\r\n+B\r\n$5\r\nab")
    assert items == ["A", "B"]
    assert rest == 8


def test_resp_count_bulk_replies_and_info() -> None:
    ids = b"$15\r\n1700000000000-0\r\n$15\r\n1700000000000-1\r\n"
    assert resp.count_bulk_replies(ids) == 2
    assert resp.count_bulk_replies(ids + b"$15\r\n17000") == 2
    assert resp.count_bulk_replies(ids + b"-ERR x\r\n") is None
    info = resp.info_fields(b"# Replication\r\nrole:master\r\nmaster_repl_offset:123\r\n\r\n")
    assert info == {"role": "master", "master_repl_offset": "123"}


def test_xadd_pipeline_is_one_command_per_payload() -> None:
    data = resp.xadd_pipeline("space", [b"x", b"yy"])
    items, rest = resp.parse_all(data)
    assert rest == len(data)
    assert items == [[b"XADD", b"space", b"*", b"p", b"x"], [b"XADD", b"space", b"*", b"p", b"yy"]]
    assert resp.config_args({"save": "", "port": "1"}) == ["--save", "", "--port", "1"]


class _Writer:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        pass


async def _replies(chunks: list[bytes], replies: int) -> int:
    reader = asyncio.StreamReader()
    conn = resp.RespConnection(reader, _Writer())  # type: ignore[arg-type]

    async def feed() -> None:
        for c in chunks:
            await asyncio.sleep(0)
            reader.feed_data(c)

    task = asyncio.create_task(feed())
    errors = await conn.bulk_pipeline(b"ignored", replies)
    await task
    return errors


async def test_bulk_pipeline_counts_replies_split_anywhere() -> None:
    data = b"$3\r\n1-0\r\n$3\r\n1-1\r\n$3\r\n1-2\r\n"
    for cut in range(1, len(data)):
        assert await _replies([data[:cut], data[cut:]], 3) == 0, cut


async def test_bulk_pipeline_counts_error_replies() -> None:
    data = b"$3\r\n1-0\r\n-ERR oom\r\n$3\r\n1-2\r\n"
    for cut in (1, 9, 10, 11, 20):
        assert await _replies([data[:cut], data[cut:]], 3) == 1, cut


# ---- Redis lag conversion ------------------------------------------------------------------------


def test_offset_lag_interpolates_when_the_primary_passed_the_replica() -> None:
    pts = [(0.0, 0, 0), (1.0, 1000, 0), (2.0, 2000, 1000), (3.0, 2000, 2000), (4.0, 3000, 2500)]
    out = offset_lag(pts)
    assert out[0] == (0.0, 0.0, 0)
    # At t=1 the replica lacks byte 1, written between t=0 and t=1: counted from t=0.
    assert out[1] == (1.0, pytest.approx(1.0), 1000)
    # At t=2 the replica has 1000; the primary passed 1000 at t=1.
    assert out[2] == (2.0, pytest.approx(1.0), 1000)
    assert out[3] == (3.0, 0.0, 0)
    # At t=4 the replica has 2500; the primary passed 2500 halfway from t=3 to t=4.
    assert out[4] == (4.0, pytest.approx(0.5), 500)


def test_offset_lag_before_the_first_sample_is_a_lower_bound() -> None:
    out = offset_lag([(5.0, 100, 50), (6.0, 200, 200)])
    assert out[0] == (5.0, 0.0, 50)
    assert out[1] == (6.0, 0.0, 0)


# ---- small pure helpers --------------------------------------------------------------------------


def test_metric_value_sums_matching_series() -> None:
    text = (
        "# HELP engram_replication_bytes_total Replication bytes\n"
        "# TYPE engram_replication_bytes_total counter\n"
        'engram_replication_bytes_total{direction="out"} 1234.0\n'
        'engram_replication_bytes_total{direction="in"} 10.0\n'
        'engram_replication_bytes_created{direction="out"} 1.7e9\n'
        "engram_replication_auth_failures_total 3.0\n"
    )
    total = "engram_replication_bytes_total"
    assert metric_value(text, total, {"direction": "out"}) == 1234.0
    assert metric_value(text, total, {}) == 1244.0
    assert metric_value(text, "engram_replication_auth_failures_total", {}) == 3.0
    assert metric_value(text, "nope", {}) == 0.0


def test_payload_generators_make_exact_sizes() -> None:
    for body in (ndjson_body(5, 100), mixed_body(5, 100)):
        lines = body.splitlines()
        assert len(lines) == 5
        assert {len(x) for x in lines} == {100}
        for x in lines:
            json.loads(x)
    assert mixed_body(3) == mixed_body(3)  # seeded: the same bytes every run


@pytest.mark.parametrize(
    ("policy", "replicas", "needed"),
    [("async", 2, 0), ("one", 2, 1), ("quorum", 2, 1), ("quorum", 4, 2), ("quorum", 1, 1)],
)
def test_acks_needed_matches_the_assignment_rule(policy: str, replicas: int, needed: int) -> None:
    from engram_contract.assignment import Assignment, Member
    from engram_contract.ids import NodeName

    a = Assignment(
        1,
        Member(NodeName("p"), "h:1"),
        tuple(Member(NodeName(f"r{i}"), f"h:{i + 2}") for i in range(replicas)),
        policy,  # type: ignore[arg-type]
    )
    assert a.replicas_needed() == needed
    assert acks_needed(policy, replicas) == needed


# ---- what the bench sends: assignments from the contract's builder, frames in its layout --------


class _RecordingControl:
    """Stands in for the control plane's `SidecarClient`: records each PUT assignment."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, object]]] = []

    async def assign(
        self, http: str, space: str, doc: dict[str, object], *, sent_mono_ns: int
    ) -> dict[str, object]:
        assert sent_mono_ns > 0
        self.sent.append((http, space, dict(doc)))
        return {}

    async def close(self) -> None:
        pass


async def test_bench_assignments_are_the_contracts_document(tmp_path: Path) -> None:
    from engram_contract.assignment import Assignment

    c = BenchCluster(tmp_path)
    for name in ("p", "r", "rd"):
        c.add_node(name)
    control = _RecordingControl()
    c.control = control  # type: ignore[assignment]
    await c.assign("s", "p", ["r", "rd"], ack_policy="quorum", epoch=3, via={"rd": "127.0.0.1:9"})
    assert [http for http, _, _ in control.sent] == [c[n].http for n in ("p", "r", "rd")]
    docs = {json.dumps(doc, sort_keys=True) for _, _, doc in control.sent}
    assert len(docs) == 1  # every member gets the same document
    a = Assignment.from_json(control.sent[0][2])
    assert (a.epoch, a.ack_policy, a.compression) == (3, "quorum", False)
    assert a.primary == c["p"].member()
    assert [m.address for m in a.replicas] == [c["r"].address, "127.0.0.1:9"]
    assert [m.http for m in a.replicas] == [c["r"].http, c["rd"].http]
    assert c.leads == {"s": ("p", 3)}
    await c.close()


def test_raw_frames_use_the_contracts_frame_layout() -> None:
    from engram_bench import rawpeer
    from engram_bench.pipeline import ENTRY_BYTES, PAYLOAD, frame_header, raw_frame
    from engram_contract.formats import entry, frame

    head = frame_header(1234)
    assert len(head) == frame.HEADER_SIZE
    assert struct.unpack_from("<I", head, frame.BODY_LENGTH_OFFSET) == (1234,)
    assert ENTRY_BYTES == entry.HEADER_SIZE + PAYLOAD
    assert len(raw_frame(3)) == frame.HEADER_SIZE + 3 * ENTRY_BYTES
    # The raw peers' script gets the layout from the contract, not typed into it.
    prelude: dict[str, object] = {}
    exec(rawpeer._RAW_PRELUDE, prelude)
    assert (prelude["HDR"], prelude["BODY_LENGTH_OFFSET"]) == (
        frame.HEADER_SIZE,
        frame.BODY_LENGTH_OFFSET,
    )
    assert rawpeer._RAW_SCRIPT.startswith(rawpeer._RAW_PRELUDE)


async def test_raw_sink_answers_each_frame_with_a_bare_header() -> None:
    from engram_bench.pipeline import frame_header, raw_frame
    from engram_bench.rawpeer import RawProcess
    from engram_contract.formats import frame
    from engram_contract.launcher import HOST

    async with RawProcess("sink") as sink:
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, sink.port), 5.0)
        try:
            w.write(frame_header(0) + raw_frame(3) + raw_frame(1))
            await w.drain()
            got = await asyncio.wait_for(r.readexactly(3 * frame.HEADER_SIZE), 5.0)
            assert got == bytes(3 * frame.HEADER_SIZE)
        finally:
            w.close()


def test_partial_results_replace_only_their_sections_and_goals(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# Benchmarks\n\nMachine: x\n\n## Goals at a glance\n\n"
        "| goal | measured in this run | verdict | details and why |\n|---|---|---|---|\n"
        "| kept goal | 1 | met | section 'Other' |\n"
        "| ≥ 100K entries/s per replica stream (aim 500K) | old | met | section 'Throughput' |\n"
        "| lag at 80% of an old max (9,999/s) | old too | met | section 'Throughput' |\n"
        "\n- a note\n\n## Other\n\nold other\n\n## Throughput\n\nold figures\n"
    )
    tput = Section(key="replication-throughput", title="Throughput", headers=["m"], rows=[["new"]])
    tput.data = {"goal": {"goal": 100_000.0, "value": 54_000.0, "met": False}}
    cpu = Section(key="cpu", title="CPU per entry", headers=["n"], rows=[["2.0"]])
    out = tmp_path / "latest.json"
    write_results([tput, cpu], docs=docs, json_path=out, quick=False, partial=True)
    md = docs.read_text()
    assert "old other" in md and "old figures" not in md and "| new |" in md
    assert md.index("## Other") < md.index("## CPU per entry") < md.index("## Throughput")
    assert "| kept goal | 1 | met |" in md
    assert "54,000/s" in md and "| old |" not in md
    assert "old too" not in md  # its section was rewritten, though its name was not measured
    assert json.loads(out.read_text())[1]["key"] == "replication-throughput"
    # A quick run still leaves the page alone, whatever it ran.
    write_results([cpu], docs=docs, json_path=out, quick=True, partial=True)
    assert docs.read_text() == md


def test_tailmode_section_is_a_scenario_and_renders_each_run() -> None:
    from engram_bench.runner import SCENARIOS
    from engram_bench.tailmode import section

    assert "tailmode" in SCENARIOS
    runs = [
        {
            "name": "10K-per-s",
            "entries": 10_000,
            "writer_entries_per_s": 10_010.0,
            "shipped_entries_per_s": 9_990.0,
            "latency_p50_ms": 10.0,
            "latency_p99_ms": 27.4,
            "latency_max_ms": 35.6,
        },
        {
            "name": "max",
            "entries": 200_000,
            "writer_entries_per_s": 600_000.0,
            "shipped_entries_per_s": None,
            "latency_p50_ms": None,
            "latency_p99_ms": None,
            "latency_max_ms": None,
        },
    ]
    s = section(runs, 10.0)
    assert s.key == "tailmode"
    assert s.rows[0][2:5] == ["10,010/s", "9,990/s", "10.00 ms"]
    # A run that never got an ack shows a dash, not a made-up zero.
    assert s.rows[1][3:] == ["-", "-", "-", "-"]
    assert s.data["runs"] == runs


async def test_open_loop_pauses_this_processes_gc_for_the_window_only() -> None:
    import gc

    from engram_bench.load import open_loop

    seen: list[bool] = []

    async def send() -> str:
        seen.append(gc.isenabled())
        return "200"

    assert gc.isenabled()
    res = await open_loop(send, entries_per_request=1, request_rate=200.0, duration=0.05)
    assert res.ok == len(seen) == 10
    assert not any(seen), "a request was sent with the load generator's collector on"
    assert gc.isenabled()


def _run_with_p99(p99: float, *, sustained: bool = True) -> LoadResult:
    r = LoadResult(offered_per_s=1_000, entries_per_request=1, request_rate=1_000, scheduled=100)
    r.latencies = [p99 / 2] * 98 + [p99] * 2
    r.ok = 100
    r.achieved_per_s = 1_000 if sustained else 10
    return r


def test_median_run_reports_the_middle_p99_run_with_every_runs_p99_in_order() -> None:
    runs = [_run_with_p99(0.030), _run_with_p99(0.004), _run_with_p99(0.009)]
    out = median_run(runs)
    assert out["p99_s"] == 0.009 and out["p50_s"] == 0.0045
    assert out["p99_runs_s"] == [0.030, 0.004, 0.009]
    assert median_run(runs[:1])["p99_runs_s"] == [0.030]
    assert median_run(runs[:2])["p99_s"] == 0.030  # the upper middle of an even count
    with pytest.raises(ValueError):
        median_run([])
    # The runs themselves are left as they were; a single run's summary has no spread.
    assert all(not r.p99_runs for r in runs)
    assert "p99_runs_s" not in runs[0].summary()


def test_p99_cell_shows_every_run_only_when_there_were_several() -> None:
    one = median_run([_run_with_p99(0.004)])
    three = median_run([_run_with_p99(x) for x in (0.030, 0.004, 0.009)])
    assert redisreport._p99_cell(one) == "4.000 ms"
    assert redisreport._p99_cell(three) == "9.000 ms (runs: 30.000 ms / 4.000 ms / 9.000 ms)"
    slow = median_run([_run_with_p99(0.5, sustained=False)])
    assert redisreport._p99_cell(slow) == "500.000 ms (NOT sustained)"
    assert redisreport._p99_cell(None) == "not measured"
    assert "median P99" in redisreport._repeats_note({"latency_repeats": 3})
    assert redisreport._repeats_note({}) == "Each latency figure is from one run."
