"""The layer order of the package, written down once (here; docs/ARCHITECTURE.md shows the same
table, and a test keeps the two equal): a module may import (at the top or inside a function)
only modules of its own room or of a lower layer, and no import cycle exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loopgolf"

# Lowest first. A room is a top-level module or package of loopgolf; rooms on one layer do not
# import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "util", "checks", "device"),
    ("model", "lossmodel"),
    ("data",),
    ("export", "evaluate"),
    ("ttt",),
    ("config",),
    ("train",),
    ("rundir",),
    ("sources", "codebytes"),
    ("budget", "run"),
    ("convert", "serve", "lab", "submit"),
    ("bench",),
    ("commands",),
    ("cli",),
    ("__main__",),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> set[str]:
    """Every loopgolf module ``path`` imports, at the top or inside a function."""
    found = set()
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "loopgolf"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] == "loopgolf":
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _graph()}
    placed = {r for layer in LAYERS for r in layer}
    assert rooms <= placed, f"rooms without a layer: {sorted(rooms - placed)}; add them to LAYERS (and docs/ARCHITECTURE.md)"


def test_no_module_imports_a_higher_layer_or_a_sibling_room():
    rank = {room: i for i, layer in enumerate(LAYERS) for room in layer}
    bad = []
    for module, imported in _graph().items():
        here = _room(module)
        for target in imported:
            there = _room(target)
            if there != here and rank[there] >= rank[here]:
                bad.append(f"{module} imports {target} ({there} is on layer {rank[there]}, {here} on {rank[here]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {m: {t for t in ts if t != m} for m, ts in _graph().items()}
    # Importing loopgolf.a.b also runs loopgolf.a: a package's __init__ edges are real, but a
    # submodule importing its own package's (docstring-only) __init__ is not a cycle worth naming.
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t in graph and t != m.rsplit(".", 1)[0]:
                if state.get(t) == 1:
                    cycles.append(" -> ".join(stack[stack.index(t) :] + [t]) if t in stack else f"{m} -> {t}")
                elif t not in state:
                    visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_architecture_page_shows_the_same_layers():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert table, "docs/ARCHITECTURE.md has no <!-- layers --> table"
    rows = [line for line in table.group(1).strip().splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    documented = [tuple(re.findall(r"`([\w.]+)`", row.split("|")[2])) for row in rows[1:]]  # skip the header row
    assert tuple(documented) == LAYERS


def test_only_the_run_directory_module_names_its_files():
    """summary.json, log.jsonl and artifact.lgz are named by loopgolf.rundir only (config.json is
    also a Hugging Face file name; checkpoint.pt belongs to the checkpoint container)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
        for name in ("summary.json", "log.jsonl", "artifact.lgz"):
            if any(s == name or s.endswith("/" + name) for s in strings):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders
