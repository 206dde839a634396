"""The `engram-replication` console script: one entry point, a subcommand per job.

This is the one module allowed to reach past the sidecar's `contract`: it dispatches to the
sidecar's own commands (`sidecar`, `wal`) by importing them lazily, so the operator's modules
themselves stay independent of the data plane.
"""

from __future__ import annotations

import argparse
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

    sc = sub.add_parser("sidecar", help="run one node's data-plane sidecar")
    from engram_sidecar.main import add_arguments

    add_arguments(sc)

    wal = sub.add_parser("wal", help="inspect WAL files on disk")
    wsub = wal.add_subparsers(dest="wal_command", required=True, metavar="WAL_COMMAND")
    d = wsub.add_parser("dump", help="print one line per entry (like pg_waldump)")
    d.add_argument("--data-dir", type=Path, required=True)
    d.add_argument("--space", required=True)
    d.add_argument("--from", dest="from_sequence", type=int, default=1, metavar="SEQ")
    v = wsub.add_parser("verify", help="check every CRC and sequence; non-zero exit on corruption")
    v.add_argument("--data-dir", type=Path, required=True)
    v.add_argument("--space", default=None)

    b = sub.add_parser("bench", help="run the benchmarks and regenerate docs/benchmarks.md")
    b.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    b.add_argument("--only", action="append", default=None, help="scenario key (repeatable)")
    b.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))
    b.add_argument("--json", type=Path, default=Path("bench/results/latest.json"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "wal":
        from engram_sidecar import tools

        if args.wal_command == "dump":
            return tools.wal_dump(args.data_dir, args.space, args.from_sequence)
        return tools.wal_verify(args.data_dir, args.space)
    if args.command == "sidecar":
        from engram_sidecar.main import main as sidecar_main

        return sidecar_main(args)
    if args.command == "bench":
        from engram_bench import harness

        return harness.main(quick=args.quick, only=args.only, docs=args.docs, json_path=args.json)
    if args.command == "operator":
        from engram_operator import kube_handlers

        return kube_handlers.main(
            kube_handlers.OperatorOptions(
                namespace=args.namespace,
                token_file=args.token_file,
                node_selector=args.node_selector,
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

        from engram_operator import localcli

        if args.nodes < 1 or args.spaces < 1:
            print("error: --nodes and --spaces must be at least 1", file=sys.stderr)
            return 2
        opts = localcli.UpOptions(
            nodes=args.nodes,
            spaces=args.spaces,
            data_dir=args.data_dir,
            http_port_base=args.http_port_base,
            replication_port_base=args.replication_port_base,
            ack_policy=args.ack_policy,
            demo=args.demo,
            duration=args.duration,
        )
        return asyncio.run(localcli.run_up(opts))
    if args.command == "status":
        from engram_operator import localcli

        return localcli.status(args.data_dir, as_json=args.json, watch=args.watch)
    if args.command == "switchover":
        from engram_operator import localcli

        return localcli.switchover(args.data_dir, args.space, args.to, args.timeout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
