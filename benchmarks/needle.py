"""Needle in a haystack: a passkey hidden at several depths of filler the project writes
itself (toolkit.summarize.synthetic.filler), asked for at the end, with the demo model.

Single process: plain transformers `generate` (sdpa, greedy). Parallel: our engine, ring=2
on 2 ranks (the only SP layout SmolLM2's 9 heads allow on 2 ranks). Both greedy, same
prompt ids; a case is right when the passkey's digits appear in the answer.
"""
from __future__ import annotations

import random

from .models import load
from .rank_group import STATE, forget

NEW_TOKENS = 16
QUESTION = "What is the secret passkey? Answer with the number only."


def build_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[list[int], int]:
    """Chat-formatted prompt ids of at most `length` tokens, the needle at `depth` (0..1)."""
    from toolkit.summarize.synthetic import filler

    passkey = random.Random(seed).randint(10000, 99999)
    needle = f"The secret passkey is {passkey}. Remember the passkey {passkey}."
    pool = filler(length // 8 + 16, seed=seed)

    def ids_for(count: int) -> list[int]:
        body = pool[:count]
        at = int(round(depth * count))
        text = " ".join(body[:at] + [needle] + body[at:])
        message = f"Here is a research station logbook with a passkey hidden in it.\n\n{text}\n\n{QUESTION}"
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids)

    lo, hi = 1, len(pool)  # the largest sentence count whose prompt fits `length`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(ids_for(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return ids_for(lo), passkey


def build_on_rank(key: str, model_dir: str, case: dict) -> bool:
    from toolkit.api import parallelize

    STATE[key] = parallelize(load(model_dir, "sdpa"), **case)
    return True


def generate_on_rank(key: str, ids: list[int], new_tokens: int) -> list[int]:
    return STATE[key].generate(ids, max_new_tokens=new_tokens).token_ids


def needle(ranks, model_dir: str, lengths, depths, threads: int, parallel_case: dict | None = None) -> tuple[dict, list]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    case = parallel_case or {"ring": 2}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir, "sdpa")
    ranks.run(build_on_rank, "needle", model_dir, case)
    rows = []
    for length in lengths:
        for i, depth in enumerate(depths):
            ids, passkey = build_prompt(tokenizer, length, depth, seed=length + i)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            single = out[0, len(ids):].tolist()
            parallel = ranks.run(generate_on_rank, "needle", ids, NEW_TOKENS)[0]
            answers = {name: tokenizer.decode(tokens, skip_special_tokens=True)
                       for name, tokens in (("single", single), ("parallel", parallel))}
            rows.append({"length": length, "prompt_tokens": len(ids), "depth": depth, "passkey": passkey,
                         "answer_single": answers["single"], "answer_parallel": answers["parallel"],
                         "correct_single": str(passkey) in answers["single"],
                         "correct_parallel": str(passkey) in answers["parallel"],
                         "same_tokens": single == parallel})
    ranks.run(forget)
    acc = {name: sum(r[f"correct_{name}"] for r in rows) / len(rows) for name in ("single", "parallel")}
    run = {"bench": "needle", "model": "SmolLM2-135M-Instruct", "parallel_layout": case, "new_tokens": NEW_TOKENS,
           "single": "transformers generate (sdpa, greedy), one process", "rows": rows,
           "same_tokens": sum(r["same_tokens"] for r in rows) / len(rows)}
    return {"needle_accuracy_parallel": acc["parallel"], "needle_accuracy_single": acc["single"]}, [run]
