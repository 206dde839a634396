"""The `engram-replication` console script: one entry point, a subcommand per job.

The data plane's commands (`sidecar`, `wal`) and the benchmark (`bench`) run as their own
programs (`python -m engram_sidecar`, `python -m engram_sidecar.walcli`, `python -m
engram_bench`), exec'd in place of this process: the operator imports neither the data plane
nor the benchmark (import-linter contracts in pyproject.toml), and the runtime image can leave
the benchmark out.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="engram-replication",
        description="Replication and failover for Engram memory spaces.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a local memory-space cluster (no Kubernetes needed)")
    up.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    up.add_argument("--spaces", type=int, default=4, help="memory spaces (default 4)")
    up.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data/local"),
        help="WALs, logs and cluster.json (default data/local)",
    )
    up.add_argument("--http-port-base", type=int, default=18100, help="node i's HTTP port is P+i")
    up.add_argument(
        "--replication-port-base", type=int, default=18200, help="node i's replication port is Q+i"
    )
    up.add_argument("--ack-policy", choices=("async", "one", "quorum"), default="async")
    up.add_argument(
        "--demo",
        action="store_true",
        help="write a workload, kill a primary, show the failover, then stop",
    )
    up.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )

    st = sub.add_parser("status", help="show every space of the local cluster")
    st.add_argument("--data-dir", type=Path, default=Path("data/local"))
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="refresh every second")

    sw = sub.add_parser("switchover", help="hand a space to another node with zero loss")
    sw.add_argument("--data-dir", type=Path, default=Path("data/local"))
    sw.add_argument("--space", required=True)
    sw.add_argument("--to", required=True, metavar="NODE")
    sw.add_argument("--timeout", type=float, default=30.0)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    op.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the MemorySpaces, node Leases and peering (env POD_NAMESPACE)",
    )
    op.add_argument(
        "--node-selector",
        default="",
        metavar="K=V,...",
        help="only node Leases with these labels (besides engram.io/node-lease=true)",
    )
    op.add_argument(
        "--release",
        default="",
        metavar="NAME",
        help="reconcile only the MemorySpaces labelled engram.io/release=NAME, on nodes whose"
        " Lease carries that label or none (default: every space and node of the namespace)",
    )
    op.add_argument(
        "--no-claim-unlabelled",
        dest="claim_unlabelled",
        action="store_false",
        help="with --release: leave spaces without the engram.io/release label alone"
        " (default: label them with NAME and reconcile them)",
    )
    op.add_argument(
        "--token-file",
        type=Path,
        required=True,
        help="bearer token of the sidecars' admin API (their admin token or shared secret)",
    )
    op.add_argument(
        "--peering", metavar="NAME", help="KopfPeering object for HA (one replica acts)"
    )
    op.add_argument("--standalone", action="store_true", help="no peering: the only replica")
    op.add_argument(
        "--dev", action="store_true", help="peering priority 666: pause in-cluster operators"
    )
    op.add_argument("--priority", type=int, default=None, help="peering priority (see docs)")
    op.add_argument(
        "--peering-lifetime",
        type=int,
        default=10,
        metavar="SECONDS",
        help="a silent peer counts as gone after this long (default 10)",
    )
    op.add_argument("--metrics-port", type=int, default=0, help="serve /metrics (0 = off)")
    op.add_argument("--metrics-host", default="0.0.0.0")
    op.add_argument("--kubeconfig", type=Path, default=None, help="default: in-cluster config")
    op.add_argument("--api-url", default=None, help="API server URL without auth (tests, proxy)")
    op.add_argument("--log-level", default="INFO")

    for name, text in _PASS_THROUGH_HELP.items():
        pt = sub.add_parser(name, help=text, add_help=False)
        pt.add_argument("args", nargs=argparse.REMAINDER)
    return p


_PASS_THROUGH_HELP = {
    "sidecar": "run one node's data-plane sidecar (`sidecar --help` for its settings)",
    "wal": "inspect WAL files on disk: `wal dump`, `wal verify` (`wal --help`)",
    "bench": "run the benchmarks and regenerate docs/benchmarks.md (`bench --help`)",
}
PROGRAMS = {
    "sidecar": "engram_sidecar",
    "wal": "engram_sidecar.walcli",
    "bench": "engram_bench",
}


def _exec(command: str, rest: Sequence[str]) -> int:
    """Run `command`'s own program in place of this process (same pid, signals, exit code)."""
    module = PROGRAMS[command]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        print(
            f"error: `{command}` needs the {module} package, which this installation leaves"
            " out (the runtime image has no benchmark: run it from a source checkout,"
            " `make bench`)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *rest])
    return 0  # not reached: execv replaces the process


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PROGRAMS:
        # Handed over whole, before argparse: it would read the program's own options (e.g.
        # `bench --quick`, `sidecar --node n0`) as this parser's and refuse them.
        return _exec(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    if args.command in PROGRAMS:
        return _exec(args.command, args.args)
    if args.command == "operator":
        from engram_operator.kube import handlers as kube_handlers

        return kube_handlers.main(
            kube_handlers.OperatorOptions(
                namespace=args.namespace,
                token_file=args.token_file,
                node_selector=args.node_selector,
                release=args.release,
                claim_unlabelled=args.claim_unlabelled,
                peering=args.peering,
                standalone=args.standalone,
                dev=args.dev,
                priority=args.priority,
                peering_lifetime=args.peering_lifetime,
                metrics_host=args.metrics_host,
                metrics_port=args.metrics_port,
                kubeconfig=args.kubeconfig,
                api_url=args.api_url,
                log_level=args.log_level,
            )
        )
    if args.command == "up":
        import asyncio

        from engram_operator.local import commands as local_commands

        if args.nodes < 1 or args.spaces < 1:
            print("error: --nodes and --spaces must be at least 1", file=sys.stderr)
            return 2
        opts = local_commands.UpOptions(
            nodes=args.nodes,
            spaces=args.spaces,
            data_dir=args.data_dir,
            http_port_base=args.http_port_base,
            replication_port_base=args.replication_port_base,
            ack_policy=args.ack_policy,
            demo=args.demo,
            duration=args.duration,
        )
        return asyncio.run(local_commands.run_up(opts))
    if args.command == "status":
        from engram_operator.local import commands as local_commands

        return local_commands.status(args.data_dir, as_json=args.json, watch=args.watch)
    if args.command == "switchover":
        from engram_operator.local import commands as local_commands

        return local_commands.switchover(args.data_dir, args.space, args.to, args.timeout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
