"""The GPU check's timed steps, on a random-weight Llama-3.1-8B-shaped model in bf16 (world 1):

- `decode`: from an 8K-token random cache, our decode eager, static-shape and captured as a CUDA
  graph, and transformers' cached loop: tokens/s and GB/s; the graph must give the static
  step's tokens (the same kernels, replayed). Eager against static is a fact, not a verdict:
  a random 8B model's logits are near ties, where bf16 kernels of another shape may pick
  another token (the tiny fp32 model of the world1 step holds all three to equal tokens).
- `prefill`: 32K and 128K tokens, ours against transformers sdpa, interleaved on one model:
  tokens/s, MFU against the bf16 matmul rate measured here and against the H100 datasheet,
  peak memory above the weights. A length predicted to run past the step's deadline is
  skipped and says so.
"""
from __future__ import annotations

import gc
import time

import torch

from benchmarks.models import prefill_flops

H100_BF16_PEAK = 989e12  # NVIDIA H100 SXM datasheet, dense BF16 (the H200's is the same)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def llama8b_shaped(device, dtype, small: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    # Llama 3.1 8B: configs/models/llama-3.1-8b.yaml (its published config.json)
    dims = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256)
    if small:
        dims.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, vocab_size=1024)
    config = LlamaConfig(max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _gib(n: float) -> str:
    return "n/a" if n != n else f"{n / 2**30:.1f} GiB"  # nan: no device allocator on CPU


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_rows(rows, device, dtype, n: int, steps: int, small: bool):
    from benchmarks.decode import fill_ours, hf_cache, hf_decode, our_decode, step_bytes
    from toolkit import parallelize

    shape = "small fp32 (dry run)" if small else "8B shape bf16"
    model = llama8b_shaped(device, dtype, small)
    lcm = parallelize(model, ulysses=1, ring=1)
    state = fill_ours(lcm, n, seed=n, room=steps)
    mark = state.cache.mark()
    speeds, tokens = {}, {}
    for mode in ["eager", "static"] + (["cuda-graph"] if device.type == "cuda" else []):
        with rows.guard(f"decode {mode}, {shape}, {n} cached"):
            lcm.decode_mode = mode
            our_decode(lcm, state, mark, n, steps)  # warm-up (and the graph's capture is per generation)
            seconds, tokens[mode] = our_decode(lcm, state, mark, n, steps)
            speeds[f"ours {mode}"] = (steps - 1) / seconds
    with rows.guard(f"decode steps by width, {shape}"):
        width_costs(rows, lcm, state, device, shape)
    del state
    _free(device)
    with rows.guard(f"decode transformers, {shape}"):
        model.set_attn_implementation("sdpa")  # the same weights, transformers' own attention
        cache = hf_cache(model, n, seed=n)
        hf_decode(model, cache, n, steps)
        seconds, tokens["hf"] = hf_decode(model, cache, n, steps)
        speeds["transformers"] = (steps - 1) / seconds
        del cache
    per_step = step_bytes(model, model.config, n + steps // 2)
    for kind, speed in speeds.items():
        rows.add(f"decode {kind}, {shape}, {n} cached", "info",
                 f"{speed:.1f} tokens/s, {per_step * speed / 1e9:.3g} GB/s of weights and cache")
    if "cuda-graph" in tokens and "static" in tokens:
        same = tokens["cuda-graph"] == tokens["static"]
        rows.add(f"decode CUDA graph: the static step's tokens, {shape}", same, f"{steps} tokens equal: {same}")
    elif device.type != "cuda":
        rows.add(f"decode CUDA graph: the static step's tokens, {shape}", "skip", "CPU dry run: no CUDA graph")
    if "eager" in tokens and "static" in tokens:
        agree = sum(a == b for a, b in zip(tokens["eager"], tokens["static"]))
        rows.add(f"decode eager vs static, {shape} (near-tie logits: a fact)", "info", f"{agree}/{steps} tokens agree")
    lcm = model = None  # (the closures above read them; freed here)
    _free(device)


def width_costs(rows, lcm, state, device, shape: str, widths=(1, 2, 5, 9, 17), repeats: int = 5):
    """What a decode step a token and its guesses wide costs over a one-token step: what --speculate
    auto weighs guesses against (on 2 CPU cores 2 to 9 wide cost ~1.8x, 17 ~2.1x)."""
    from toolkit.engine.rows import RowsAttention, rows_step

    seconds = {}
    for width in widths:
        def step():
            rows_step(lcm.model, torch.full((1, width), 5, device=device), [state.cache.total_tokens],
                      RowsAttention([state]))
            state.drop_newest(width)  # the cache as it was: every width reads the same keys
        step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        sync(device)
        seconds[width] = (time.perf_counter() - t0) / repeats
    rows.add(f"decode step k tokens wide over 1 wide, {shape}", "info",
             ", ".join(f"{w}: {seconds[w] / seconds[1]:.2f}x" for w in widths) + f" (1 wide: {seconds[1] * 1e3:.1f} ms)")


def prefill_rows(rows, device, dtype, lengths, bf16_rate: float, left, small: bool):
    """`left()`: seconds the step has left; a length predicted past it is skipped."""
    from toolkit import parallelize
    from toolkit.engine import hf as lctk_hf

    shape = "small fp32 (dry run)" if small else "8B shape bf16"
    model = llama8b_shaped(device, dtype, small)
    lcm = parallelize(model, ulysses=1, ring=1, chunk_size=8192)  # the planner's 8K tokens per rank
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    last = {}

    def one(kind, ids):
        (model.set_attn_implementation("sdpa") if kind == "hf" else lctk_hf.install(model))
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(ids, logits_to_keep=1) if kind == "hf" else lcm.prefill(ids)
        sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
        del out
        return seconds, peak

    for kind in ("hf", "ours"):  # warm-up
        one(kind, torch.randint(0, model.config.vocab_size, (1, 1024), device=device))
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        flops = prefill_flops(model.config, n)
        for kind in ("hf", "ours"):
            check = f"prefill {n // 1024}K tokens, {'ours' if kind == 'ours' else 'transformers sdpa'}, {shape}"
            if kind in last:
                predicted = last[kind][1] * (n / last[kind][0]) ** 2  # attention dominates: quadratic
                if predicted > left() - 10:
                    rows.add(check, "skip", f"predicted {predicted:.0f} s, {left():.0f} s left in the step")
                    continue
            try:
                seconds, peak = one(kind, ids)
            except torch.cuda.OutOfMemoryError as err:
                rows.add(check, "fail" if kind == "ours" else "info", f"out of memory: {str(err).splitlines()[0]}")
                continue
            last[kind] = (n, seconds)
            rows.add(check, "pass" if kind == "ours" else "info",
                     f"{n / seconds:.0f} tokens/s, MFU {flops / seconds / bf16_rate:.2f} of the measured bf16 rate "
                     f"({flops / seconds / H100_BF16_PEAK:.2f} of the datasheet), peak {_gib(peak)} above "
                     f"{_gib(weights)} of weights", seconds=seconds, tokens_per_s=n / seconds)
    lcm = model = None  # (the closures above read them; freed here)
    _free(device)


def matmul_rate_bf16(device, dry: bool) -> float:
    from benchmarks.measure import matmul_rate

    return matmul_rate(torch.bfloat16, n=512 if dry else 8192, repeats=10, device=device.type)
