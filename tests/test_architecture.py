"""The layering the folders promise, checked on the source: no import cycles (function-level
imports included), and nothing outside `qbench/models/` reaching into a model's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import qbench

PACKAGE = Path(qbench.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, str]]:
    """`(module, name)` for every import anywhere in `tree` (inside functions too) of a qbench
    module; `name` is the imported attribute, or "" for `import x.y`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "qbench"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qbench":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "") if sub in modules else (node.module, alias.name))
    return found


def test_no_import_cycles_among_qbench_modules():
    trees = _modules()
    names = set(trees)
    graph = {m: sorted({target for target, _ in _imports(tree, names) if target in names and target != m})
             for m, tree in trees.items()}
    # depth-first search for a back edge; report the cycle it closes
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_function_level_imports():
    tree = ast.parse("def f():\n    from qbench.run import RunSpec\n")
    assert ("qbench.run", "RunSpec") in _imports(tree, set())


def test_nothing_outside_models_imports_a_models_internals():
    """Constants (UPPER_CASE) and private names of `qbench.models.*` stay inside the package:
    the rest of the harness talks to a model through the `SpeechModel` protocol."""
    trees = _modules()
    offenders = []
    for m, tree in trees.items():
        if m.startswith("qbench.models"):
            continue
        for target, name in _imports(tree, set(trees)):
            if target.startswith("qbench.models.") and name and (name.startswith("_") or name.isupper()):
                offenders.append(f"{m} imports {target}.{name}")
    assert not offenders, "; ".join(offenders)
