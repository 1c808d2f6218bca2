"""The tree shows the DAG: phases import only from the floors below them, never in a cycle, in modules of a readable
size; the experiment tools import the core and the core never imports them."""

from __future__ import annotations

import ast

from tests.import_graph import PACKAGE, ROOT, package_graph

# Floor of each top-level module or subpackage: a module may import its own floor and the floors below.
FLOORS = [
    {"errors"},
    {"typed_params", "config", "files", "devices"},
    {"data"},
    {"splitfree", "models"},
    {"measure"},
    {"train"},
    {"prune"},
    {"ship"},
    {"preflight"},
    {"tracking"},
    {"review"},
    {"experiments"},
]
LONG_OK = {f"{PACKAGE}.data.synthetic"}  # the generator: one long list of drawing rules
MAX_LINES = 400


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    if not part:  # the package entry: offline settings, imports nothing of ours
        return -1
    return next(i for i, group in enumerate(FLOORS) if part in group)


def test_every_module_has_a_floor() -> None:
    lost = [m for m in package_graph() if m != PACKAGE and not any(m.split(".")[1] in g for g in FLOORS)]
    assert not lost, f"modules outside FLOORS: {lost}"


def test_no_import_goes_up_a_floor() -> None:
    up = [f"{m} -> {d}" for m, deps in package_graph().items() for d in deps if floor(d) > floor(m)]
    assert not up, "imports from a higher floor:\n" + "\n".join(sorted(up))


def test_the_import_graph_has_no_cycle() -> None:
    graph = package_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_module_is_over_400_lines() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / PACKAGE).rglob("*.py")}
    long = {f: n for f, n in sizes.items() if n > MAX_LINES and f.removesuffix(".py").replace("/", ".") not in LONG_OK}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_subpackage_entries_hold_only_a_docstring() -> None:
    # tests/test_code_deps.py leaves them out of dvc.yaml's deps, which is right only while they hold no code
    for init in (ROOT / PACKAGE).glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init} holds code"
