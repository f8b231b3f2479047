"""Decode speed: world 1 against transformers, against the memory bound, TP and ring on 2
ranks, and many questions in one batch.

The cache is filled with the same seeded random K/V on both sides instead of a prefill (speed
does not depend on what the cache holds, and a 16K-token prefill would cost minutes): our
sharded cache takes each rank's heads and positions of it, transformers' DynamicCache all of
it. Both then decode greedily from one token, so the tokens must be equal too.

- world1_decode_speed_vs_hf_{4k,16k}: our decode tokens/s over transformers' cached forward
  loop (`model(token, past_key_values=cache)`, sdpa; not `generate`, whose overhead would
  flatter us), same model, threads and cache, interleaved repeats;
- decode_bytes_per_token_vs_bound: bytes a step must read (weights + the cache) per second of
  our step, over the memory bandwidth of a large copy measured in the same run;
- decode_outside_ops_share: a step's time outside the operators (torch.profiler: wall time
  less the union of the aten ops' intervals), at 4K;
- planner_decode_vs_measured: our measured ms/token over the planner's formula fed this
  machine's measured bandwidth and matmul rate (toolkit.planner.cost.estimate);
- tp2_decode_speedup, ring2_decode_overhead: world 1 with 2 threads against 2 ranks of 1
  thread, with the planner's figure for tp2 and the ring's collectives per token per layer;
- batch8_vs_sequential: 8 questions after one document in one batch over 8 asks in turn.
"""
from __future__ import annotations

import time

from .measure import copy_bandwidth, interleave, matmul_rate, median, paired_ratio

FIRST_TOKEN = 42


def kv_layers(config, n: int, seed: int):
    """Per layer, the same random (k, v) [1, G, n, d] fp32 in every process."""
    import torch

    from toolkit.models import head_dim as model_head_dim

    g = torch.Generator().manual_seed(seed)
    heads = config.num_key_value_heads
    d = model_head_dim(config)
    for _ in range(config.num_hidden_layers):
        yield torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)


def fill_ours(lcm, n: int, seed: int, room: int):
    """A decode state whose cache holds the random K/V: this rank's TP/Ulysses heads, an even
    share of the positions per ring rank (which shard holds a key does not change attention)."""
    import torch

    from toolkit.sessions.placement import even_range, kv_head_ids

    topo, config = lcm.topo, lcm.config
    dims, c = topo.dims, topo.coords
    state = lcm.new_state(-(-n // dims.ring) + room)
    heads = kv_head_ids(config.num_key_value_heads, dims.tp, c["tp"], dims.ulysses, c["ulysses"])
    a, b = even_range(n, dims.ring, c["ring"])
    dtype = lcm.model.dtype
    for layer, (k, v) in enumerate(kv_layers(config, n, seed)):
        state.cache.append(layer, k[:, heads, a:b].to(topo.device, dtype), v[:, heads, a:b].to(topo.device, dtype))
    state.cache.set_positions([torch.arange(*even_range(n, dims.ring, r)) for r in range(dims.ring)])
    return state


def our_decode(lcm, state, mark, n: int, steps: int) -> tuple[float, list[int]]:
    """`steps` greedy tokens from FIRST_TOKEN at position n through the decode step of a request
    decoding alone (toolkit.engine.decode.decoder, in lcm.decode_mode), the argmax of each."""
    from toolkit.engine.decode import decoder

    state.cache.rollback(mark)
    t0 = time.perf_counter()
    step = decoder(lcm.model, state, lcm.stage, lcm.decode_mode, steps)
    tokens = [FIRST_TOKEN]
    for i in range(steps - 1):
        tokens.append(int(step(tokens[-1], n + i).argmax()))
    return time.perf_counter() - t0, tokens


def hf_cache(model, n: int, seed: int):
    """transformers' DynamicCache holding the random K/V of kv_layers."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv_layers(model.config, n, seed)):
        cache.update(k.to(model.device, model.dtype), v.to(model.device, model.dtype), layer)
    return cache


def hf_decode(model, cache, n: int, steps: int) -> tuple[float, list[int]]:
    """transformers' cached forward loop: the same greedy tokens from the same cache."""
    import torch

    cache.crop(-(cache.get_seq_length() - n))  # back to the n filled positions (a negative count removes)
    token, tokens = torch.tensor([[FIRST_TOKEN]], device=model.device), [FIRST_TOKEN]
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps - 1):
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)  # [1, 1]
            tokens.append(int(token))
    return time.perf_counter() - t0, tokens


