"""Elastic placement bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

from toolkit import LongContextModel
from toolkit.distributed.topology import groups_made
from toolkit.engine.decode import Sampling
from toolkit.engine.engine import Engine
from toolkit.engine.request import Request
from toolkit.engine.settings import EngineSettings


def by_length(short: int, medium: int):
    """A placement policy for tests: prompts under `short` tokens on one SP rank, under `medium` on
    two, longer ones on all."""
    return lambda prompt, new, loaded: 1 if prompt < short else 2 if prompt < medium else 1 << 30


def placed_runs(model_dir: str, case: dict, prompts: list[list[int]], new_tokens: int, policy: tuple | None,
                settings: dict) -> dict:
    """Every prompt through one engine together (elastic when `policy` is given: by_length's
    arguments), plainly and with guesses -> tokens, rank 0's logits, where each ran."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    lcm.model.generation_config.eos_token_id = None
    groups = groups_made()
    engine = Engine(lcm.model, lcm.stage, lcm.topo, lcm.new_state, lcm._reserve, lcm.chunk_size, set(),
                    EngineSettings(**settings), by_length(*policy) if policy else None)
    made = groups_made() - groups
    out = {"groups_at_start": made}
    for speculate in ("off", "ngram:3"):
        requests = [Request(list(p), new_tokens, Sampling(), keep_logits=True, speculate=speculate) for p in prompts]
        done = engine.run(requests)
        out[speculate] = [t for t, _, _ in done.values()]
        out[speculate + "_logits"] = [r.logits for r in requests] if lcm.topo.is_main else None
        out[speculate + "_placed"] = [timings.get("sp_ranks") for _, _, timings in done.values()]
    out["preemptions"] = engine.scheduler.preemptions if lcm.topo.is_main else None
    out["groups_after"] = groups_made() - groups - made
    out["states_left"] = len(engine.states)
    return out


def prefix_on_another_rank(model_dir: str, case: dict, filler: list[int], prompt: list[int], more: list[int],
                           much_more: list[int], new_tokens: int) -> dict:
    """A filler takes rank 0; `prompt` (shared once prefilled) goes to the next rank; a later request
    reading it by reference runs there too -> its tokens and rank 0's view of the prefix. A request
    of prompt + much_more, too big for one rank's pool, computes its whole prompt on every rank."""
    lcm = LongContextModel.from_pretrained(model_dir, **case)
    lcm.model.generation_config.eos_token_id = None
    engine = Engine(lcm.model, lcm.stage, lcm.topo, lcm.new_state, lcm._reserve, lcm.chunk_size, set(),
                    EngineSettings(kv_blocks=64, block_tokens=16), lambda prompt_, new, loaded: 1)
    shared = {}
    engine.on_shared = lambda rid, pid: shared.setdefault(rid, pid)
    first = engine.run([Request(list(filler), new_tokens, Sampling()),
                        Request(list(prompt), new_tokens, Sampling(), share_prompt=True)])
    pid = shared[1]
    reader = Request(list(prompt) + list(more), new_tokens, Sampling(), prefix=pid, shared=len(prompt))
    done = engine.run([reader])
    (tokens, _, timings), = done.values()
    big = Request(list(prompt) + list(much_more), new_tokens, Sampling(), prefix=pid, shared=len(prompt))
    (big_tokens, _, big_timings), = engine.run([big]).values()
    return {"tokens": tokens, "first": [t for t, _, _ in first.values()], "ranks": timings["sp_ranks"],
            "big": big_tokens, "big_ranks": big_timings["sp_ranks"], "big_shared": big.shared,
            "prompt_ranks": [t["sp_ranks"] for _, _, t in first.values()], "holds_keys": engine.prefixes.values() != [],
            "states_left": len(engine.states)}
