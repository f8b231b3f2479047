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
    return lambda prompt, new: 1 if prompt < short else 2 if prompt < medium else 1 << 30


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
    out["groups_after"] = groups_made() - groups - made
    out["states_left"] = len(engine.states)
    return out
