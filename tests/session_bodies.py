"""Document-session bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

import torch

from toolkit import LongContextModel


def _answers(session, questions, new_tokens):
    return dict(tokens=[session.ask(q, max_new_tokens=new_tokens).token_ids for q in questions],
                logits=[session.logits(q) for q in questions])


def ask_after_prefill(model_dir: str, case: dict, doc: list[int], questions: list[list[int]], new_tokens: int,
                      save_to: str | None = None) -> dict:
    """Prefill once, ask each question (twice over, in two orders), optionally save; per rank."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    session = lcm.prefill_document(doc)
    first = _answers(session, questions, new_tokens)
    again = _answers(session, list(reversed(questions)), new_tokens)
    lengths = list(session.state.cache.shard_lengths)
    manifest = session.save(save_to) if save_to else None
    return dict(first, again_tokens=again["tokens"][::-1], shard_lengths=lengths, tokens=first["tokens"],
                manifest=manifest, cache_bytes=session.state.cache.nbytes())


def ask_after_load(model_dir: str, case: dict, path: str, questions: list[list[int]], new_tokens: int) -> dict:
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    session = lcm.load_document(path)
    lengths = list(session.state.cache.shard_lengths)
    return dict(_answers(session, questions, new_tokens), loaded_tokens=session.tokens, shard_lengths=lengths)


def load_refusal(model_dir: str, case: dict, path: str) -> str:
    from toolkit.sessions import CacheError

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    try:
        lcm.load_document(path)
    except CacheError as err:
        return str(err)
    return ""


def save_interrupted(model_dir: str, case: dict, doc: list[int], path: str, fail_rank: int) -> str:
    """One rank cannot write its file: the save must fail on every rank and leave the old cache."""
    import os

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    session = lcm.prefill_document(doc)
    if lcm.topo.rank == fail_rank:
        session.state.cache.layers[0].planes = [torch.zeros(0)] * 2  # tensors the save cannot slice: this rank fails
    try:
        session.save(path)
    except ValueError as err:
        return f"{err}|{sorted(os.listdir(path))}"
    return "saved"


def rope_scaled(model_dir: str, case: dict, ids: torch.Tensor, spec: str, new_tokens: int) -> dict:
    lcm = LongContextModel.from_pretrained(model_dir, rope_scaling=spec, **case)
    return dict(logits=lcm.prefill(ids), tokens=lcm.generate(ids, max_new_tokens=new_tokens).token_ids,
                max_positions=lcm.config.max_position_embeddings)
