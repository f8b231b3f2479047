"""The GPU check's single-process steps; gpu_check.py runs each as its own process:

    python benchmarks/gpu_steps.py STEP --rows FILE --root DIR --seconds N [--dry-run]

- `device`: what runs (device, versions, which transformers), flash-attn or not, the bf16 and
  fp32 matmul rates and copy bandwidth, our attention kernels and merge against float64.
- `models`: the tiny models (gpu_models.py), saved once for every later process.
- `world1`: on the device, one process: an NCCL group of one rank; DeepSpeed's TP layers on it;
  every kv dtype against the CPU's tokens; eager, static and CUDA-graph decode; a
  sliding-window model against transformers.
- `kvref`: the CPU's tokens for every kv dtype (world1 starts it, with no CUDA device visible).
- `decode`, `prefill`: the timed rows (gpu_speed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks import gpu_graphs, gpu_models  # noqa: E402
from benchmarks.gpu_rows import Rows  # noqa: E402

KV_DTYPES = ("auto", "bf16", "int8", "fp8", "int4")
NEW_TOKENS = 12


def device_step(rows: Rows, dev, dry: bool):
    import transformers

    from benchmarks.gpu_speed import sync
    from benchmarks.measure import copy_bandwidth, matmul_rate
    from toolkit.backends import flash_attn_func

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (dry run)"
    rows.add("device", "info", f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; transformers "
             f"{transformers.__version__} from {Path(transformers.__file__).parents[1]}")
    with rows.guard("DeepSpeed imports"):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        rows.add("DeepSpeed imports", get_accelerator().device_name() == dev.type,
                 f"deepspeed {deepspeed.__version__}, accelerator {get_accelerator().device_name()}")
    if flash_attn_func is None:
        rows.add("flash-attn", "info", "not installed: " + ("torch's CPU kernel ran (dry run)" if dry else
                 "bf16 attention on CUDA ran the blockwise PyTorch fallback; no row checks flash-attn"))
    else:
        import flash_attn

        rows.add("flash-attn", "info", f"flash-attn {flash_attn.__version__}: our bf16/fp16 attention on CUDA runs it, "
                 "in the kernel rows and in every multi-rank row")
    n = 512 if dry else 8192
    bf16 = matmul_rate(torch.bfloat16, n=n, repeats=10, device=dev.type)
    fp32 = matmul_rate(torch.float32, n=n, repeats=5, device=dev.type)
    copy = copy_bandwidth(dev, 64 if dry else 4096)
    sync(dev)
    rows.add("rates", "info", f"bf16 matmul {bf16 / 1e12:.3g} TFLOP/s, fp32 {fp32 / 1e12:.3g} TFLOP/s, "
             f"copy {copy / 1e9:.0f} GB/s", bf16_flops=bf16)
    kernel_rows(rows, dev)


def kernel_rows(rows: Rows, dev):
    from toolkit.attention.kernels import attention_reference, attention_with_lse, merge_partials

    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # bf16 inputs: ~3 significant digits
    g = torch.Generator(device="cpu").manual_seed(0)

    def err(out, lse, ref):
        return max(float((out.double() - ref[0]).abs().max()), float((lse.double() - ref[1]).abs().max()))

    for dtype in (torch.float32, torch.bfloat16):
        worst = []
        for sq, sk, causal, h, kvh, d in [(1000, 1000, True, 8, 2, 64), (300, 1000, True, 8, 2, 128),
                                          (257, 1000, False, 4, 4, 64), (1, 777, False, 8, 2, 128)]:
            q = torch.randn(1, h, sq, d, generator=g).to(dev, dtype)
            k, v = (torch.randn(1, kvh, sk, d, generator=g).to(dev, dtype) for _ in range(2))
            worst.append(err(*attention_with_lse(q, k, v, causal=causal), attention_reference(q, k, v, causal=causal)))
        q = torch.randn(1, 8, 200, 64, generator=g).to(dev, dtype)
        k, v = (torch.randn(1, 2, 1000, 64, generator=g).to(dev, dtype) for _ in range(2))
        halves = [attention_with_lse(q, k[:, :, s], v[:, :, s], False) for s in (slice(0, 500), slice(500, None))]
        worst.append(err(*merge_partials(*halves[0], *halves[1]), attention_reference(q, k, v, causal=False)))
        kind = str(dtype).replace("torch.", "")
        rows.add(f"attention kernels and merge, {kind}, against float64", max(worst) <= tol[dtype],
                 f"5 cases, largest error {max(worst):.1e} (tolerance {tol[dtype]:.0e})")


def _nccl_world_of_one(rows: Rows, dev) -> None:
    import torch.distributed as dist

    from benchmarks.gpu_rows import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    with rows.guard(f"{backend} group of one rank"):
        index = torch.cuda.current_device() if dev.type == "cuda" else None
        dist.init_process_group(backend, **({"device_id": torch.device("cuda", index)} if index is not None else {}))
        ones = torch.ones(8, device=dev)
        dist.all_reduce(ones)
        rows.add(f"{backend} group of one rank: init and an all-reduce on the device", float(ones.sum()) == 8.0,
                 f"sum {float(ones.sum()):.0f} of 8 (one rank: no data crosses a link)")


def deepspeed_tp1(rows: Rows, models, dev):
    """DeepSpeed's TP layers (LinearLayer, LinearAllreduce, LmHeadLinearAllreduce: AutoTP's) put
    in by init_inference on the device at tp=1: the same logits as the plain model."""
    import deepspeed
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from benchmarks.models import load

    model = load(models["chat-llama"], "sdpa").to(dev)
    ids = gpu_models.prompt_ids().to(dev)
    with torch.no_grad():
        ref = model(ids).logits[0, -1].float()
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 1}, dtype=torch.float32,
                                          replace_with_kernel_inject=False,
                                          injection_policy={LlamaDecoderLayer: ("self_attn.o_proj", "mlp.down_proj")})
        out = engine.module(ids).logits[0, -1].float()
    layers = sum(type(m).__name__ in ("LinearLayer", "LinearAllreduce", "LmHeadLinearAllreduce")
                 for m in engine.module.modules())
    err = float((out - ref).abs().max())
    rows.add("DeepSpeed init_inference at tp=1 on the device: its TP layers, the plain model's logits",
             layers > 0 and err <= 1e-4, f"{layers} linears replaced, largest logit difference {err:.1e}")


def _kv_run(folder, kv):
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(folder, kv_dtype=kv, chunk_size=64, timeout_s=120)
    ids = gpu_models.prompt_ids()
    logits = lcm.prefill(ids).float().cpu()  # the chunks after the first read the stored cache
    tokens = lcm.generate(ids, NEW_TOKENS).token_ids
    return logits, tokens


def kvref_step(rows: Rows, models, out: Path):
    """On the CPU: every kv dtype's tokens and its logits' distance from the model's-dtype cache."""
    found = {kv: _kv_run(models["chat-llama"], kv) for kv in KV_DTYPES}
    out.write_text(json.dumps({kv: {"tokens": t, "diff": float((l - found["auto"][0]).abs().max())}
                               for kv, (l, t) in found.items()}))


