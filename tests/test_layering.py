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
