"""Elastic sequence parallelism (toolkit.engine.placing) on the demo model, ratios in one run:

Each chats figure is the median of interleaved rounds (3; 2 for four ranks).
- elastic_chats16_ring2_vs_ideal: 16 short chats (about 100 prompt tokens, 64 new each) through
  one generate(list) on 2 ranks at ring=2 with elastic placement, over the ideal for short
  requests: two independent one-rank processes, 8 chats each, started together (the slower's time);
- elastic_off_chats16_ring2_vs_ideal: the same without elastic placement (every chat on both
  ranks): what elastic placement saves (reported);
- elastic_chats32_4ranks_vs_ideal: 32 chats on 4 ranks over four independent one-rank
  processes, 8 each (ring=4: the demo model's 9 heads admit no Ulysses degree of 2; the
  ulysses=2 x ring=2 blocks are exercised by tests/test_elastic.py);
- elastic_long_alone_vs_off: one long prompt alone (8K tokens in the full run) on the ring=2
  ranks, elastic over off (it must still span both ranks);
- elastic_degree_vs_fastest: for prompts of 512, 2K and 8K tokens, the time at the degree elastic
  placement chose over the time at the fastest degree measured (1 or 2 ranks), the worst of the lengths;
- elastic_plan_trace_vs_fixed (and _loaded): on paper (toolkit.planner.elastic), a trace of 200
  prompts with a median of 64K tokens and a tail to 1M (256 new each), Llama-3.1-8B on 8 H100s
  at ulysses=8: predicted requests/s with elastic placement over every request on all 8, with the
  rule for requests arriving to an idle server (fewest ranks within 5% of the fastest) and for a
  loaded one (cheapest in rank-seconds within 2x of the fastest). Reported, with the model's assumptions.
Every chat's tokens are held equal to its single-process answer (greedy), or the figure is not reported.
"""
from __future__ import annotations

from .batching import CHAT_NEW, _long_prompt, chat_prompts

LONG_NEW = 16


def _load(folder: str, layout: dict, elastic: bool, min_sp_tokens: int | None = None):
    from toolkit import LongContextModel
    from toolkit.engine.settings import EngineSettings

    lcm = LongContextModel.from_pretrained(folder, preflight=False, speculate="off", **layout)
    lcm.model.generation_config.eos_token_id = None  # every answer CHAT_NEW tokens: equal work every way
    lcm.engine_settings = EngineSettings(elastic=elastic, min_sp_tokens=min_sp_tokens)
    return lcm


def chats(folder: str, layout: dict, elastic: bool, count: int, threads: int) -> dict:
    """Every rank: `count` chats through one generate(list) -> seconds, tokens, each chat's SP ranks."""
    import torch

    torch.set_num_threads(threads)
    lcm = _load(folder, layout, elastic)
    seconds, results = _timed_chats(lcm, 0, count)
    return {"seconds": seconds, "tokens": [r.token_ids for r in results],
            "sp_ranks": [r.timings.get("sp_ranks") for r in results]}


def _timed_chats(lcm, first: int, count: int, start=lambda: None) -> tuple[float, list]:
    """Chats first .. first+count-1 through one generate(list) after a warm-up; start() just before
    the clock starts -> (seconds, results)."""
    import time

    prompts = (chat_prompts(lcm.tokenizer) * 2)[first : first + count]
    lcm.generate(prompts[:4], 4)  # warm-up
    start()
    t0 = time.perf_counter()
    results = lcm.generate(prompts, CHAT_NEW)
    return time.perf_counter() - t0, results


def _alone(folder: str, first: int, count: int, threads: int, barrier, out) -> None:
    """One independent process (world 1): chats first .. first+count-1, timed from a common start."""
    import torch

    torch.set_num_threads(threads)
    seconds, results = _timed_chats(_load(folder, {}, False), first, count, barrier.wait)
    out.put((first, seconds, [r.token_ids for r in results]))


def ideal(folder: str, processes: int, each: int, threads: int) -> dict:
    """`processes` independent one-rank processes, `each` chats apiece, started together."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_alone, args=(folder, i * each, each, threads, barrier, out), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(60)
    return {"seconds": max(s for _, s, _ in got), "tokens": [t for _, _, ts in got for t in ts]}


MODES = {"chosen": (True, None), "one": (True, 1 << 30), "off": (False, None)}  # elastic, min_sp_tokens


def long_prompt(folder: str, tokens: int, repeats: int, threads: int) -> dict:
    """Every rank (ring=2): one prompt of `tokens` tokens alone, at the degree elastic placement
    chooses, on one rank, and on both (elastic off), interleaved `repeats` times -> seconds per mode,
    each mode's tokens, the chosen SP ranks."""
    import time

    import torch

    from toolkit.engine.settings import EngineSettings

    torch.set_num_threads(threads)
    lcm = _load(folder, {"ring": 2}, False)
    ids = _long_prompt(lcm.tokenizer, tokens)
    out = {"seconds": {mode: [] for mode in MODES}, "tokens": {}, "sp_ranks": None}
    for _ in range(repeats):
        for mode, (elastic_, floor) in MODES.items():
            lcm.engine_settings = EngineSettings(elastic=elastic_, min_sp_tokens=floor)
            lcm.generate(ids[:64], 2)  # warm-up (a new engine)
            t0 = time.perf_counter()
            result = lcm.generate(ids, LONG_NEW)
            out["seconds"][mode].append(time.perf_counter() - t0)
            out["tokens"][mode] = result.token_ids
            if mode == "chosen":
                out["sp_ranks"] = result.timings.get("sp_ranks")
    return out


