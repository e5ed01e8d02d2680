"""The shape of the package (docs/ARCHITECTURE.md): packages by concern, no
import cycles, short functions, and a CLI whose every verb answers --help."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raypath"
MAX_FUNCTION_LINES = 80
MAX_FLAT_MODULES = 8


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """raypath modules ``name`` imports anywhere in the file (lazy imports count)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in mods else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in mods and m != name}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of the import graph with > 1 module."""
    mods = _modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def long_functions() -> list[tuple[int, str]]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((n, f"{name}.{node.name}"))
    return sorted(out, reverse=True)


def test_no_import_cycles():
    assert import_cycles() == []


def test_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # the checker itself has teeth: two modules importing each other form a cycle
    pkg = tmp_path / "raypath"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from raypath.a.y import f\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from raypath.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    assert import_cycles() == [["raypath.a.x", "raypath.a.y"]]


def test_no_function_longer_than_80_lines():
    assert long_functions() == []


def test_at_most_8_flat_modules():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, flat


def test_homes_of_every_concern_exist():
    for pkg in ("io", "wsi", "synth", "fm", "train", "embed", "adapt", "patch", "mil", "predict",
                "robustness", "sweep", "report", "evaluation"):
        assert (PKG / pkg / "__init__.py").exists(), pkg


def _verbs() -> list[str]:
    from raypath.cli import VERBS

    return list(VERBS)


@pytest.mark.parametrize("verb", _verbs())
def test_every_verb_answers_help(verb, capsys):
    from raypath.cli import build_parser

    parser = build_parser([verb, "--help"])
    with pytest.raises(SystemExit) as e:
        parser.parse_args([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: raypath") and verb in out
