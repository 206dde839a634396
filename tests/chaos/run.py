"""One chaos run: start a cluster, write while the nemesis works, heal, wait, check, report.

`run_chaos` never raises for what it finds: the `RunResult` holds the checker's verdicts, the
fault counts, the timeline and the harness's own problems; `format_failure` turns a failed run
into a report that names the seed, the replay command, each violating write and the faults and
control-plane decisions around it. The run's artifacts (history, timeline, schedule, node logs)
stay in its directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.checker import SpaceResult, Violation, check_space, read_log, timeline_around
from tests.chaos.harness import ChaosCluster, Event
from tests.chaos.history import Writers
from tests.chaos.nemesis import KINDS, MODELS, Nemesis, describe_schedule, make_schedule

from engram_operator.model import SpaceSpec


@dataclass(frozen=True)
class RunConfig:
    seed: int
    nodes: int = 3
    faults: int = 6
    rate: float = 200.0  # entries per second, all writers together
    model: str = "single"  # nemesis.MODELS
    time_limit: float = 900.0  # for the schedule; the heal and the checks come after
    converge_timeout: float = 45.0

    @property
    def label(self) -> str:
        return f"seed {self.seed}, {self.nodes} nodes, {self.faults} faults, model {self.model}"

    @property
    def replay(self) -> str:
        return (
            f"make chaos SEED={self.seed} NODES={self.nodes} FAULTS={self.faults} "
            f"MODEL={self.model}"
        )


def spaces_for(nodes: int) -> dict[str, SpaceSpec]:
    """One space per ack policy; on 5 nodes the quorum space spans all five."""
    return {
        "quorum": SpaceSpec(replicas=4 if nodes >= 5 else 2, ack_policy="quorum"),
        "one": SpaceSpec(replicas=2, ack_policy="one"),
        "async": SpaceSpec(replicas=2, ack_policy="async"),
    }


@dataclass
class RunResult:
    config: RunConfig
    root: Path
    spaces: list[SpaceResult] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    schedule: str = ""
    events: list[Event] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    links: dict[str, int] = field(default_factory=dict)
    available: dict[str, bool] = field(default_factory=dict)
    skipped_kinds: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0
    error: str = ""  # the harness itself failed (the run is incomplete)
    artifacts: Path = Path()

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    @property
    def failed(self) -> bool:
        return bool(self.error) or any(s.failed for s in self.spaces)

    def summary(self) -> str:
        per = "; ".join(
            f"{s.space} ({s.policy}): {s.acked_entries} acked, {s.lost_entries} lost, "
            f"{s.conflicts} conflicting, {len(s.divergent)} divergent"
            for s in self.spaces
        )
        verdict = "FAILED" if self.failed else "ok"
        return (
            f"chaos {self.config.label}: {verdict}; {self.injected} faults injected in "
            f"{self.duration:.0f} s; {per}"
        )


async def _final_write(writers: Writers, cluster: ChaosCluster, space: str) -> bool:
    """One write after the heal, retried for up to 20 s: is the space available again?"""
    deadline = time.monotonic() + 20.0
    n = 0
    while time.monotonic() < deadline:
        node = cluster.primary(space)
        if node is not None:
            n += 1
            op, _ = await writers.write("final", space, node, n, 1)
            if op.outcome == "ok":
                return True
        await asyncio.sleep(0.3)
    return False


async def run_chaos(
    root: Path,
    cfg: RunConfig,
    *,
    register: Callable[[ChaosCluster], None] | None = None,
    say: Callable[[str], None] = print,
) -> RunResult:
    started = time.monotonic()
    spaces = spaces_for(cfg.nodes)
    cluster = ChaosCluster(root, cfg.nodes, spaces, seed=cfg.seed)
    if register is not None:
        register(cluster)
    result = RunResult(cfg, root, artifacts=_artifacts_dir(cfg))
    writers: Writers | None = None
    say(f"chaos {cfg.label}: starting under {root}")
    try:
        await cluster.start()
        kinds = list(KINDS) if cfg.model == "multi" else [k for k in KINDS if k != "split"]
        if cluster.tmpfs is None:
            kinds.remove("disk-full")
            result.skipped_kinds["disk-full"] = cluster.tmpfs_skip_reason
            say(f"chaos {cfg.label}: disk-full faults skipped: {cluster.tmpfs_skip_reason}")
        schedule = make_schedule(cfg.seed, cfg.faults, sorted(cluster.nodes), list(spaces), kinds)
        result.schedule = describe_schedule(schedule)
        assert cluster.session is not None and cluster.links is not None
        links = cluster.links
        writers = Writers(
            spaces=list(spaces),
            session=cluster.session,
            primary_of=cluster.primary,
            direct=lambda n: cluster.nodes[n].direct,
            node_of_http=links.node_of_http,
            now=cluster.now,
            seed=cfg.seed,
            rate=cfg.rate,
        )
        writers.start()
        nemesis = Nemesis(cluster, schedule, cfg.seed, MODELS[cfg.model])
        try:
            await nemesis.run(time.monotonic() + cfg.time_limit)
        finally:
            await nemesis.heal_everything()
            result.faults = nemesis.counts
        with contextlib.suppress(AssertionError):
            await cluster.wait_for(cluster.steady, 30.0, "steady after the heal")
        await asyncio.sleep(1.0)  # the writers go on a moment against the healed cluster
        await writers.finish()
        for sid in spaces:
            result.available[sid] = await _final_write(writers, cluster, sid)
        pending: dict[str, str | None] = {}
        deadline = time.monotonic() + cfg.converge_timeout
        while time.monotonic() < deadline:
            pending = {sid: await cluster.converged(sid) for sid in spaces}
            if not any(pending.values()):
                break
            await asyncio.sleep(0.25)
        cluster.note("harness", f"convergence: {pending}")
        await cluster.stop_control()
        placements = {sid: cluster.placement(sid) for sid in spaces}
        decisions = {sid: cluster.decisions(sid) for sid in spaces}
        await asyncio.gather(*(cluster.terminate(n) for n in cluster.nodes))
        for sid, spec in spaces.items():
            p = placements[sid]
            assert p is not None, f"space {sid} was never placed"
            logs = {
                name: read_log(name, sid, node.data_dir / sid)
                for name, node in cluster.nodes.items()
            }
            result.spaces.append(
                check_space(
                    space=sid,
                    policy=spec.ack_policy,
                    ops=writers.history.ops,
                    logs={n: log for n, log in logs.items() if log.exists},
                    primary=p.primary,
                    epoch=int(p.epoch),
                    members=[str(m) for m in p.members],
                    decisions=decisions[sid],
                    converged=pending.get(sid),
                    loss_promised=cfg.model == "single",
                )
            )
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}"
        cluster.note("harness", f"the run stopped: {result.error}")
    finally:
        if writers is not None:
            with contextlib.suppress(Exception):
                await writers.finish()
        result.events = list(cluster.events)
        result.problems = list(cluster.problems)
        result.crashes = list(cluster.crashes)
        result.tracebacks = cluster.tracebacks() if cluster.nodes else []
        result.links = cluster.links.counters() if cluster.links is not None else {}
        await cluster.close()
        result.duration = time.monotonic() - started
        _save_artifacts(result, writers)
    say(result.summary())
    return result


ARTIFACTS = Path(tempfile.gettempdir()) / "engram-chaos"
KEEP_ARTIFACTS = 30  # run directories kept under ARTIFACTS


def _artifacts_dir(cfg: RunConfig) -> Path:
    """A directory outside pytest's rotating tmp dirs (other test sessions prune those)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ARTIFACTS / f"{stamp}-n{cfg.nodes}-seed{cfg.seed}-{os.getpid()}"
    with contextlib.suppress(OSError):
        old = sorted(p for p in ARTIFACTS.iterdir() if p.is_dir())
        for p in old[: max(0, len(old) - KEEP_ARTIFACTS + 1)]:
            shutil.rmtree(p, ignore_errors=True)
    return dest


