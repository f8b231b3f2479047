"""Test bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from toolkit import parallelize


def _load(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prefill_logits(model_dir: str, ids: torch.Tensor, cases: list[dict]) -> list[torch.Tensor]:
    """Last-position logits for each case (parallelize kwargs)."""
    out = []
    for case in cases:
        lcm = parallelize(_load(model_dir), **case)
        out.append(lcm.prefill(ids))
    return out


def greedy_tokens(model_dir: str, ids: torch.Tensor, new_tokens: int, cases: list[dict]) -> list[list[int]]:
    out = []
    for case in cases:
        lcm = parallelize(_load(model_dir), **case)
        out.append(lcm.generate(ids, max_new_tokens=new_tokens).token_ids)
    return out


def forced_decode_logits(model_dir: str, ids: torch.Tensor, tokens: list[int], case: dict) -> torch.Tensor:
    """Prefill, then feed `tokens` one by one: logits after prefill and after each token."""
    from toolkit.engine.decode import decode_step

    lcm = parallelize(_load(model_dir), **case)
    rows = [lcm.prefill(ids, reserve_new_tokens=len(tokens))]
    for i, tok in enumerate(tokens):
        rows.append(decode_step(lcm.model, tok, ids.shape[1] + i, lcm.last_state))
    return torch.stack(rows)


def comm_bytes_per_layer(model_dir: str, ids: torch.Tensor, case: dict) -> dict:
    """Bytes this rank sent and received per layer during one prefill, by tag."""
    lcm = parallelize(_load(model_dir), **case)
    lcm.topo.comm.counter.reset()
    lcm.prefill(ids)
    return {k: tuple(v) for k, v in lcm.topo.comm.counter.by_key.items()}


def generate_real(model_dir: str, ids: torch.Tensor, new_tokens: int, case: dict) -> list[int]:
    """The same path a user takes: LongContextModel.from_pretrained on a saved folder."""
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    return lcm.generate(ids, max_new_tokens=new_tokens).token_ids