def kv_rows(rows: Rows, models, dev, root: Path, left):
    ref_file = root / "kvref.json"
    ref_file.unlink(missing_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, __file__, "kvref", "--rows", os.devnull, "--root", str(root)], env=env,
                   timeout=max(30, left() / 2), check=True, stdout=sys.stderr)
    cpu = json.loads(ref_file.read_text())
    found = {}
    for kv in KV_DTYPES:
        with rows.guard(f"kv dtype {kv} on the device"):
            found[kv] = _kv_run(models["chat-llama"], kv)
            logits, tokens = found[kv]
            diff = float((logits - found["auto"][0]).abs().max())
            agree = sum(a == b for a, b in zip(tokens, found["auto"][1]))
            same_cpu = tokens == cpu[kv]["tokens"]
            ok = same_cpu and diff <= 2 * cpu[kv]["diff"] + 1e-3
            rows.add(f"kv dtype {kv} on the device: the CPU's tokens, its distance from the model's-dtype cache",
                     ok, f"tokens equal the CPU's {kv}: {same_cpu}; against auto: {agree}/{NEW_TOKENS} tokens, "
                     f"largest logit difference {diff:.2e} (CPU {cpu[kv]['diff']:.2e})")


def mode_rows(rows: Rows, models, dev):
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(models["chat-llama"], chunk_size=64, timeout_s=120)
    ids = gpu_models.prompt_ids()
    tokens = {}
    for mode in ("eager", "static") + (("cuda-graph",) if dev.type == "cuda" else ()):
        with rows.guard(f"decode {mode}, tiny fp32"):
            lcm.decode_mode = mode
            tokens[mode] = lcm.generate(ids, 16).token_ids
    same = len(tokens) > 1 and all(t == tokens["eager"] for t in tokens.values())
    rows.add("decode eager, static" + (", CUDA graph" if dev.type == "cuda" else " (dry run: no graph)") +
             ": equal tokens, tiny fp32 model", same, f"{len(tokens)} modes x 16 tokens, equal: {same}")
    lcm.decode_mode = "eager"
    rows.add("API eager tokens of the CLI's prompt", "info", "compared in the CLI step",
             tokens=lcm.generate(gpu_models.PROMPT, 12).token_ids)


