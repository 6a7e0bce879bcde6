"""The package's shape: stage folders, small modules, no import circle, no private name
crossing modules. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mlx_tune"
MAX_LINES = 500
MAX_TOP_LEVEL = 8
STAGES = {"runtime", "data", "model", "adapters", "training", "planning", "export", "server", "evaluation", "cli",
          "testing", "studio"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken from it, at module level) for every mlx_tune import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("mlx_tune"):
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [n for n in names if f"{mod}.{n}" in modules]
            for s in subs:
                found.append((f"{mod}.{s}", [], id(node) in top_level))
            found.append((mod, [n for n in names if n not in subs], id(node) in top_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mlx_tune"):
                    found.append((a.name, [], id(node) in top_level))
    return found


def test_stage_folders_and_few_top_level_modules():
    top = [p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")]
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= STAGES, f"unexpected stage folders: {sorted(folders - STAGES)}"
    assert len(top) + 2 <= MAX_TOP_LEVEL, f"modules directly in mlx_tune/: {sorted(top)}"


def test_every_stage_says_what_it_owns():
    for stage in STAGES:
        init = PKG / stage / "__init__.py"
        assert init.exists(), f"{stage}/ has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{stage}/__init__.py has no docstring"


def test_no_module_over_500_lines():
    long = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in _modules().items()}
    assert not {n: c for n, c in long.items() if c > MAX_LINES}, "split these along their seams"


def test_no_private_name_imported_from_another_module():
    modules = _modules()
    bad = [f"{name}: {mod}.{n}" for name, path in modules.items() for mod, names, _ in _imports(name, path, modules)
           for n in names if n.startswith("_") and n != "__version__"]
    assert not bad


def test_no_import_circle():
    """Imports form a DAG, counting those inside functions (a late import that closes a
    circle still ties the two modules together)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        deps = set()
        for mod, _, _top in _imports(name, path, modules):
            if mod not in modules:
                continue
            # importing a.b.c runs a.b's __init__ first (a package this module is inside is
            # already being imported, so it adds no edge)
            parts = mod.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} - own
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
