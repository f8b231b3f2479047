"""Shared by the CLI tests: the demo model's saved folder and its single-process HF greedy tokens."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "The weather station on the island recorded"


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
