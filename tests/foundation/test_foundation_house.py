"""The package's import graph, read with ast (imports inside functions included): no cycle, no
module taking another's private names, and the layering rules of docs (algorithms and io at the
bottom, formats never reaching into the engine, nothing below the front door importing the CLI)."""

import ast
from pathlib import Path

import secateurs

PACKAGE = Path(secateurs.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str):
    """(imported module, imported names) for every import in module `name`, at any depth."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, path.name == "__init__.py", node)
            yield source, [alias.name for alias in node.names]


def graph() -> dict[str, set[str]]:
    edges = {name: set() for name in MODULES}
    for name in MODULES:
        for source, names in imports(name):
            if not source.startswith("secateurs"):
                continue
            submodules = [f"{source}.{imported}" for imported in names if f"{source}.{imported}" in MODULES]
            edges[name].update(submodules)  # `from secateurs.x import y` where y is a module
            if source in MODULES and len(submodules) < max(1, len(names)):
                edges[name].add(source)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_no_private_names_taken_across_modules():
    taken = [(name, source, imported) for name in MODULES for source, names in imports(name)
             if source.startswith("secateurs") and source != name
             for imported in names if imported.startswith("_") and not imported.startswith("__")]
    assert taken == []


def reaches(edges, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_layers():
    edges = graph()
    pure = {name for name in MODULES if name.startswith("secateurs.algorithms")}
    for name in pure:  # the mathematics runs without the rest of the package
        assert {target for target in reaches(edges, name) if not target.startswith("secateurs.algorithms")} \
            <= {"secateurs", "secateurs.errors"}, name
    assert reaches(edges, "secateurs.io") <= {"secateurs", "secateurs.errors"}
    for name in MODULES:
        if name.startswith(("secateurs.formats", "secateurs.runtime")):
            assert not any(t.startswith(("secateurs.pipeline", "secateurs.cli", "secateurs.api")) for t in edges[name]), name
        if name.startswith(("secateurs.pipeline", "secateurs.runtime", "secateurs.formats", "secateurs.eval")):
            assert not any(t.startswith("secateurs.cli") for t in reaches(edges, name)), name
    assert not {t for t in edges["secateurs.models"] if t.startswith("secateurs.formats")}
