"""The package's import structure: the product never imports its benchmark package, and no import circles."""

import ast
from pathlib import Path

import nativemem

ROOT = Path(nativemem.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Modules of the package that ``name`` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("nativemem")}


def test_nothing_outside_bench_and_cli_imports_the_benchmark_package():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("nativemem.bench", "nativemem.cli")):
            continue
        bad = sorted(m for m in _imports(name, path, top_level_only=False)
                     if m == "nativemem.bench" or m.startswith("nativemem.bench."))
        if bad:
            offenders.append(f"{name}: {bad}")
    assert not offenders, offenders


def test_the_server_mcp_and_consolidation_use_only_the_memory_contract():
    """No reaching into a memory's store (index, payloads, catalog): items/get/count/delete are the contract's."""
    root = Path(nativemem.__file__).parent
    files = [*sorted((root / "server").glob("*.py")), root / "mcp_server.py", root / "consolidate.py"]
    offenders = [f"{path.name}:{n}" for path in files
                 for n, line in enumerate(path.read_text().splitlines(), 1) if ".store." in line]
    assert not offenders, offenders


def test_no_import_circles_at_module_level():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages export; only real circles count
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles


def test_the_library_and_the_server_never_import_the_test_suites_or_test_only_packages():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("nativemem.testing", "nativemem.cli", "nativemem.bench")):
            continue
        bad = sorted(m for m in _imports(name, path, top_level_only=False) if m.startswith("nativemem.testing"))
        if bad:
            offenders.append(f"{name}: {bad}")
    assert not offenders, offenders
    for name, path in _modules().items():  # test-only packages are imported where a suite runs, never at import
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("hypothesis", "pytest") for n in names), f"{name} imports {names}"


def test_no_function_is_longer_than_120_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 120:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
