"""The shape of the house, checked: `models/` is a library, `utils/` serves the scripts, no cycles.

Every import statement of the project's modules is read with `ast` (imports inside functions
included: a lazy import is still a dependency):

* a module under `models/` imports no project module outside `models/` (torch, timm and the
  standard library are not project modules), so a copy of `models/` alone works;
* a module under `utils/` imports only `utils/` and `models/`, never a top-level script or a tool;
* the project's import graph has no cycle.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("models", "utils", "tools", "scripts")


def project_modules() -> dict:
    """module name -> file path: the top-level scripts and every module of PACKAGES."""
    found = {}
    for entry in sorted(os.listdir(ROOT)):
        if entry.endswith(".py"):
            found[entry[:-3]] = os.path.join(ROOT, entry)
    for package in PACKAGES:
        folder = os.path.join(ROOT, package)
        for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if entry.endswith(".py"):
                name = package if entry == "__init__.py" else f"{package}.{entry[:-3]}"
                found[name] = os.path.join(folder, entry)
    return found


def imports_of(name: str, path: str, modules: dict) -> set:
    """The project modules `name` imports (a `from package import module` counts as the module)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read(), filename=path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in parts + [base] if p)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def import_graph() -> dict:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> str:
    return name.split(".", 1)[0] if name.split(".", 1)[0] in ("models", "utils") else "top"


def test_models_is_a_library():
    graph = import_graph()
    offending = {name: sorted(t for t in targets if _layer(t) != "models")
                 for name, targets in graph.items() if _layer(name) == "models"}
    assert not {k: v for k, v in offending.items() if v}, offending


def test_utils_imports_no_script_or_tool():
    graph = import_graph()
    offending = {name: sorted(t for t in targets if _layer(t) == "top")
                 for name, targets in graph.items() if _layer(name) == "utils"}
    assert not {k: v for k, v in offending.items() if v}, offending


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert strongly_connected(import_graph()) == []


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The checker itself: a function-level import is an edge, and a two-module cycle is found."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("from a import f\n")
    modules = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert strongly_connected(graph) == [["a", "b"]]