def _save_artifacts(result: RunResult, writers: Writers | None) -> None:
    """History, timeline, schedule, the report, cluster.json and the node logs."""
    dest = result.artifacts
    with contextlib.suppress(OSError):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "schedule.txt").write_text(result.schedule + "\n")
        (dest / "timeline.txt").write_text("\n".join(str(e) for e in result.events) + "\n")
        if writers is not None:
            with (dest / "history.jsonl").open("w") as f:
                for op in writers.history.ops:
                    f.write(json.dumps(op.to_json()) + "\n")
        for name in [p.name for p in result.root.glob("*.log")] + ["cluster.json"]:
            with contextlib.suppress(OSError):
                shutil.copy(result.root / name, dest / name)
        (dest / "result.txt").write_text(format_failure(result, limit=50) + "\n")


def format_failure(result: RunResult, *, limit: int = 2) -> str:
    """What a run found, for a person: the seed and the replay command, then per space and per
    kind of violation how many and the first `limit` in full (the first with the faults and
    decisions around it), then crashes and the harness's own problems."""
    cfg = result.config
    out = [
        result.summary(),
        f"replay: {cfg.replay}   (or: pytest tests/chaos --chaos -m chaos --chaos-seed "
        f"{cfg.seed} --chaos-nodes {cfg.nodes} --chaos-faults {cfg.faults} --chaos-model "
        f"{cfg.model})",
        f"artifacts (history.jsonl, timeline.txt, schedule.txt, node logs): {result.artifacts}",
        f"cluster data (WALs; pytest prunes it): {result.root}",
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items())),
        "links: " + ", ".join(f"{k} {v}" for k, v in sorted(result.links.items())),
    ]
    if result.error:
        out.append(f"THE HARNESS STOPPED: {result.error}")
    for s in result.spaces:
        out.append(
            f"-- space {s.space} ({s.policy}): final primary {s.final_primary} at epoch "
            f"{s.final_epoch}, last sequence {s.final_last}, members {', '.join(s.members)}; "
            f"{s.acked_ops} writes acknowledged ({s.acked_entries} entries), {s.refused_ops} "
            f"refused, {s.indeterminate_ops} indeterminate; {s.promotions} promotions "
            f"(entriesPossiblyLost sum {s.possibly_lost}); lost {s.lost_entries}"
        )
        for w in s.warnings():
            out.append(f"   warning: {w}")
        if result.available.get(s.space) is False:
            out.append("   warning: no write succeeded within 20 s after the heal")
        checks: dict[str, list[Violation]] = {}
        for v in s.violations:
            checks.setdefault(v.check, []).append(v)
        for check, found in checks.items():
            out.append(f"   {len(found)} × {check}:")
            for i, v in enumerate(found[:limit]):
                out.append(f"   VIOLATION {v}")
                if i == 0 and v.op is not None:
                    out.append("     timeline around it (full: timeline.txt):")
                    window = [
                        line
                        for line in timeline_around(result.events, v.op.t0, v.op.t1).splitlines()
                        if "decision record:" not in line  # listed below, by summary
                    ]
                    out.extend("       " + _short(line) for line in window[-30:])
        if s.violations:
            for d in s.decisions:
                out.append(
                    f"   decision: epoch {d.get('newEpoch')}: {_short(str(d.get('summary')))}"
                )
    if result.crashes:
        out.append("node crashes: " + "; ".join(result.crashes[:5]))
    if result.problems:
        out.append("harness problems: " + "; ".join(result.problems[:5]))
    for tb in result.tracebacks[:2]:
        out.append("node traceback: " + tb)
    return "\n".join(out)


def _short(text: str, limit: int = 220) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_json(result: RunResult) -> dict[str, Any]:
    """The numbers docs/reliability.md is made of."""
    return {
        "seed": result.config.seed,
        "nodes": result.config.nodes,
        "faults_planned": result.config.faults,
        "model": result.config.model,
        "faults": dict(result.faults),
        "duration": round(result.duration, 1),
        "error": result.error,
        "failed": result.failed,
        "crashes": len(result.crashes),
        "spaces": [
            {
                "space": s.space,
                "policy": s.policy,
                "acked_ops": s.acked_ops,
                "acked_entries": s.acked_entries,
                "refused_ops": s.refused_ops,
                "indeterminate_ops": s.indeterminate_ops,
                "lost_entries": s.lost_entries,
                "conflicts": s.conflicts,
                "divergent": len(s.divergent),
                "corrupt": len(s.corrupt),
                "promotions": s.promotions,
                "possibly_lost": s.possibly_lost,
                "converged": s.converged is None,
                "violations": [str(v) for v in s.violations[:5]],
            }
            for s in result.spaces
        ],
    }
