"""The continuous-batching engine on the demo model (toolkit.engine.engine), ratios in one run:

- chats16_vs_sequential: 16 short chats (about 100 prompt tokens, 64 new each) through one
  generate(list) call, over the same 16 one generate after another, world 1 (two rounds, the
  second in the other order, each way's times summed);
- chats16_ring2_vs_sequential: the same on 2 ranks at ring=2;
- short_ttft_vs_long_prefill: a chat arriving while an ~8K-token prompt prefills (a server's
  settings: prompts go in budget-sized steps), its time to first token over the long prompt's
  prefill alone;
- itl_p99_during_prefill_vs_idle: the running chats' p99 time between tokens while the long
  prompt prefills (the engine keeping --max-itl-ms at 3x their idle p50) over that idle p50;
- long_in_mix_vs_alone: the long request's own time in that mix over its time alone;
- summarize_map_batched_vs_one: the map step of a summary whose document needs 8 sections, its
  sections run as one batch, over the same sections one at a time (the same engine, at most one
  running), world 1;
- generate_decode_vs_hf: decode tokens/s of the user's call, generate() after a real 4K-token
  prefill (40 new tokens), over transformers' cached forward loop after the same prefill
  (sdpa, DynamicCache), world 1, interleaved repeats.
Every request's tokens are held equal to its run alone (greedy), or the figure is not reported.
"""
from __future__ import annotations

TOPICS = ["tides", "volcanoes", "bread", "glaciers", "bees", "comets", "coral reefs", "the printing press",
          "rainbows", "owls", "deserts", "submarines", "lighthouses", "maple syrup", "thunderstorms", "chess"]
CHAT_NEW = 64


def chat_prompts(tokenizer, n: int = 16) -> list[list[int]]:
    """n chat prompts of about 100 tokens, each about its own topic."""
    prompts = []
    for topic in TOPICS[:n]:
        text = (f"I am preparing a short talk for a class of curious twelve-year-olds about {topic}. "
                "Please explain in plain words what it is, how it works, one surprising fact about it, "
                "and one question the students could explore on their own afterwards. Keep it friendly, "
                "concrete and under two hundred words, and avoid jargon unless you explain it.")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        prompts.append(list(ids))
    return prompts


def _load(folder: str, **layout):
    from toolkit import LongContextModel

    # one token a step: these figures are the batching's (benchmarks/speculation.py measures guessing)
    lcm = LongContextModel.from_pretrained(folder, preflight=False, speculate="off", **layout)
    lcm.model.generation_config.eos_token_id = None  # every answer CHAT_NEW tokens: equal work both ways
    return lcm


def chats_on_rank(folder: str, layout: dict, threads: int) -> dict:
    import time

    import torch

    torch.set_num_threads(threads)
    lcm = _load(folder, **layout)
    prompts = chat_prompts(lcm.tokenizer)
    lcm.generate(prompts[:2], 4)  # warm-up
    times = {"sequential": [], "batched": []}

    def sequential():
        t0 = time.perf_counter()
        tokens = [lcm.generate(p, CHAT_NEW).token_ids for p in prompts]
        times["sequential"].append(time.perf_counter() - t0)
        return tokens

    def batched():
        t0 = time.perf_counter()
        tokens = [r.token_ids for r in lcm.generate(prompts, CHAT_NEW)]
        times["batched"].append(time.perf_counter() - t0)
        return tokens

    # two rounds, the order swapped: a slow spell of this noisy machine weighs on both ways alike
    alone, together = sequential(), batched()
    same = together == alone and batched() == alone and sequential() == alone
    return {"sequential_s": sum(times["sequential"]), "batched_s": sum(times["batched"]), "same_tokens": same,
            "rounds_s": times, "prompt_tokens": [len(p) for p in prompts]}


