"""Dependencies point one way: nothing in the package imports the command line back."""

import ast
from pathlib import Path

import kvx

PACKAGE = Path(kvx.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_module_imports_the_cli():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name not in ("cli.py", "__main__.py") and "kvx.cli" in _imports(p)]
    assert offenders == []


def test_lower_layers_never_import_commands_or_front_ends():
    lower = ["runtime", "policies", "kernels", "models"]
    upper = ("kvx.commands", "kvx.pipeline", "kvx.serve", "kvx.options", "kvx.eval", "kvx.inputs", "kvx.result_view",
             "kvx.usage")
    offenders = []
    for pkg in lower:
        for p in (PACKAGE / pkg).rglob("*.py"):
            bad = [m for m in _imports(p) if m.startswith(upper)]
            if bad:
                offenders.append((str(p.relative_to(PACKAGE)), bad))
    assert offenders == []


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_the_runtime_has_no_import_circle():
    """Every import between runtime modules, at the top or inside a function, points one way (a circle
    hidden behind a local import, as batch_eviction <-> decode_eviction once was, counts too)."""
    modules = {_module_name(p): p for p in (PACKAGE / "runtime").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name and not modules[t].name == "__init__.py")
        graph[name] = deps

    seen, stack = {}, []

    def visit(node):
        seen[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if seen.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = "done"

    for node in graph:
        if node not in seen:
            visit(node)
