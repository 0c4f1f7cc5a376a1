"""The package's import graph: no cycles, and the layers in order.

Read from the source (every ``import`` and ``from ... import``, inside functions too), so a
lazy import cannot hide a cycle. The package's own ``__init__`` re-exports the public API and is
left out: every module may be imported through it.
"""

from __future__ import annotations

import ast
import pathlib

import odecore

ROOT = pathlib.Path(odecore.__file__).parent


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("odecore", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                # The most specific module a name refers to.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "odecore"):
                    graph[name].add(target)
    return graph


def _cycles(graph):
    found, done, path = [], set(), []

    def visit(node):
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def test_the_walk_sees_imports():
    graph = _graph()
    assert "odecore.ode.loop" in graph["odecore.ode.api"]
    assert "odecore.backend.protocol" in graph["odecore.backend.differentiate"]


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_loop_knows_nothing_of_gradients_or_fixed_points():
    """problem -> loop -> tape; the gradient modes build on them and the API on top."""
    graph = _graph()
    lower = [
        m for m in graph if m.startswith(("odecore.ode.", "odecore.control", "odecore.backend"))
    ]
    for module in lower:
        if module == "odecore.ode.api":
            continue
        above = {m for m in graph[module] if m.startswith(("odecore.adjoint", "odecore.deq"))}
        above |= {m for m in graph[module] if m == "odecore.ode.api"}
        assert not above, f"{module} imports {sorted(above)}"


def test_control_rules_depend_on_nothing_but_their_primitives():
    assert _graph()["odecore.control.rules"] == {"odecore.control.primitives"}
