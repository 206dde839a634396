"""The repository's layout rules: no shadowed stdlib `operator`, and the layering between packages.

Imports are found by walking each module's AST, so lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
import operator
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "engram_contract": ROOT / "contract" / "engram_contract",
    "engram_operator": ROOT / "operator" / "engram_operator",
    "engram_sidecar": ROOT / "sidecar" / "engram_sidecar",
    "engram_bench": ROOT / "bench" / "engram_bench",
}
FORMATS = PACKAGES["engram_contract"] / "formats"
# Sans-IO modules: bytes in, values out.
SANS_IO = ("entry.py", "frame.py", "batch.py", "messages.py", "handshake.py", "engram_wal.py")


def _modules(pkg: Path) -> list[Path]:
    return sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every absolute module a file imports, as dotted names (`from a import b` gives a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_layout_import_operator_is_the_stdlib() -> None:
    here = Path(operator.__file__).resolve()
    assert here.is_relative_to(Path(sys.base_prefix).resolve())
    assert not here.is_relative_to(ROOT)
    assert operator.add(2, 3) == 5


def test_layout_import_operator_is_the_stdlib_with_the_repo_on_the_path() -> None:
    # A fresh interpreter started in the repository, with every source folder on its path.
    paths = [str(ROOT), *(str(p.parent) for p in PACKAGES.values())]
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; import operator, engram_operator; "
        "print(operator.__file__); print(operator.add(2, 3))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    file, total = res.stdout.split()
    assert Path(file).resolve().is_relative_to(Path(sys.base_prefix).resolve())
    assert total == "5"


@pytest.mark.parametrize("folder", ["contract", "operator", "sidecar"])
def test_layout_source_folders_are_not_packages(folder: str) -> None:
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists()


def test_layout_packages_exist() -> None:
    for pkg in PACKAGES.values():
        assert (pkg / "__init__.py").exists(), pkg


def _foreign(pkg: str, path: Path, forbidden: set[str]) -> list[str]:
    return sorted(m for m in _imports(path) if m.split(".")[0] in forbidden)


# Who may import whom (issue 12): operator -> contract <- sidecar; the bench may use anything;
# nothing of the product uses the bench. The same rules as pyproject's import-linter contracts,
# checked here too so that `pytest` alone catches a breach.
FORBIDDEN = {
    "engram_contract": {"engram_operator", "engram_sidecar", "engram_bench"},
    "engram_operator": {"engram_sidecar", "engram_bench"},
    "engram_sidecar": {"engram_operator", "engram_bench"},
}


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_layout_import_graph(pkg: str) -> None:
    bad = {_rel(p): _foreign(pkg, p, FORBIDDEN[pkg]) for p in _modules(PACKAGES[pkg])}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.parametrize("name", SANS_IO)
def test_layout_formats_do_no_io(name: str) -> None:
    path = FORMATS / name
    assert path.exists(), path
    io = sorted(m for m in _imports(path) if m.split(".")[0] in {"asyncio", "socket", "aiohttp"})
    assert io == []


def test_layout_import_scanner_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "from engram_contract.ids import SpaceId\n"
        "def f():\n"
        "    from engram_sidecar import wal\n"
        "    import engram_sidecar.errors\n"
        "    import asyncio\n"
    )
    assert {"engram_sidecar.wal", "asyncio", "engram_sidecar.errors"} <= _imports(f)
    assert _foreign("engram_operator", f, FORBIDDEN["engram_operator"]) == [
        "engram_sidecar",
        "engram_sidecar.errors",
        "engram_sidecar.wal",
    ]


def test_layout_import_linter_contracts_hold() -> None:
    """import-linter (pyproject [tool.importlinter]): the same rules plus no module cycles."""
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    res = subprocess.run(
        [str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
