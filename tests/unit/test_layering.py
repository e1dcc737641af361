"""The library's import boundaries (issue 14): it never imports the apps, and only fedmeta/flower/ imports Flower."""

from __future__ import annotations

import ast
from pathlib import Path

FEDMETA = Path(__file__).resolve().parents[2] / "fedmeta"
#: The Flower apps ``flwr run`` loads: the library must not depend on them.
APPS = {"client", "server"}
#: Flower and the simulation engine it brings: only fedmeta/flower/ may import them.
FLOWER = {"flwr", "ray"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in ``path`` (module level or inside functions), with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


SOURCES = sorted(FEDMETA.rglob("*.py"))


def test_the_walk_sees_the_library() -> None:
    names = {p.relative_to(FEDMETA).as_posix() for p in SOURCES}
    assert {"flower/records.py", "flower/transport.py", "cli/main.py", "federation/loop.py"} <= names
    assert any(name == "flwr.app" for _, name in _imports(FEDMETA / "flower" / "records.py"))


def _violations(roots: set[str], *, allowed: str | None = None) -> list[str]:
    out = []
    for path in SOURCES:
        rel = path.relative_to(FEDMETA)
        if allowed is not None and rel.parts[0] == allowed:
            continue
        out += [f"fedmeta/{rel.as_posix()}:{line}: {name}"
                for line, name in _imports(path) if name.split(".")[0] in roots]
    return out


def test_no_library_module_imports_the_apps() -> None:
    assert _violations(APPS) == []


def test_only_fedmeta_flower_imports_flower() -> None:
    assert _violations(FLOWER, allowed="flower") == []


def test_the_check_catches_an_app_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from server.app import app\n    import flwr.app\n", encoding="utf-8")
    assert _imports(bad) == [(2, "server.app"), (3, "flwr.app")]
