"""The package's imports point one way (down the layers below) and form no cycle."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "latentr3_jax"

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = [
    ("latentr3_jax.errors", "latentr3_jax.utils", "latentr3_jax.config"),
    ("latentr3_jax.model", "latentr3_jax.gguf_convert"),
    ("latentr3_jax.hf",),
    ("latentr3_jax.data", "latentr3_jax.parallel"),
    ("latentr3_jax.decode", "latentr3_jax.train"),
    ("latentr3_jax.eval",),
    ("latentr3_jax.pipeline", "latentr3_jax.report", "latentr3_jax.recommend"),
    ("latentr3_jax.recommend_io", "latentr3_jax.serve"),
    ("latentr3_jax.study",),
    ("latentr3_jax.cli", "latentr3_jax.__main__"),
]


def _modules() -> dict:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    if module == "latentr3_jax":
        return len(LAYERS)
    raise AssertionError(f"{module}: not in any layer of tests/test_layering.py")


def _imports(path: pathlib.Path, modules: dict) -> set:
    """The package modules `path` imports (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("latentr3_jax")}
    return out


def test_no_upward_import():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target in _imports(path, modules):
            if _layer(target) > _layer(name):
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {t for t in _imports(path, modules) if t in modules and t != name}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_imports_at_module_top_unless_stated():
    """An import inside a function needs a comment saying why (optional dependency,
    start-up cost) on its line or the line above."""
    bad = []
    for name, path in _modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        i = inner.lineno - 1
                        context = " ".join(lines[max(i - 3, 0):i + 1])
                        if "#" not in context:
                            bad.append(f"{name}:{inner.lineno}")
    assert not bad, bad