def _rounds(named: dict, repeats: int) -> dict:
    """Each named run (a function -> {"seconds", "tokens", ...}) once a round, the runs interleaved,
    `repeats` rounds -> name -> {"seconds": [...], "tokens": the first round's, "same": every round's alike}."""
    out: dict = {}
    for _ in range(repeats):
        for name, run in named.items():
            got = run()
            kept = out.setdefault(name, dict(got, seconds=[], same=True))
            kept["seconds"].append(got["seconds"])
            kept["same"] &= got["tokens"] == kept["tokens"]
    return out


def _versus_ideal(name: str, got: dict, metrics: dict, runs: list, off: bool = False) -> None:
    from .measure import median

    ideal_s, on_s = median(got["ideal"]["seconds"]), median(got["elastic"]["seconds"])
    same = all(g["same"] for g in got.values()) and len({str(g["tokens"]) for g in got.values()}) == 1
    if same:
        metrics[f"elastic_{name}_vs_ideal"] = on_s / ideal_s
        if off:
            metrics[f"elastic_off_{name}_vs_ideal"] = median(got["off"]["seconds"]) / ideal_s
    runs.append(dict(bench="elastic", figure=name, same_tokens=same, sp_ranks=got["elastic"]["sp_ranks"],
                     model="SmolLM2-135M-Instruct", **{f"{k}_s": g["seconds"] for k, g in got.items()}))


def elastic(ranks, folder: str, threads: int, lengths: list[int], long_tokens: int,
            repeats: int = 3) -> tuple[dict, list]:
    from .rank_group import RankGroup

    each = max(1, threads // 2)
    metrics, runs = {}, []
    two = _rounds({"ideal": lambda: ideal(folder, 2, 8, each),
                   "elastic": lambda: ranks.run(chats, folder, {"ring": 2}, True, 16, each, timeout=3600)[0],
                   "off": lambda: ranks.run(chats, folder, {"ring": 2}, False, 16, each, timeout=3600)[0]}, repeats)
    _versus_ideal("chats16_ring2", two, metrics, runs, off=True)
    with RankGroup(4, threads=1) as four:
        got = _rounds({"ideal": lambda: ideal(folder, 4, 8, 1),
                       "elastic": lambda: four.run(chats, folder, {"ring": 4}, True, 32, 1, timeout=3600)[0]},
                      max(2, repeats - 1))
    _versus_ideal("chats32_4ranks", got, metrics, runs)
    from .measure import median

    worst = 0.0
    for tokens in sorted(set(lengths) | {long_tokens}):
        got = ranks.run(long_prompt, folder, tokens, 3, each, timeout=3600)[0]
        same = len({tuple(t) for t in got["tokens"].values()}) == 1
        took = {mode: median(seconds) for mode, seconds in got["seconds"].items()}
        if same and tokens in lengths:
            worst = max(worst, took["chosen"] / min(took["one"], took["off"]))
        if same and tokens == long_tokens and len(got["sp_ranks"]) == 2:  # it must still span both
            metrics["elastic_long_alone_vs_off"] = took["chosen"] / took["off"]
        runs.append(dict(bench="elastic", figure="degree", prompt_tokens=tokens, same_tokens=same,
                         chosen_degree=len(got["sp_ranks"]), seconds=got["seconds"], model="SmolLM2-135M-Instruct"))
    if worst:
        metrics["elastic_degree_vs_fastest"] = worst
    metrics.update(on_paper(runs))
    return metrics, runs


def on_paper(runs: list) -> dict:
    from toolkit.planner import load_hardware, load_model_dims
    from toolkit.planner.elastic import trace_lengths, trace_throughput

    lengths, out = trace_lengths(65536, 1 << 20), {}
    for loaded, name in ((False, "elastic_plan_trace_vs_fixed"), (True, "elastic_plan_trace_loaded")):
        got = trace_throughput(load_model_dims("llama-3.1-8b"), load_hardware("h100-80gb"), 1, 8, 1, lengths, 256,
                               None, "bfloat16", loaded=loaded)
        out[name] = got["elastic_over_fixed"]
        runs.append(dict(got, bench="elastic", figure="plan_trace", loaded=loaded, model="Llama-3.1-8B (on paper)",
                         degrees={str(k): v for k, v in got["degrees"].items()}))
    return out
