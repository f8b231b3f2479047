"""What the tests share: the fp32 tolerance, token ids, rank pools (gloo ranks spawned once
per world size, serving many test bodies), and the demo model with its single-process truth."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from toolkit.rank_group import RankGroup, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "The weather station on the island recorded"

# Logits of the tiny models are of unit-to-ten scale; fp32 reordering across ranks and chunks
# moves them by ~1e-6. 1e-4 is tight enough that any masking or cache bug (O(1e-1)) fails.
LOGITS_ATOL = 1e-4


def ids(n, seed=0, vocab=96):
    """[1, n] random token ids, the same for a seed."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- rank pools ------------------------------------------------------------------------------
class RankPool(RankGroup):
    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        return super().run(fn, *args, timeout=timeout, **kwargs)


class Pools:
    """One live pool per world size for a test session; a broken pool is replaced."""

    def __init__(self):
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world: int) -> RankPool:
        pool = self._pools.get(world)
        if pool is None or not pool.alive:
            pool = self._pools[world] = RankPool(world)
        return pool

    def close_world(self, world: int):
        """Free a big pool that later tests won't need."""
        pool = self._pools.pop(world, None)
        if pool is not None:
            pool.close()

    def close(self):
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# ---- the demo model -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def demo_folder() -> str:
    """SmolLM2-135M-Instruct as a safetensors folder with its tokenizer (converted once, then cached)."""
    from toolkit.models import _converted_gguf_folder, resolve_source

    return str(_converted_gguf_folder(resolve_source("smollm2-135m")))


@functools.lru_cache(maxsize=None)
def hf_greedy(prompt: str, new_tokens: int) -> tuple[int, ...]:
    """The truth every layout is held to: transformers' own greedy generate, one process, raw tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_folder()
    ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tuple(out[0, ids.shape[1]:].tolist())


def one_error_line(result) -> str:
    """Assert a failure printed exactly one `Error:` line and no traceback; return it."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("lctk: ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip()
    return lines[0]