def window_rows(rows: Rows, models, dev):
    from benchmarks.models import load
    from toolkit import LongContextModel

    ref = load(models["swa-mistral"], "sdpa").to(dev)
    ids = gpu_models.prompt_ids()
    with torch.no_grad():
        want = ref(ids.to(dev), logits_to_keep=1).logits[0, -1].float().cpu()
        want_tokens = ref.generate(ids.to(dev), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 301:].tolist()
    lcm = LongContextModel.from_pretrained(models["swa-mistral"], chunk_size=64, timeout_s=120)
    err = float((lcm.prefill(ids).float().cpu() - want).abs().max())
    same = lcm.generate(ids, 8).token_ids == want_tokens
    rows.add("sliding window 8 (Mistral), world 1, chunks of 64: transformers' logits and tokens",
             err <= 1e-3 and same, f"largest logit difference {err:.1e}, 8 greedy tokens equal: {same}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step")
    ap.add_argument("--rows", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    end = time.monotonic() + args.seconds
    left = lambda: end - time.monotonic()  # noqa: E731
    dry = args.dry_run or not torch.cuda.is_available()
    dev = torch.device("cpu" if dry else "cuda")
    rows, root = Rows(args.rows, args.step), Path(args.root)
    models = {name: str(root / name) for name in ("chat-llama", "swa-mistral", "wide-mixtral")}
    if args.step == "device":
        device_step(rows, dev, dry)
    elif args.step == "models":
        t0 = time.perf_counter()
        gpu_models.build_all(root)
        rows.add("tiny models built (random weights, word-level tokenizer)", "pass", f"{time.perf_counter() - t0:.1f} s")
    elif args.step == "kvref":
        kvref_step(rows, models, root / "kvref.json")
    elif args.step == "world1":
        _nccl_world_of_one(rows, dev)
        for name, fn in (("kv dtypes", lambda: kv_rows(rows, models, dev, root, left)),
                         ("decode modes", lambda: mode_rows(rows, models, dev)),
                         ("sliding window", lambda: window_rows(rows, models, dev)),
                         ("graphs and syncs", lambda: gpu_graphs.graph_rows(rows, models, dev, root)),
                         ("DeepSpeed at tp=1", lambda: deepspeed_tp1(rows, models, dev))):  # last: it sets globals
            with rows.guard(name):
                fn()
    elif args.step in ("decode", "prefill"):
        from benchmarks import gpu_speed

        dtype = torch.float32 if dry else torch.bfloat16
        if args.step == "decode":
            gpu_speed.decode_rows(rows, dev, dtype, 512 if dry else 8192, 6 if dry else 32, small=dry)
        else:
            bf16 = gpu_speed.matmul_rate_bf16(dev, dry)
            gpu_speed.prefill_rows(rows, dev, dtype, [1024, 2048] if dry else [32768, 131072], bf16, left, small=dry)
    else:
        raise SystemExit(f"unknown step {args.step}")


if __name__ == "__main__":
    main()