def _long_prompt(tokenizer, tokens: int) -> list[int]:
    from toolkit.summarize.synthetic import station_logbook

    ids = tokenizer(station_logbook(days=200)).input_ids
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def long_and_chats(folder: str, threads: int, long_tokens: int, long_new: int = 16) -> dict:
    """The long prompt alone; then 4 chats decoding when it arrives and a fifth arriving two steps later."""
    from dataclasses import replace

    import torch

    from toolkit.engine.settings import EngineSettings
    from toolkit.engine.request import Request

    torch.set_num_threads(threads)
    lcm = _load(folder)
    chats, long_ids = chat_prompts(lcm.tokenizer, 5), _long_prompt(lcm.tokenizer, long_tokens)
    lcm.generate(chats[:2], 4)  # warm-up
    alone = lcm.generate(long_ids, long_new)  # the run's own chunk: as fast as it goes by itself
    long_alone_s, prefill_alone_s = alone.timings["total_s"], alone.timings["ttft_s"]
    chats_alone = [lcm.generate(c, CHAT_NEW).token_ids for c in chats]

    idle = EngineSettings(max_batch_tokens=512, prefill_chunk=512)
    lcm.engine_settings = idle
    engine = lcm.engine
    running = [Request(c, CHAT_NEW) for c in chats[:4]]
    for r in running:
        engine.add(r)
    while any(len(r.output) < 8 for r in running):
        engine.step()
    idle_gaps = [b - a for r in running for a, b in zip(r.token_times[4:], r.token_times[5:])]
    idle_p50 = sorted(idle_gaps)[len(idle_gaps) // 2]
    engine.settings = replace(engine.settings, max_itl_ms=3000 * idle_p50)  # the goal, from here on
    long_request = Request(long_ids, long_new)
    engine.add(long_request)
    engine.step()
    engine.step()
    late = Request(chats[4], CHAT_NEW)
    engine.add(late)
    while engine.busy:
        engine.step()
    engine.take_finished()
    first_long = long_request.token_times[0]
    during = [b - a for r in running for a, b in zip(r.token_times, r.token_times[1:])
              if long_request.arrived <= a and b <= first_long]
    during.sort()
    p99 = during[min(len(during) - 1, int(0.99 * len(during)))] if during else float("nan")
    same = ([r.output for r in running + [late]] == chats_alone and long_request.output == alone.token_ids)
    return {"long_tokens": len(long_ids), "prefill_alone_s": prefill_alone_s, "long_alone_s": long_alone_s,
            "long_in_mix_s": long_request.token_times[-1] - long_request.arrived,
            "late_ttft_s": late.token_times[0] - late.arrived, "idle_itl_p50_s": idle_p50, "itl_p99_during_s": p99,
            "gaps_during": len(during), "same_tokens": same, "steps": engine.steps}


def generate_vs_hf(folder: str, threads: int, tokens: int = 4096, new: int = 40, repeats: int = 2) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    lcm = _load(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = _long_prompt(lcm.tokenizer, tokens)
    ours, theirs, same = [], [], True
    for _ in range(repeats):
        result = lcm.generate(ids, new)
        ours.append((len(result.token_ids) - 1) / result.timings["decode_s"])
        with torch.no_grad():
            cache = DynamicCache(config=hf.config)
            token = hf(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            got = [int(token)]
            t0 = time.perf_counter()
            for _ in range(new - 1):
                token = hf(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                got.append(int(token))
            theirs.append((new - 1) / (time.perf_counter() - t0))
        same = same and got == result.token_ids
    return {"ours_tokens_per_s": ours, "hf_tokens_per_s": theirs, "same_tokens": same, "prompt_tokens": len(ids)}


def summarize_map(folder: str, threads: int, sections: int = 8, new: int = 32) -> dict:
    import time
    from dataclasses import replace

    import torch

    from toolkit.summarize.synthetic import station_logbook

    torch.set_num_threads(threads)
    lcm = _load(folder)
    from toolkit.summarize.mapreduce import _SECTION, encode_prompt, with_marker_note
    from toolkit.summarize.sections import split_sections

    context, days = 640, 10
    while True:  # a logbook long enough for `sections` map sections at this context (the map step's own cut)
        text = station_logbook(days=days)
        overhead = len(encode_prompt(lcm.tokenizer, "", with_marker_note(_SECTION, text)))
        found = len(split_sections(lcm.tokenizer, text, context - new - overhead - 8))
        if found >= sections:
            break
        days += 4
    text, times = station_logbook(days=days), {}
    for name, running in (("one", 1), ("batched", 32), ("one", 1), ("batched", 32)):
        lcm.engine_settings = replace(lcm.engine_settings, max_running=running)
        marks = []
        lcm.summarize(text, new, max_context=context,
                      on_progress=lambda p: marks.append(time.perf_counter()) if p.stage == "map" and p.level == 0 else None)
        times.setdefault(name, []).append(marks[-1] - marks[0])
    return {"sections": found, "days": days, "one_s": times["one"], "batched_s": times["batched"]}


def batching(ranks, folder: str, threads: int, long_tokens: int) -> tuple[dict, list]:
    world1 = chats_on_rank(folder, {}, threads)
    ring2 = ranks.run(chats_on_rank, folder, {"ring": 2}, max(1, threads // 2), timeout=3600)[0]
    mix = long_and_chats(folder, threads, long_tokens)
    metrics, runs = {}, []
    for name, got in (("chats16_vs_sequential", world1), ("chats16_ring2_vs_sequential", ring2)):
        if got["same_tokens"]:
            metrics[name] = got["batched_s"] / got["sequential_s"]
        runs.append(dict(got, bench="batching", figure=name, model="SmolLM2-135M-Instruct"))
    if mix["same_tokens"]:
        metrics["short_ttft_vs_long_prefill"] = mix["late_ttft_s"] / mix["prefill_alone_s"]
        metrics["itl_p99_during_prefill_vs_idle"] = mix["itl_p99_during_s"] / mix["idle_itl_p50_s"]
        metrics["long_in_mix_vs_alone"] = mix["long_in_mix_s"] / mix["long_alone_s"]
    runs.append(dict(mix, bench="batching", figure="long_and_chats", model="SmolLM2-135M-Instruct"))
    mapped = summarize_map(folder, threads)
    from .measure import median

    metrics["summarize_map_batched_vs_one"] = median(mapped["batched_s"]) / median(mapped["one_s"])
    runs.append(dict(mapped, bench="batching", figure="summarize_map", model="SmolLM2-135M-Instruct"))
    decode = generate_vs_hf(folder, threads)
    if decode["same_tokens"]:
        metrics["generate_decode_vs_hf"] = median(decode["ours_tokens_per_s"]) / median(decode["hf_tokens_per_s"])
    runs.append(dict(decode, bench="batching", figure="generate_decode_vs_hf", model="SmolLM2-135M-Instruct"))
    return metrics, runs
