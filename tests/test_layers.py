"""The layer order of ARCHITECTURE.md, held on the source: every import of a toolkit module
(at module level or inside a function) goes to its own layer or one below, and the imports
form no cycle. A new upward import or cycle fails here with its file and line."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "toolkit"

# Bottom to top, as drawn in ARCHITECTURE.md, "Layers".
ORDER = ["settings", "backends", "documents", "distributed", "attention", "options", "engine", "planner", "config",
         "models", "rope_scaling", "tensor_parallel", "loading", "sessions", "summarize", "api", "serve", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # the package's own __init__ re-exports: no layer


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported toolkit module, line) for every import statement of a module."""
    path = MODULES[module]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            targets = [n for n in names if n in MODULES] or [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                out.append((target, node.lineno))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_layer(m) for m in MODULES} - set(ORDER) - {None})
    assert not unknown, f"add {unknown} to ORDER here and to ARCHITECTURE.md's layers"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_go_down_the_layers(module):
    mine = ORDER.index(_layer(module))
    upward = [f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target}"
              for target, line in GRAPH[module] if _layer(target) and ORDER.index(_layer(target)) > mine]
    assert not upward, "; ".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target, line in GRAPH[module]:
            if _layer(target) is None:
                continue
            if state.get(target) == 1:
                loop = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(loop) + f" (closed at {module}:{line})")
            if not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if not state.get(module):
            visit(module)


def test_deepspeed_is_touched_by_one_adapter_file():
    """DeepSpeed's internals (its comm object, its layers' recorded splits, its split functions)
    are reached from tensor_parallel/autotp.py alone, which says why."""
    for module, path in MODULES.items():
        if module == "toolkit.tensor_parallel.autotp":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] == "deepspeed" for n in names), f"{path.name}:{node.lineno} imports deepspeed"
