"""Engine bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

from toolkit import LongContextModel
from toolkit.engine.decode import Sampling
from toolkit.engine.settings import EngineSettings
from toolkit.engine.request import Request

SAMPLED = Sampling(do_sample=True, temperature=1.5, top_k=20, seed=7)


def _run(lcm, prompts, new_tokens, sampling=Sampling(), settings=None):
    """Every prompt through the engine together -> (tokens, reasons, logits [T, V] per prompt: rank 0's)."""
    if settings is not None:
        lcm.engine_settings = settings
    requests = [Request(list(p), new_tokens, sampling, keep_logits=True) for p in prompts]
    engine = lcm.engine
    engine.eos = lcm.eos_token_ids()
    done = engine.run(requests)
    tokens = [t for t, _, _ in done.values()]
    reasons = [r for _, r, _ in done.values()]
    logits = [r.logits for r in requests] if lcm.topo.is_main else None
    return tokens, reasons, logits, engine.scheduler.preemptions if lcm.topo.is_main else None


def crowd_and_alone(model_dir: str, case: dict, prompts: list[list[int]], new_tokens: int, eos: int | None,
                    tiny_pool: dict) -> dict:
    """Each prompt alone and all together in a pool too small to hold them all at once
    (preemption), without an end-of-sequence token; then with `eos`: each alone, all together
    (greedy and sampled), and through generate(list). Each through the engine."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    lcm.model.generation_config.eos_token_id = None  # every answer its full length: the pool must run out
    full = [_run(lcm, [p], new_tokens)[0][0] for p in prompts]
    tokens, _, _, preemptions = _run(lcm, prompts, new_tokens, settings=EngineSettings(**tiny_pool))
    tiny = dict(full=full, tiny_pool=tokens, preemptions=preemptions)
    lcm.engine_settings = EngineSettings()
    lcm.model.generation_config.eos_token_id = eos
    alone = [_run(lcm, [p], new_tokens) for p in prompts]
    out = {"alone": [a[0][0] for a in alone], "alone_reasons": [a[1][0] for a in alone],
           "alone_logits": [a[2][0] for a in alone] if lcm.topo.is_main else None}
    forwards, steps = [], lcm.engine.steps
    hook = lcm.engine.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))  # every stage's layers
    tokens, reasons, logits, _ = _run(lcm, prompts, new_tokens)
    hook.remove()
    out.update(together=tokens, together_reasons=reasons, together_logits=logits,
               forwards=len(forwards), steps=lcm.engine.steps - steps)
    out["alone_sampled"] = [_run(lcm, [p], new_tokens, SAMPLED)[0][0] for p in prompts]
    out["together_sampled"] = _run(lcm, prompts, new_tokens, SAMPLED)[0]
    out.update(tiny)
    out["generate_list"] = [r.token_ids for r in lcm.generate(prompts, new_tokens)]
    out["states_left"] = len(lcm.engine.states)
    return out


def guessed_and_plain(model_dir: str, case: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    """Each prompt decoded plainly and with guesses (prompt lookup, 3 a step; auto), alone and
    together, greedy and sampled, through the engine."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    lcm.model.generation_config.eos_token_id = None

    def run(batch, speculate, sampling=Sampling()):
        requests = [Request(list(p), new_tokens, sampling, keep_logits=True, speculate=speculate) for p in batch]
        done = lcm.engine.run(requests)
        return ([t for t, _, _ in done.values()], [r.logits for r in requests] if lcm.topo.is_main else None,
                [timings.get("speculation") for _, _, timings in done.values()])

    plain, plain_logits, _ = run(prompts, "off")
    together, together_logits, stats = run(prompts, "ngram:3")
    sampled, _, sampled_stats = run(prompts, "ngram:3", SAMPLED)
    return dict(plain=plain, plain_logits=plain_logits, together=together, together_logits=together_logits,
                stats=stats + sampled_stats, alone=[run([p], "ngram:3")[0][0] for p in prompts],
                auto=run(prompts, "auto")[0], sampled_plain=run(prompts, "off", SAMPLED)[0], sampled_guessed=sampled,
                states_left=len(lcm.engine.states))


def cache_after_wrong_guesses(model_dir: str, case: dict, prompt: list[int], right: list[int], wrong: list[int]) -> dict:
    """One cache decodes `right` a token a step; its twin checks right + wrong in one step and drops
    the wrong keys. -> what differs between the two caches on this rank."""
    import torch

    from toolkit.engine.prefill import prefill
    from toolkit.engine.rows import RowsAttention, rows_step

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    plain, guessed = (lcm.new_state(len(prompt) + len(right) + len(wrong)) for _ in range(2))
    for state in (plain, guessed):
        prefill(lcm.model, torch.tensor([prompt]), state, lcm.chunk_size, stage=lcm.stage)
    before = {i: (kv.first, kv.stored().k.clone()) for i, kv in guessed.cache.layers.items()}
    for i, token in enumerate(right):
        rows_step(lcm.model, torch.tensor([[token]]), [len(prompt) + i], RowsAttention([plain]), lcm.stage)
    rows_step(lcm.model, torch.tensor([right + wrong]), [len(prompt)], RowsAttention([guessed]), lcm.stage)
    guessed.drop_newest(len(wrong))
    a, b = plain.cache, guessed.cache
    ring = len(a.shard_lengths)
    out = {"lengths": (a.shard_lengths, b.shard_lengths),
           "positions": all(torch.equal(a.shard_positions(r), b.shard_positions(r)) for r in range(ring)),
           "layers": sorted(a.layers) == sorted(b.layers), "old_changed": False, "new_diff": 0.0}
    for i in a.layers:  # keys by index in the shard: a sliding window's layer may have dropped old ones in either
        (x, x_first), (y, y_first) = ((kv.stored(), kv.first) for kv in (a.layers[i], b.layers[i]))
        old_first, old = before[i]
        end = x_first + x.k.shape[2]
        out["layers"] &= end == y_first + y.k.shape[2]
        start = max(x_first, y_first, old_first)
        old_end = old_first + old.shape[2]
        for held, first in ((x, x_first), (y, y_first)):  # the keys before the step: untouched
            out["old_changed"] |= not torch.equal(held.k[:, :, start - first : old_end - first],
                                                  old[:, :, start - old_first :])
        for p, q in ((x.k, y.k), (x.v, y.v)):  # the step's kept keys: as plain decode computed them
            if end > old_end:
                new = (p[:, :, old_end - x_first :].float() - q[:, :, old_end - y_first :].float()).abs().max().item()
                out["new_diff"] = max(out["new_diff"], new)
    return out


def drafted_and_plain(model_dir: str, draft_dir: str, case: dict, prompts: list[list[int]], new_tokens: int) -> dict:
    """Each prompt decoded plainly and with a draft model's guesses (3 a step), greedy; sampled with 3
    guesses a step together, and with 1 alone."""
    lcm = LongContextModel.from_pretrained(model_dir, draft_model=draft_dir, **case)
    lcm.model.generation_config.eos_token_id = None

    def run(batch, speculate, sampling=Sampling()):
        done = lcm.engine.run([Request(list(p), new_tokens, sampling, speculate=speculate) for p in batch])
        return [t for t, _, _ in done.values()], [timings.get("speculation") for _, _, timings in done.values()]

    drafted, stats = run(prompts, "draft:3")
    sampled_drafted, sampled_stats = run(prompts, "draft:3", SAMPLED)
    return dict(plain=run(prompts, "off")[0], drafted=drafted, stats=stats,
                alone=[run([p], "draft:3")[0][0] for p in prompts], sampled_drafted=sampled_drafted,
                sampled_stats=sampled_stats, sampled_one_guess_alone=[run([p], "draft:1", SAMPLED)[0][0] for p in prompts],
                draft_on_this_rank=lcm.draft_model is not None)


def questions_guessed(model_dir: str, case: dict, document: list[int], questions: list[list[int]], new_tokens: int) -> dict:
    """Questions after one document, asked together (rows reading the document's keys once) with
    guesses and without, and one by one with guesses."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    lcm.model.generation_config.eos_token_id = None
    session = lcm.prefill_document(document)
    plain = session.ask_many(questions, new_tokens, speculate="off")
    guessed = session.ask_many(questions, new_tokens, speculate="ngram:3")
    return dict(plain=[r.token_ids for r in plain], guessed=[r.token_ids for r in guessed],
                alone=[session.ask(q, new_tokens, speculate="ngram:3").token_ids for q in questions],
                drafted=sum(r.timings["speculation"]["drafted"] for r in guessed),
                accepted=sum(r.timings["speculation"]["accepted"] for r in guessed))
