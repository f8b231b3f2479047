"""Decode bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

import torch

from toolkit import LongContextModel
from toolkit.engine.decode import decoder


def step_logits(lcm, ids: torch.Tensor, forced: list[int], mode: str) -> torch.Tensor:
    """Logits after the prompt and after each forced token, decoding in `mode` -> [T + 1, V]."""
    rows = [lcm.prefill(ids, reserve_new_tokens=len(forced))]
    step = decoder(lcm.model, lcm.last_state, lcm.stage, mode, len(forced))
    for i, token in enumerate(forced[:-1]):
        rows.append(step(token, ids.shape[1] + i))
    return torch.stack(rows)


def decode_paths(model_dir: str, case: dict, prompt: list[int], forced: list[int],
                 modes: tuple[str, ...] = ("eager", "static")) -> dict:
    """Decode of the same prompt in each mode (static: the CUDA graph's twin), per rank: logits
    after the prompt and each forced token, and greedy tokens in the last mode."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    ids = torch.tensor([prompt])
    out = {mode: step_logits(lcm, ids, forced, mode) for mode in modes}
    lcm.decode_mode = modes[-1]
    out["tokens"] = lcm.generate(ids, max_new_tokens=len(forced)).token_ids
    return out


def asked_together(model_dir: str, case: dict, doc: list[int], questions: list[list[int]], new_tokens: int) -> dict:
    """Each question asked alone, then all of them in batches (of 2, and all at once), greedy and
    sampled; with an end-of-sequence token that stops some rows before the others."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    session = lcm.prefill_document(doc)
    plain = [session.ask(q, max_new_tokens=new_tokens).token_ids for q in questions]
    lcm.model.generation_config.eos_token_id = _ending_rows_apart(plain, new_tokens)
    sampled = dict(do_sample=True, temperature=1.5, top_k=20, seed=7)
    alone = [session.ask(q, max_new_tokens=new_tokens).token_ids for q in questions]
    alone_sampled = [session.ask(q, max_new_tokens=new_tokens, **sampled).token_ids for q in questions]
    streamed: list[tuple[int, int]] = []
    together = session.ask_many(questions, new_tokens, on_token=lambda i, t: streamed.append((i, t)))
    pairs = session.ask_many(questions, new_tokens, batch=2)
    together_sampled = session.ask_many(questions, new_tokens, **sampled)
    return dict(alone=alone, alone_sampled=alone_sampled, together=[r.token_ids for r in together],
                pairs=[r.token_ids for r in pairs], together_sampled=[r.token_ids for r in together_sampled],
                streamed=[[t for i, t in streamed if i == b] for b in range(len(questions))],
                batch_sizes=[r.timings["batch"] for r in pairs], doc_tokens=sum(session.state.cache.shard_lengths))


def _ending_rows_apart(answers: list[list[int]], new_tokens: int) -> int:
    """A token that, as end-of-sequence, ends the answers after different numbers of tokens."""
    def lengths(eos):
        return {a.index(eos) + 1 if eos in a else new_tokens for a in answers}

    return next((t for a in answers for t in a if len(lengths(t)) > 1), answers[0][0])


def host_syncs_in_static_step(model_dir: str, case: dict, prompt: list[int]) -> list[str]:
    """Every op of one static decode step that needs a tensor's value on the host, with where it came from."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        NAMES = ("_local_scalar_dense", "nonzero", "is_nonzero", "aten.equal", "unique", "masked_select")

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in self.NAMES):
                frames = [f"{f.filename}:{f.name}" for f in traceback.extract_stack()]
                self.seen.append(f"{func} <- " + " <- ".join(reversed(frames[-12:-1])))
            return func(*args, **(kwargs or {}))

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    logits = lcm.prefill(torch.tensor([prompt]), reserve_new_tokens=4)
    step = decoder(lcm.model, lcm.last_state, lcm.stage, "static", 4)
    token = int(logits.argmax())
    step(token, len(prompt))  # the first step of a generation may set things up; the second is what repeats
    with torch.no_grad(), Syncs() as seen:
        step(token, len(prompt) + 1)
    return seen.seen


def asked_around_a_rope_switch(model_dir: str, case: dict, doc: list[int], questions: list[list[int]],
                               new_tokens: int) -> dict:
    """ask_many against ask where answers stay below, cross, or start past LongRoPE's switch."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    session = lcm.prefill_document(doc)
    alone = [session.ask(q, max_new_tokens=new_tokens).token_ids for q in questions]
    together = session.ask_many(questions, new_tokens)
    return dict(alone=alone, together=[r.token_ids for r in together], sizes=[r.timings["batch"] for r in together])
