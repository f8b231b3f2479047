"""The GPU check behind gpu_check.sh: one H200, under 8 minutes, a short table last.

1. bf16 (and fp32) matmul rate; 2. device copy bandwidth; 3. our attention kernels on CUDA
against the float64 reference (and the merge of partials); 4. world-1 prefill of a
random-weight Llama-3.1-8B-shaped model at 32K and 128K tokens, ours vs transformers sdpa,
interleaved on one model (attention implementation switched between runs): tokens/s,
MFU against the bf16 rate of step 1, peak memory above the weights; 5. world-1 decode of the
same model from a 32K-token cache: transformers' cached loop, ours eager, static and captured
as a CUDA graph (whose tokens must equal the static step's); 6. the multi-rank correctness
checks with ranks sharing the GPU (gpu_multirank.py).
`--dry-run` runs every step on CPU with small sizes (what a machine without a GPU can check).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks.measure import copy_bandwidth, matmul_rate  # noqa: E402
from benchmarks.models import prefill_flops  # noqa: E402

BUDGET_S = 450.0  # stop starting new work after this: the whole script stays under 8 minutes
MULTIRANK_RESERVE_S = 130.0  # the multi-rank checks, and decode before them
H200_BF16_PEAK = 989e12  # NVIDIA H200 datasheet, dense BF16 (configs/hardware/h200.yaml)


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kernel_checks(device) -> list[dict]:
    from toolkit.attention.kernels import attention_reference, attention_with_lse, merge_partials

    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # bf16 inputs: ~3 significant digits
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for sq, sk, causal, h, kvh, d in [(1000, 1000, True, 8, 2, 64), (300, 1000, True, 8, 2, 128),
                                          (257, 1000, False, 4, 4, 64), (1, 777, False, 8, 2, 128)]:
            q = torch.randn(1, h, sq, d, generator=g).to(device, dtype)
            k = torch.randn(1, kvh, sk, d, generator=g).to(device, dtype)
            v = torch.randn(1, kvh, sk, d, generator=g).to(device, dtype)
            out, lse = attention_with_lse(q, k, v, causal=causal)
            ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
            err = max(float((out.double() - ref_out).abs().max()), float((lse.double() - ref_lse).abs().max()))
            rows.append({"check": f"attention {str(dtype)[6:]} q{sq} k{sk} {'causal' if causal else 'full'} "
                                  f"H{h}/G{kvh} d{d}", "max_err": err, "tol": tol[dtype], "ok": err <= tol[dtype]})
        half = 500  # merge: two halves of the keys give the whole
        q = torch.randn(1, 8, 200, 64, generator=g).to(device, dtype)
        k = torch.randn(1, 2, 1000, 64, generator=g).to(device, dtype)
        v = torch.randn(1, 2, 1000, 64, generator=g).to(device, dtype)
        a, b = attention_with_lse(q, k[:, :, :half], v[:, :, :half], False), attention_with_lse(
            q, k[:, :, half:], v[:, :, half:], False)
        out, lse = merge_partials(*a, *b)
        ref_out, ref_lse = attention_reference(q, k, v, causal=False)
        err = max(float((out.double() - ref_out).abs().max()), float((lse.double() - ref_lse).abs().max()))
        rows.append({"check": f"merge of two partials {str(dtype)[6:]}", "max_err": err, "tol": tol[dtype],
                     "ok": err <= tol[dtype]})
    return rows


def attention_kernel(device) -> str:
    """What toolkit.attention.kernels runs for bf16 on this device."""
    from toolkit.backends import flash_attn_func

    if device.type == "cpu":
        return "torch CPU flash kernel"
    return "flash-attn" if flash_attn_func is not None else "blockwise PyTorch fallback (fp32 scores, no flash-attn)"


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


def prefill_runs(device, dtype, lengths, bf16_rate, clock: Clock, small: bool) -> list[dict]:
    from toolkit import parallelize
    from toolkit.engine import hf as lctk_hf

    model = llama8b_shaped(device, dtype, small)
    lcm = parallelize(model, ulysses=1, ring=1, chunk_size=8192)  # the planner's 8K tokens per rank
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, last_ours = [], None

    def one(kind, ids):
        (model.set_attn_implementation("sdpa") if kind == "hf" else lctk_hf.install(model))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
            if kind == "ours" and last_ours and clock.left() - MULTIRANK_RESERVE_S < last_ours[1] * (n / last_ours[0]) ** 2:
                rows.append({"kind": kind, "tokens": n, "skipped": "predicted past the 8-minute budget"})
                continue
            try:
                seconds, peak = one(kind, ids)
            except torch.cuda.OutOfMemoryError as err:  # a result, not a crash
                rows.append({"kind": kind, "tokens": n, "skipped": f"out of memory: {str(err).splitlines()[0]}"})
                continue
            if kind == "ours":
                last_ours = (n, seconds)
            rows.append({"kind": kind, "tokens": n, "seconds": seconds, "tokens_per_s": n / seconds,
                         "mfu_measured_bf16": flops / seconds / bf16_rate, "mfu_datasheet": flops / seconds / H200_BF16_PEAK,
                         "peak_above_weights_gib": peak / 2**30, "weights_gib": weights / 2**30})
    del lcm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def decode_runs(device, dtype, n: int, steps: int, small: bool) -> list[dict]:
    """World-1 decode of the 8B-shaped model from an n-token random cache: transformers' cached
    loop, ours eager, ours static (fixed shapes) and ours captured as a CUDA graph. The graph
    must give the static step's tokens (the same kernels, replayed)."""
    from benchmarks.decode import fill_ours, hf_cache, hf_decode, our_decode, step_bytes
    from toolkit import parallelize

    model = llama8b_shaped(device, dtype, small)
    lcm = parallelize(model, ulysses=1, ring=1)
    state = fill_ours(lcm, n, seed=n, room=steps)
    mark = state.cache.mark()
    modes = ["eager", "static"] + (["cuda-graph"] if device.type == "cuda" else [])
    rows, tokens = [], {}
    for mode in modes:
        lcm.decode_mode = mode
        our_decode(lcm, state, mark, n, steps)  # warm-up (and the graph's capture is per generation)
        seconds, tokens[mode] = our_decode(lcm, state, mark, n, steps)
        rows.append({"kind": f"ours {mode}", "tokens": n, "tokens_per_s": (steps - 1) / seconds})
    del state
    model.set_attn_implementation("sdpa")  # the same weights, transformers' own attention
    cache = hf_cache(model, n, seed=n)
    hf_decode(model, cache, n, steps)
    seconds, tokens["hf"] = hf_decode(model, cache, n, steps)
    rows.append({"kind": "transformers", "tokens": n, "tokens_per_s": (steps - 1) / seconds})
    del cache
    bytes_per_step = step_bytes(model, model.config, n + steps // 2)
    for row in rows:
        row["gb_per_s"] = bytes_per_step * row["tokens_per_s"] / 1e9
        row["same_tokens_as_eager"] = tokens[row["kind"].replace("ours ", "")] == tokens["eager"] \
            if row["kind"] != "transformers" else tokens["hf"] == tokens["eager"]
    graph_ok = tokens.get("cuda-graph", tokens["static"]) == tokens["static"]
    rows.append({"kind": "check", "check": "CUDA graph tokens equal the static step's", "ok": graph_ok})
    del lcm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(result: dict) -> str:
    lines = [f"device: {result['device']}   our bf16 attention kernel: {result['attention_kernel']}",
             f"bf16 matmul {result['bf16_tflops']:.0f} TFLOP/s, fp32 {result['fp32_tflops']:.1f} TFLOP/s, "
             f"copy {result['copy_gbps']:.0f} GB/s",
             f"kernels vs float64: {sum(r['ok'] for r in result['kernels'])}/{len(result['kernels'])} within tolerance",
             f"multi-rank on one device: {sum(r['ok'] for r in result['multirank'])}/{len(result['multirank'])} layouts "
             "exact", "", f"{'prefill':<10}{'tokens':>8}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}"]
    for r in result["prefill"]:
        if "skipped" in r:
            lines.append(f"{r['kind']:<10}{r['tokens']:>8}  skipped: {r['skipped']}")
        else:
            lines.append(f"{r['kind']:<10}{r['tokens']:>8}{r['tokens_per_s']:>10.0f}{r['mfu_measured_bf16']:>7.2f}"
                         f"{r['peak_above_weights_gib']:>10.1f}")
    lines += ["", f"{'decode':<18}{'cached':>8}{'tok/s':>9}{'GB/s':>8}  same tokens as eager"]
    for r in result.get("decode", []):
        if r["kind"] != "check":
            lines.append(f"{r['kind']:<18}{r['tokens']:>8}{r['tokens_per_s']:>9.1f}{r['gb_per_s']:>8.0f}  "
                         f"{YES_NO[r['same_tokens_as_eager']]}")
    return "\n".join(lines)


YES_NO = {True: "yes", False: "no"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes: checks the script, not a GPU")
    ap.add_argument("--out", default=str(HERE / "out"))
    args = ap.parse_args()
    clock = Clock()
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("no CUDA device: running the dry run on CPU", file=sys.stderr)
    device = torch.device("cpu" if dry else "cuda")
    result = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "dry_run": dry,
              "attention_kernel": attention_kernel(device)}
    n = 512 if dry else 8192
    result["bf16_tflops"] = matmul_rate(torch.bfloat16, n=n, repeats=10, device=device.type) / 1e12
    result["fp32_tflops"] = matmul_rate(torch.float32, n=n, repeats=5, device=device.type) / 1e12
    result["copy_gbps"] = copy_bandwidth(device, 64 if dry else 4096) / 1e9
    print(f"[gpu_check] rates done ({BUDGET_S - clock.left():.0f} s)", flush=True)
    result["kernels"] = kernel_checks(device)
    print(f"[gpu_check] kernels done ({BUDGET_S - clock.left():.0f} s)", flush=True)
    lengths = [1024, 2048] if dry else [32768, 131072]
    result["prefill"] = prefill_runs(device, torch.float32 if dry else torch.bfloat16, lengths,
                                     result["bf16_tflops"] * 1e12, clock, small=dry)
    print(f"[gpu_check] prefill done ({BUDGET_S - clock.left():.0f} s)", flush=True)
    result["decode"] = decode_runs(device, torch.float32 if dry else torch.bfloat16, 512 if dry else 32768,
                                   6 if dry else 48, small=dry)
    print(f"[gpu_check] decode done ({BUDGET_S - clock.left():.0f} s)", flush=True)
    from benchmarks import gpu_multirank

    result["multirank"] = gpu_multirank.run(Path(args.out), use_cuda=not dry)
    result["seconds"] = BUDGET_S - clock.left()
    result["table"] = table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a dry run must never stand in RESULTS.md for a GPU's figures: it gets its own file
    target = out / ("gpu_check-dry.json" if dry else "gpu_check.json")
    target.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\n[gpu_check] {result['seconds']:.0f} s; wrote {target}\n")
    print(result["table"])
    bad = [r for r in result["kernels"] + result["multirank"] + [r for r in result["decode"] if "ok" in r]
           if not r["ok"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
