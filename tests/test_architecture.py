"""The layout rules of the package (ARCHITECTURE.md, Layers and Conventions), checked on the source so they
hold as the code grows: file sizes, the engine's size, who may read the environment, and
attention code that never talks to torch.distributed itself."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "toolkit"
ENGINE = ("attention", "engine", "distributed")
# the launcher's variables (distributed/), LCTK_* (settings.py), the CLI's own thread count
ENV_READERS = {"settings.py", "distributed/launcher.py", "cli/support.py"}


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "_configs" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", sources(), ids=rel)
def test_no_file_over_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300


def test_engine_proper_stays_small():
    lines = sum(len(p.read_text().splitlines()) for p in sources() if p.relative_to(PACKAGE).parts[0] in ENGINE)
    # 2,500 until the GPU paths (flash-attn decode, Comm's device checks, the watchdog's deadline)
    # and the launcher's parent-death rule added ~600 lines; the continuous-batching engine (scheduler,
    # block pool, rows, prefixes shared by reference: ~750) replaced batch_decode.py (185) and the
    # one-prompt decode loop (the static and CUDA-graph steps are the engine's step for a request alone);
    # speculation (prompt lookup, its auto sizing, the verify rows and their rollback) added ~230,
    # the draft model's drafter and --cuda-graph's refusals moved into engine/capturable.py ~100;
    # elastic placement (blocks of SP ranks and their groups, per-rank pools and budgets, the engine's
    # placing and its logits gather) ~400; speculative sampling with a draft model (its rule, draws
    # seeded by position, a window set by the position) ~60; the pace's prefill fit (a forward's
    # fixed cost, its tokens, its attention's pairs, by weighted least squares) in engine/pace.py ~70;
    # a step's decode rows and prefill chunks in one forward (engine/packed.py) ~135; plain decode
    # rows by the kernel alone (rows.py, sequence_parallel.py: the call chain cost as much as it) ~35
    assert lines <= 4950, f"attention/ + engine/ + distributed/ is {lines} lines"


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
    """Head and node divisibility is decided by planner/rules.py alone, rank groups by
    distributed/dims.py alone: no other module restates the Ulysses KV-head rule or builds
    rank groups."""
    for path in sources():
        text = path.read_text()
        if rel(path) != "planner/rules.py":
            assert "% ulysses" not in text or rel(path).startswith("attention/"), rel(path)
        if rel(path) != "distributed/dims.py":
            assert "def rank_groups" not in text and "def group_ranks" not in text, rel(path)


# ---- communication and clocks: one module each -----------------------------------------------
COMM_MODULE = "distributed/comm.py"
TIMING_MODULE = "distributed/timing.py"
# collectives, point to point and object collectives; group management (init_process_group,
# new_group, destroy_process_group, get_rank, get_world_size, is_initialized) is not in it
COLLECTIVE = re.compile(r"(all_reduce.*|all_gather.*|broadcast.*|all_to_all.*|send|recv|isend|irecv|.*barrier"
                        r"|batch_isend_irecv|P2POp|gather.*|scatter.*|reduce.*)$")


def _dotted(node) -> str:
    """`a.b.c` for a chain of names, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def collectives_used(source: str) -> list[str]:
    """The torch.distributed collectives a module calls or names: `dist.all_reduce`,
    `torch.distributed.barrier`, `from torch.distributed import send`, `c10d.broadcast`."""
    tree = ast.parse(source)
    prefixes, found = {"torch.distributed"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            prefixes |= {a.asname for a in node.names if a.name.startswith("torch.distributed") and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            prefixes |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [a.name for a in node.names if COLLECTIVE.match(a.name)]
            prefixes |= {a.asname or a.name for a in node.names if not COLLECTIVE.match(a.name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and COLLECTIVE.match(node.attr):
            base = _dotted(node.value)
            if any(base == p or base.startswith(p + ".") for p in prefixes):
                found.append(node.attr)
    return found


def test_the_collective_rule_sees_every_spelling():
    assert collectives_used("import torch.distributed as dist\ndist.all_reduce(x)") == ["all_reduce"]
    assert collectives_used("import torch\ntorch.distributed.barrier()") == ["barrier"]
    assert collectives_used("from torch.distributed import broadcast_object_list") == ["broadcast_object_list"]
    assert collectives_used("from torch import distributed as d\nd.isend(x, 1)") == ["isend"]
    assert collectives_used("import torch.distributed as dist\ndist.distributed_c10d.recv(x)") == ["recv"]
    assert collectives_used("import torch.distributed as dist\ndist.get_rank(); dist.new_group([0, 1])") == []
    assert collectives_used("comm.all_reduce(x, group)\nstate.comm.broadcast(t, 0, g)") == []


@pytest.mark.parametrize("path", [p for p in sources() if rel(p) != COMM_MODULE], ids=rel)
def test_only_comm_calls_collectives(path):
    """Every collective goes through distributed/comm.py, where its tensors' devices are checked
    against the group's backend (NCCL takes no host tensors) and its bytes are counted."""
    assert not collectives_used(path.read_text()), f"{rel(path)}: use toolkit.distributed.comm instead"


def _perf_counters(source: str) -> int:
    tree = ast.parse(source)
    named = sum(isinstance(n, ast.Attribute) and n.attr in ("perf_counter", "perf_counter_ns") for n in ast.walk(tree))
    imported = sum(isinstance(n, ast.ImportFrom) and n.module == "time"
                   and any(a.name.startswith("perf_counter") for a in n.names) for n in ast.walk(tree))
    return named + imported


def test_reported_times_come_from_the_synchronising_clock():
    """prefill_s, decode_s, load_s, ttft_s, busy time: toolkit.distributed.timing.clock waits for
    the device first. Deadlines use time.monotonic and timestamps time.time, which this allows."""
    assert _perf_counters("import time\nt = time.perf_counter()") == 1
    assert _perf_counters("from time import perf_counter") == 1
    users = [rel(p) for p in sources() if _perf_counters(p.read_text())]
    assert users == [TIMING_MODULE], users
