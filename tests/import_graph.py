"""The project's import graph, read from the source with `ast` (late imports inside functions included)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "yolo_compress"


def module_file(name: str) -> Path | None:
    """The file of dotted module `name` inside this project, or None (a third-party module, or a name in a module)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Project modules `path` imports: `from a.b import c` counts as a.b.c when c is a module, else as a.b."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if module_file(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                if module_file(".".join(parts[:i])):
                    found.add(".".join(parts[:i]))
    found.discard(module_name(path))
    return found


def package_graph() -> dict[str, set[str]]:
    """Every module of the package -> the project modules it imports."""
    return {module_name(p): imports_of(p) for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def closure(path: Path, skip: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Project modules `path` needs, directly or through other project modules; `skip`ped ones are not followed."""
    graph = package_graph()
    todo, seen = list(imports_of(path)), set()
    while todo:
        name = todo.pop()
        if name not in seen and not skip(name):
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen
