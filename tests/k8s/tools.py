"""The real Kubernetes tools of tests/k8s, built from their published Go modules and cached.

tools/k8s/ is a small Go module that pins them (go.mod, go.sum): helm, etcd, kube-apiserver,
kube-controller-manager and kubectl. `build()` compiles each one once per pinned version into

    ${ENGRAM_K8S_TOOLS:-~/.cache/engram-replication/k8s-tools}/<kubernetes version>-<hash>/bin

outside the repository, so a fresh clone on the same machine (CI's) reuses them. The hash covers
everything that decides the binaries (go.mod, go.sum, the etcd main and the build recipe below),
so a pin change builds a new set beside the old one. Go's own module and build caches make a
rebuild after such a change incremental.

    python -m tests.k8s.tools build [NAME...]   # what `make k8s-tools` runs; prints progress
    python -m tests.k8s.tools bin-dir           # where the binaries are (or will be)

Every build runs under `nice -n 19` with GOMAXPROCS at most 2 (the machines are shared). A binary
that can't be built is reported with the compiler's error, saved beside the cache
(`failed/<name>.log`), and the others are built anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
MODULE: Final = ROOT / "tools" / "k8s"
DEFAULT_CACHE: Final = Path.home() / ".cache" / "engram-replication" / "k8s-tools"
HEARTBEAT: Final = 60.0  # seconds between "still building" lines


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    package: str  # Go package path, relative to tools/k8s/ when it starts with ./
    ldflags: tuple[str, ...] = ()
    required: bool = True  # the suite can't run without it


def _pins() -> dict[str, str]:
    """Module path -> version, from tools/k8s/go.mod's require lines."""
    text = (MODULE / "go.mod").read_text()
    return dict(re.findall(r"^(?:require)?\s*([\w.\-/]+)\s+(v[\w.\-+]+)(?:\s*//.*)?$", text, re.M))


def versions() -> dict[str, str]:
    pins = _pins()
    return {
        "kubernetes": pins["k8s.io/kubernetes"],
        "helm": pins["helm.sh/helm/v3"],
        "etcd": pins["go.etcd.io/etcd/server/v3"],
    }


def _kube_ldflags(kube: str) -> tuple[str, ...]:
    """What Kubernetes' own build (hack/lib/version.sh) stamps in: without it the binaries say
    v0.0.0-master, and helm refuses charts with a kubeVersion constraint against such a server."""
    major, minor = kube.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={kube}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(flags)


def _helm_ldflags(helm: str, kube: str) -> tuple[str, ...]:
    """helm's Makefile: its version, and the Kubernetes version `helm template` and `helm lint`
    assume without a cluster (from k8s.io/client-go's; the default would be 1.20)."""
    major, minor = kube.lstrip("v").split(".")[:2]
    flags = [f"-X helm.sh/helm/v3/internal/version.version={helm}"]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor={major}", f"-X {pkg}.k8sVersionMinor={minor}"]
    return tuple(flags)


def tools() -> list[Tool]:
    v = versions()
    kube = _kube_ldflags(v["kubernetes"])
    return [
        Tool("etcd", "./cmd/etcd"),
        Tool("helm", "helm.sh/helm/v3/cmd/helm", _helm_ldflags(v["helm"], v["kubernetes"])),
        Tool("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", kube),
        Tool("kubectl", "k8s.io/kubernetes/cmd/kubectl", kube),
        Tool(
            "kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            kube,
            required=False,
        ),
    ]