def step_bytes(model, config, n: int) -> float:
    """What one step must read: every weight but the embedding (one row of it), and the cache."""
    from toolkit.models import head_dim as model_head_dim

    d = model_head_dim(config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    weights += head.numel() * head.element_size() if head is embed else 0  # a tied head reads the matrix
    return weights + 2 * config.num_hidden_layers * config.num_key_value_heads * d * n * 4


def outside_ops_share(run, repeats: int = 3) -> float:
    """The share of run()'s wall time spent outside operators: 1 - (union of the aten ops'
    intervals, from torch.profiler) / (wall time of the same run without the profiler, whose
    own bookkeeping would otherwise count as time outside the operators); medians of
    alternating plain and profiled runs."""
    walls, insides = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
        insides.append(_time_in_ops(run))
    return 1.0 - median(insides) / median(walls)


def _time_in_ops(run) -> float:
    """Seconds of run() inside aten operators (the union of their intervals: nested ops count once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.name.startswith("aten::"))
    inside, start, end = 0.0, None, None
    for a, b in spans:  # microseconds
        if end is not None and a <= end:
            end = max(end, b)
            continue
        if end is not None:
            inside += end - start
        start, end = a, b
    if end is not None:
        inside += end - start
    return inside * 1e-6


def planner_ms(config, hw, n: int, steps: int, **degrees) -> float:
    from toolkit.planner import load_model_dims
    from toolkit.planner.cost import RunSpec, estimate

    spec = RunSpec(context=n, new_tokens=steps, dtype="float32")
    layout = {**dict(tp=1, ulysses=1, ring=1, pp=1), **degrees}
    return estimate(load_model_dims(config.to_dict()), hw, spec=spec, **layout).decode_ms_per_token


def this_host(bandwidth: float, rate: float):
    """The planner's CPU entry with this machine's measured rates (one device = these threads)."""
    import dataclasses

    from toolkit.planner import load_hardware

    return dataclasses.replace(load_hardware("cpu"), hbm_gbps=bandwidth / 1e9, fp32_tflops=rate / 1e12)


def world1(model_dir: str, lengths: list[int], steps: int, repeats: int, threads: int, label: str,
           profile_at: int = 4096) -> tuple[dict, list]:
    """Ours against transformers' cached loop at each length, one process, `threads` threads."""
    import torch

    from toolkit.api import parallelize

    from .models import load

    torch.set_num_threads(threads)
    hf_model = load(model_dir, "sdpa")
    lcm = parallelize(load(model_dir, "sdpa"), ulysses=1, ring=1)
    config = hf_model.config
    bandwidth, rate = copy_bandwidth("cpu", 1024), matmul_rate(torch.float32)
    host = this_host(bandwidth, rate)
    rows, metrics = [], {}
    for n in lengths:
        state = fill_ours(lcm, n, seed=n, room=steps)
        mark = state.cache.mark()
        cache = hf_cache(hf_model, n, seed=n)
        got = {}

        def ours():
            seconds, got["ours"] = our_decode(lcm, state, mark, n, steps)
            return seconds

        def hf():
            seconds, got["hf"] = hf_decode(hf_model, cache, n, steps)
            return seconds

        seconds = interleave({"hf": hf, "ours": ours}, repeats)
        if got["hf"] != got["ours"]:
            raise AssertionError(f"{n} tokens: our greedy tokens {got['ours']} differ from transformers' {got['hf']}")
        per_step = median(seconds["ours"]) / (steps - 1)
        row = {"tokens": n, "steps": steps - 1, "seconds": seconds, "speed_vs_hf": paired_ratio(seconds["hf"],
               seconds["ours"]), "tokens_per_s": {k: (steps - 1) / median(v) for k, v in seconds.items()},
               "ms_per_token": per_step * 1e3, "bytes_per_step": step_bytes(hf_model, config, n + steps // 2),
               "planner_ms_per_token": planner_ms(config, host, n, steps)}
        row["bytes_vs_bound"] = row["bytes_per_step"] / per_step / bandwidth
        row["planner_vs_measured"] = row["ms_per_token"] / row["planner_ms_per_token"]
        if n == profile_at:
            row["outside_ops_share"] = outside_ops_share(lambda: our_decode(lcm, state, mark, n, steps))
            metrics["decode_outside_ops_share"] = row["outside_ops_share"]
            metrics["decode_bytes_per_token_vs_bound"] = row["bytes_vs_bound"]
            metrics["planner_decode_vs_measured"] = row["planner_vs_measured"]
        if n in (4096, 16384):
            metrics[f"world1_decode_speed_vs_hf_{n // 1024}k"] = row["speed_vs_hf"]
        rows.append(row)
    run = {"bench": "decode_world1", "model": label, "threads": threads, "copy_bandwidth_gbps": bandwidth / 1e9,
           "matmul_fp32_flops_per_s": rate, "rows": rows,
           "baseline": "transformers cached forward loop (DynamicCache, sdpa), same process, interleaved"}
    return metrics, [run]


def on_rank(folder: str, layout: dict, n: int, steps: int, repeats: int) -> dict:
    """One layout's decode on the pool's ranks: seconds per repeat, tokens, collectives per layer."""
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(folder, preflight=False, **layout)
    state = fill_ours(lcm, n, seed=n, room=steps)
    mark = state.cache.mark()
    our_decode(lcm, state, mark, n, steps)  # warm-up
    counter = lcm.topo.comm.counter
    counter.reset()
    seconds, tokens = [], None
    for _ in range(repeats):
        took, tokens = our_decode(lcm, state, mark, n, steps)
        seconds.append(took)
    calls = {tag: sum(c for (t, _), c in counter.calls.items() if t == tag) for tag, _ in counter.calls}
    return {"seconds": seconds, "tokens": tokens, "calls": calls, "layers": lcm.config.num_hidden_layers}


def layouts(ranks, model_dir: str, n: int, steps: int, repeats: int, threads: int, label: str) -> tuple[dict, list]:
    """tp=2 and ring=2 (1 thread per rank) against world 1 (2 threads), the same model and cache."""
    import torch

    from toolkit.api import parallelize

    from .models import load

    torch.set_num_threads(threads)
    lcm = parallelize(load(model_dir, "sdpa"), ulysses=1, ring=1)
    state = fill_ours(lcm, n, seed=n, room=steps)
    mark = state.cache.mark()
    our_decode(lcm, state, mark, n, steps)  # warm-up
    world1_s, tokens = [], None
    for _ in range(repeats):
        took, tokens = our_decode(lcm, state, mark, n, steps)
        world1_s.append(took)
    del state
    host = this_host(copy_bandwidth("cpu", 1024), matmul_rate(torch.float32))
    torch.set_num_threads(1)
    core = this_host(copy_bandwidth("cpu", 1024), matmul_rate(torch.float32))
    torch.set_num_threads(threads)
    got = {name: ranks.run(on_rank, model_dir, layout, n, steps, repeats, timeout=1800)
           for name, layout in (("tp2", dict(tp=2)), ("ring2", dict(ring=2)))}
    for name, per_rank in got.items():
        for rank, result in enumerate(per_rank):
            if result["tokens"] != tokens:
                raise AssertionError(f"{name} rank {rank}: greedy tokens {result['tokens']} differ from world 1's {tokens}")
    config = lcm.config
    tp2_s = [max(r["seconds"][i] for r in got["tp2"]) for i in range(repeats)]
    ring2_s = [max(r["seconds"][i] for r in got["ring2"]) for i in range(repeats)]
    ring_calls = got["ring2"][0]["calls"].get("ring_decode", 0) / (config.num_hidden_layers * (steps - 1) * repeats)
    world1_ms = planner_ms(config, host, n, steps)
    metrics = {"tp2_decode_speedup": median(world1_s) / median(tp2_s),
               "tp2_decode_speedup_planner": world1_ms / planner_ms(config, core, n, steps, tp=2),
               "ring2_decode_overhead": median(ring2_s) / median(world1_s),
               "ring2_decode_overhead_planner": planner_ms(config, core, n, steps, ring=2) / world1_ms,
               "ring2_decode_collectives_per_layer": ring_calls}
    run = {"bench": "decode_layouts", "model": label, "tokens": n, "steps": steps - 1, "world1_s": world1_s,
           "tp2_s": tp2_s, "ring2_s": ring2_s, "calls": {k: v[0]["calls"] for k, v in got.items()},
           "closed_form": "ring decode: one all-gather of (out, lse) per layer per token", **metrics}
    return metrics, [run]


def batched(model_dir: str, doc_tokens: int, questions: int, new_tokens: int, repeats: int, threads: int,
            label: str) -> tuple[dict, list]:
    """`questions` questions after one document: ask_many (one batch) over asking them in turn."""
    import torch

    from toolkit import LongContextModel

    from .sessions import _document

    torch.set_num_threads(threads)
    lcm = LongContextModel.from_pretrained(model_dir, ulysses=1, ring=1, preflight=False, speculate="off")
    lcm.model.generation_config.eos_token_id = None  # every answer runs to new_tokens: the same work both ways
    session = lcm.prefill_document(_document(lcm.tokenizer, doc_tokens))
    asked = [f"Question {i + 1}: what happened on day {3 * i + 2} of the log, and who reported it?"
             for i in range(questions)]
    got = {}

    def one_by_one():
        t0 = time.perf_counter()
        got["alone"] = [session.ask(q, new_tokens).token_ids for q in asked]
        return time.perf_counter() - t0

    def together():
        t0 = time.perf_counter()
        got["together"] = [r.token_ids for r in session.ask_many(asked, new_tokens)]
        return time.perf_counter() - t0

    seconds = interleave({"sequential": one_by_one, "batch": together}, repeats, warmup=0)
    if got["alone"] != got["together"]:
        raise AssertionError("the batched answers differ from the separate asks")
    ratio = paired_ratio(seconds["batch"], seconds["sequential"])
    run = {"bench": "decode_batch", "model": label, "document_tokens": session.tokens, "questions": questions,
           "new_tokens": new_tokens, "threads": threads, "seconds": seconds, "batch_vs_sequential": ratio}
    return {f"batch{questions}_vs_sequential": ratio}, [run]


def suite(ranks, demo: str, bench_model: str, size: dict, threads: int) -> tuple[dict, list]:
    """The decode benchmark of `lctk bench`: world 1, the 2-rank layouts, the batch."""
    metrics, runs = world1(demo, size["lengths"], size["steps"], size["repeats"], threads, "SmolLM2-135M-Instruct")
    for got in (layouts(ranks, bench_model, size["layout_tokens"], size["steps"], size["repeats"], threads,
                        "decode-bench (random weights)"),
                batched(demo, size["doc_tokens"], size["questions"], size["new_tokens"], size["batch_repeats"],
                        threads, "SmolLM2-135M-Instruct")):
        metrics.update(got[0])
        runs += got[1]
    return metrics, runs
