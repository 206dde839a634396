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
SIDECAR = ROOT / "sidecar" / "engram_sidecar"
OPERATOR = ROOT / "operator" / "engram_operator"

# The console dispatcher reaches into the sidecar's commands on purpose (documented in cli.py).
OPERATOR_EXCEPTIONS = {"cli.py"}
# Sans-IO modules: bytes in, values out.
SANS_IO = ("wire.py", "auth.py")


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
    paths = [str(ROOT), str(ROOT / "operator"), str(ROOT / "sidecar"), str(ROOT / "bench")]
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


@pytest.mark.parametrize("folder", ["operator", "sidecar"])
def test_layout_source_folders_are_not_packages(folder: str) -> None:
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists()


def test_layout_packages_exist() -> None:
    assert (SIDECAR / "__init__.py").exists()
    assert (OPERATOR / "__init__.py").exists()


def test_layout_sidecar_never_imports_the_operator() -> None:
    bad = {
        _rel(p): sorted(m for m in _imports(p) if m.split(".")[0] == "engram_operator")
        for p in _modules(SIDECAR)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def _sidecar_imports_beyond_contract(path: Path) -> list[str]:
    """The imports of engram_sidecar in `path` that name anything but engram_sidecar.contract."""
    tree = ast.parse(path.read_text(), filename=str(path))
    wrong: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wrong += [
                a.name
                for a in node.names
                if a.name.split(".")[0] == "engram_sidecar"
                and not a.name.startswith("engram_sidecar.contract")
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "engram_sidecar":
                wrong += [f"engram_sidecar.{a.name}" for a in node.names if a.name != "contract"]
            elif node.module.split(".")[0] == "engram_sidecar" and not node.module.startswith(
                "engram_sidecar.contract"
            ):
                wrong.append(node.module)
    return sorted(wrong)


def test_layout_operator_imports_only_the_sidecar_contract() -> None:
    bad = {
        _rel(p): _sidecar_imports_beyond_contract(p)
        for p in _modules(OPERATOR)
        if not (p.name in OPERATOR_EXCEPTIONS and p.parent == OPERATOR)
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_layout_cli_is_the_documented_exception() -> None:
    doc = ast.get_docstring(ast.parse((OPERATOR / "cli.py").read_text()))
    assert doc is not None
    assert "contract" in doc


@pytest.mark.parametrize("name", SANS_IO)
def test_layout_sans_io_modules_do_no_io(name: str) -> None:
    path = SIDECAR / name
    if not path.exists():
        pytest.skip(f"{name} does not exist yet")
    io = sorted(m for m in _imports(path) if m.split(".")[0] in {"asyncio", "socket"})
    assert io == []


def test_layout_import_scanner_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "from engram_sidecar.contract import SpaceId\n"
        "from engram_sidecar import contract\n"
        "def f():\n"
        "    from engram_sidecar import wal\n"
        "    import engram_sidecar.errors\n"
        "    import asyncio\n"
    )
    assert {"engram_sidecar.wal", "asyncio"} <= _imports(f)
    assert _sidecar_imports_beyond_contract(f) == ["engram_sidecar.errors", "engram_sidecar.wal"]
