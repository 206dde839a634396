"""The reference docs stay honest: whatever the code defines, docs/ describes, and no more.

Each test reads the code's own registry of things (metric families, settings, routes, error codes,
subcommands, the WAL header struct) and checks the matching doc page names every one of them, in
the table row where it belongs, so a new metric, setting or route can't ship undocumented and a
removed one can't linger in the docs.
"""

from __future__ import annotations

import argparse
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from engram_contract.formats.entry import HEADER
from engram_operator.cli import _parser
from engram_operator.kube.metrics import OperatorMetrics
from engram_sidecar import api
from engram_sidecar.config import SidecarConfig, load_config, setting_names
from engram_sidecar.kube.agent import KubeMetrics
from engram_sidecar.metrics import Metrics
from engram_sidecar.node import Node

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


def _rows(text: str, first_cell: str) -> list[str]:
    """Table rows whose first cell is exactly `first_cell`."""
    return [
        line
        for line in text.splitlines()
        if line.startswith("|") and line.split("|")[1].strip() == first_cell
    ]


def _one_row(text: str, first_cell: str, doc: str) -> list[str]:
    rows = _rows(text, first_cell)
    assert len(rows) == 1, f"{doc}: expected one table row for {first_cell}, found {len(rows)}"
    return [cell.strip() for cell in rows[0].split("|")[1:-1]]


# ---- metrics ----------------------------------------------------------------------------------


def _metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name -> (type, label names) for every metric Metrics registers."""
    m = Metrics(CollectorRegistry())
    kube = KubeMetrics(m.registry)  # what the Kubernetes tasks add (engram_sidecar.kube)
    op = OperatorMetrics()  # the operator's own registry (engram_operator.kube.metrics)
    wrappers = [*vars(m).values(), *vars(kube).values(), *vars(op).values()]
    labels = {w._name: tuple(w._labelnames) for w in wrappers if isinstance(w, MetricWrapperBase)}
    out = {}
    for family in [*m.registry.collect(), *op.registry.collect()]:
        exposed = family.name + "_total" if family.type == "counter" else family.name
        out[exposed] = (family.type, labels[family.name])
    return out


def test_docs_metrics_every_metric_has_a_row_with_its_type_and_labels() -> None:
    text = _doc("metrics.md")
    found = _metrics()
    assert len(found) >= 20  # the registry walk saw the real set, not an empty one
    for name, (mtype, labels) in found.items():
        cells = _one_row(text, f"`{name}`", "metrics.md")
        assert cells[1] == mtype, f"metrics.md: {name} is a {mtype}, documented as {cells[1]}"
        for label in labels:
            assert f"`{label}`" in cells[2], f"metrics.md: {name} row misses label {label}"
        if not labels:
            assert "none" in cells[2], f"metrics.md: {name} has no labels; say so"


def test_docs_metrics_documents_no_metric_that_does_not_exist() -> None:
    documented = set(re.findall(r"^\| `(engram_replication_\w+)` \|", _doc("metrics.md"), re.M))
    assert documented, "metrics.md has no metric table rows"
    assert documented <= set(_metrics()), documented - set(_metrics())


def test_docs_metrics_names_use_the_exposition_suffixes() -> None:
    text = _doc("metrics.md")
    for name, (mtype, _) in _metrics().items():
        if mtype == "counter":
            bare = name.removesuffix("_total")
            assert not _rows(text, f"`{bare}`"), f"metrics.md: write {name}, not {bare}"


# ---- configuration ----------------------------------------------------------------------------


def _default_cell_matches(default: Any, cell: str) -> bool:
    if default in ("", None):
        return cell.startswith(("*(none", "*(unset", '`""`'))
    m = re.match(r"`([^`]*)`", cell)
    if m is None:
        return False
    shown = m.group(1)
    if isinstance(default, tuple):
        return [float(x) for x in shown.split(",")] == [float(x) for x in default]
    if isinstance(default, bool | str | Path):
        return shown == str(default)
    return float(shown) == float(default)


@pytest.mark.parametrize("name", setting_names())
def test_docs_configuration_row_names_key_env_flag_and_default(name: str) -> None:
    cells = _one_row(_doc("configuration.md"), f"`{name}`", "configuration.md")
    assert cells[1] == f"`ENGRAM_{name.upper()}`"
    assert cells[2] == f"`--{name.replace('_', '-')}`"
    default = SidecarConfig.__dataclass_fields__[name].default
    assert _default_cell_matches(default, cells[3]), (
        f"configuration.md: default of {name} is {default!r}, documented as {cells[3]}"
    )


def test_docs_configuration_documents_no_setting_that_does_not_exist() -> None:
    text = _doc("configuration.md")
    documented = set(re.findall(r"^\| `([a-z_]+)` \| `ENGRAM_", text, re.M))
    assert documented == set(setting_names()), documented ^ set(setting_names())


def test_docs_configuration_example_yaml_loads(tmp_path: Path) -> None:
    text = _doc("configuration.md")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks, "configuration.md has no YAML example"
    path = tmp_path / "sidecar.yaml"
    path.write_text(blocks[0])
    cfg = load_config(config_file=path, env={})
    assert cfg.node


# ---- HTTP API ---------------------------------------------------------------------------------


async def test_docs_api_documents_every_route(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    cfg = load_config(
        flags={"node": "n0", "data_dir": str(tmp_path / "data"), "secret_file": str(secret)},
        env={},
    )
    node = Node(cfg)
    try:
        app = api.make_app(node)
        routes = {
            (r.method, r.resource.canonical)
            for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None
        }
    finally:
        node.store.close()
    assert len(routes) >= 10
    text = _doc("api.md")
    for method, path in sorted(routes):
        assert f"{method} {path}" in text, f"api.md doesn't document {method} {path}"
        assert re.search(rf"^## .*{re.escape(f'{method} {path}')}", text, re.M), (
            f"api.md has no section for {method} {path}"
        )


def test_docs_api_documents_every_error_code() -> None:
    source = Path(api.__file__).read_text()
    codes = set(re.findall(r'_error\(\s*(\d{3}),\s*"(\w+)"', source))
    assert len(codes) >= 8
    text = _doc("api.md")
    for status, code in sorted(codes):
        assert re.search(rf"^\| {status} \| `{code}` \|", text, re.M), (
            f"api.md: no row for {status} {code} in the error table"
        )


# ---- command line -----------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                yield path
                yield from _commands(sub, path + " ")


def test_docs_every_subcommand_is_documented() -> None:
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))])
    commands = [*_commands(_parser()), "wal dump", "wal verify"]  # wal has its own parser
    assert {"sidecar", "wal", "bench"} <= set(commands)
    for cmd in commands:
        assert f"engram-replication {cmd}" in text or f"`{cmd}`" in text, (
            f"no doc or README mentions the `{cmd}` command"
        )


# ---- WAL format -------------------------------------------------------------------------------


def _struct_fields(s: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each field of a little-endian struct, from its format string."""
    out, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", s.format.lstrip("<")):
        size = struct.calcsize("<" + (count or "") + code)
        out.append((offset, size))
        offset += size
    return out


def test_docs_wal_format_header_table_matches_the_struct() -> None:
    text = _doc("wal-format.md")
    section = text.split("## The entry", 1)[1].split("\n## ", 1)[0]
    table = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(r"^\| (\d+) \| (\d+) \|", section, re.M)
    ]
    assert table == _struct_fields(HEADER)
    assert f'`"{HEADER.format}"`' in section
    assert sum(size for _, size in table) == HEADER.size == 64
