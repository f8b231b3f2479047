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
    tokens, reasons, logits, _ = _run(lcm, prompts, new_tokens)
    out.update(together=tokens, together_reasons=reasons, together_logits=logits)
    out["alone_sampled"] = [_run(lcm, [p], new_tokens, SAMPLED)[0][0] for p in prompts]
    out["together_sampled"] = _run(lcm, prompts, new_tokens, SAMPLED)[0]
    out.update(tiny)
    out["generate_list"] = [r.token_ids for r in lcm.generate(prompts, new_tokens)]
    out["states_left"] = len(lcm.engine.states)
    return out
