"""The architecture's rules, checked on the source: no import cycles in the engine or the bridge
(imports inside functions count), the engine never imports Slicer, Qt or VTK, no engine function over
100 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "SAMIRRegistration"
PACKAGES = ("samir", "SAMIRRegistrationLib")
MAX_FUNCTION_LINES = 100


def modules(package: str):
    return {f"{package}.{path.stem}": path for path in sorted((ROOT / package).glob("*.py")) if path.stem != "__init__"}


def imported_modules(name: str, path: Path, known: set) -> set:
    """The package modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in known and candidate != name}
    return found


def import_graph():
    known = {}
    for package in PACKAGES:
        known.update(modules(package))
    return {name: imported_modules(name, path, set(known)) for name, path in known.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_the_engine_or_the_bridge_counting_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 30 and graph["samir.cli"]  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_engine_imports_no_slicer_qt_or_vtk():
    for name, path in modules("samir").items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for imported in names:
                assert imported.split(".")[0] not in ("slicer", "qt", "ctk", "vtk", "SAMIRRegistrationLib"), name


@pytest.mark.parametrize("package", ["samir"])
def test_no_engine_function_is_longer_than_100_lines(package):
    long = []
    for name, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []
