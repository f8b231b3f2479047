"""The layout rules of the package (DESIGN.md section 3 and 6), checked on the source so they
hold as the code grows: file sizes, the engine's size, who may read the environment, and
attention code that never talks to torch.distributed itself."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "toolkit"
ENGINE = ("attention", "engine", "distributed")
# the launcher's variables (distributed/), LCTK_* (settings.py), the CLI's own thread count
ENV_READERS = {"settings.py", "distributed/launcher.py", "rank_group.py", "cli/support.py"}


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "_configs" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", sources(), ids=rel)
def test_no_file_over_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300


def test_engine_proper_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in sources() if p.relative_to(PACKAGE).parts[0] in ENGINE)
    assert lines <= 2500, f"attention/ + engine/ + distributed/ is {lines} lines"


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in ("environ", "getenv")
                                                                             for a in node.names):
            return True
    return False


def test_only_settings_the_launcher_module_and_the_cli_read_the_environment():
    readers = {rel(p) for p in sources() if _reads_environment(ast.parse(p.read_text()))}
    assert readers <= ENV_READERS, f"reads os.environ outside the allowed modules: {sorted(readers - ENV_READERS)}"
    assert "settings.py" in readers and "distributed/launcher.py" in readers


def _runtime_imports(tree: ast.Module):
    """Imported module names, leaving out `if TYPE_CHECKING:` blocks (type hints only)."""
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                yield from (a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                yield ("." * sub.level) + (sub.module or "")


@pytest.mark.parametrize("path", sorted((PACKAGE / "attention").glob("*.py")), ids=rel)
def test_attention_is_pure_math(path):
    """Communication comes in as the comm object; attention never imports a process group."""
    imported = set(_runtime_imports(ast.parse(path.read_text())))
    assert not {m for m in imported if m.startswith("torch.distributed") or "distributed" in m}, imported


def test_the_layout_rules_live_in_one_module():
    """Head and node divisibility is decided by planner/rules.py alone: no other module
    restates the Ulysses KV-head rule or builds rank groups."""
    for path in sources():
        if rel(path) == "planner/rules.py":
            continue
        text = path.read_text()
        assert "% ulysses" not in text or rel(path).startswith("attention/"), rel(path)
        assert "def rank_groups" not in text and "def group_ranks" not in text, rel(path)