def recipe_hash() -> str:
    h = hashlib.sha256()
    for rel in ("go.mod", "go.sum", "cmd/etcd/main.go"):
        h.update(rel.encode() + b"\0" + (MODULE / rel).read_bytes() + b"\0")
    for t in tools():
        h.update(json.dumps([t.name, t.package, list(t.ldflags)]).encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    env = os.environ.get("ENGRAM_K8S_TOOLS")
    return Path(env).expanduser() if env else DEFAULT_CACHE


def tools_dir() -> Path:
    return cache_root() / f"{versions()['kubernetes']}-{recipe_hash()}"


def bin_dir() -> Path:
    return tools_dir() / "bin"


def find(name: str) -> Path | None:
    """The built binary `name`, or None when it hasn't been built (yet, or at all)."""
    path = bin_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing(names: Sequence[str] | None = None) -> list[str]:
    wanted = names or [t.name for t in tools() if t.required]
    return [n for n in wanted if find(n) is None]


def failure(name: str) -> str | None:
    """The saved error of a build of `name` that failed, if any."""
    path = tools_dir() / "failed" / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else None


def _say(msg: str) -> None:
    print(f"[k8s-tools] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache entry (make and a test run may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another build holds {path}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    try:
        procs = min(2, int(env.get("GOMAXPROCS", "2")))
    except ValueError:
        procs = 2
    env["GOMAXPROCS"] = str(max(1, procs))
    env["CGO_ENABLED"] = "0"  # static binaries, no C toolchain needed
    env["GOFLAGS"] = "-mod=readonly"  # exactly the committed go.mod and go.sum
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _build_one(tool: Tool, out: Path, logs: Path) -> tuple[bool, float]:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go is not installed: the k8s tier builds its tools with Go >= 1.26")
    tmp = out.with_name(f".{tool.name}.tmp")
    cmd = ["nice", "-n", "19", go, "build", "-trimpath"]
    cmd += ["-ldflags", " ".join(("-s", "-w", *tool.ldflags)), "-o", str(tmp), tool.package]
    log = logs / f"{tool.name}.log"
    start = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT):
            _say(f"  ... {tool.name}: {time.monotonic() - start:.0f} s so far")

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        with log.open("w") as fh:
            fh.write(f"$ (cd {MODULE} && {' '.join(cmd)})\n")
            fh.flush()
            proc = subprocess.run(
                cmd, cwd=MODULE, env=_go_env(), stdout=fh, stderr=subprocess.STDOUT, check=False
            )
    finally:
        done.set()
        beat.join()
    took = time.monotonic() - start
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return False, took
    tmp.replace(out)
    return True, took


def build(names: Sequence[str] | None = None) -> dict[str, str]:
    """Build the named tools (default: all) that aren't cached. Returns name -> outcome."""
    chosen = [t for t in tools() if not names or t.name in names]
    unknown = set(names or ()) - {t.name for t in chosen}
    if unknown:
        raise SystemExit(f"unknown tools: {sorted(unknown)}")
    base = tools_dir()
    bins, logs, failed = base / "bin", base / "logs", base / "failed"
    outcome: dict[str, str] = {}
    with _locked(base.with_name(base.name + ".lock")):
        for d in (bins, logs, failed):
            d.mkdir(parents=True, exist_ok=True)
        record_path = base / "builds.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record.setdefault("versions", versions())
        todo = [t for t in chosen if find(t.name) is None]
        if not todo:
            _say(f"all cached in {bins}")
        for i, tool in enumerate(todo, 1):
            _say(f"building {tool.name} ({i}/{len(todo)}) from {tool.package} ...")
            ok, took = _build_one(tool, bins / tool.name, logs)
            if ok:
                (failed / f"{tool.name}.log").unlink(missing_ok=True)
                _say(f"  {tool.name}: built in {took:.0f} s")
                outcome[tool.name] = f"built in {took:.0f} s"
                record.setdefault("seconds", {})[tool.name] = round(took)
            else:
                text = (logs / f"{tool.name}.log").read_text(errors="replace")
                (failed / f"{tool.name}.log").write_text(text)
                _say(f"  {tool.name}: FAILED after {took:.0f} s; the error:")
                for line in text.splitlines()[-30:]:
                    _say(f"    {line}")
                outcome[tool.name] = "failed"
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        for tool in chosen:
            outcome.setdefault(tool.name, "cached")
    return outcome


def main(argv: Sequence[str]) -> int:
    cmd, *rest = list(argv) or ["build"]
    if cmd == "bin-dir":
        print(bin_dir())
        return 0
    if cmd != "build":
        print(__doc__, file=sys.stderr)
        return 2
    v = versions()
    _say(
        f"kubernetes {v['kubernetes']}, helm {v['helm']}, etcd {v['etcd']} -> {bin_dir()} "
        f"(nice -n 19, GOMAXPROCS {_go_env()['GOMAXPROCS']})"
    )
    start = time.monotonic()
    outcome = build(rest or None)
    _say(
        f"done in {time.monotonic() - start:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in outcome.items())
    )
    required = {t.name for t in tools() if t.required}
    bad = [n for n, o in outcome.items() if o == "failed" and n in required]
    print(bin_dir())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
