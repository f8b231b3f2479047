"""Multi-rank correctness on CUDA tensors, ranks sharing one GPU (part of gpu_check.sh).

NCCL refuses two ranks on one device, so the ranks run gloo with their tensors on cuda:0
(LOCAL_RANK=0 for all). gloo moves CUDA tensors in all-to-all, all-gather and broadcast
but not in send/recv, so for the ring's isend/irecv only, this harness stages the
buffers through host memory (`stage_p2p_through_host`); the engine's math and collectives
are otherwise untouched. Every layout is held to the single-process transformers model
on the same GPU: last-token logits within LOGITS_ATOL and identical greedy tokens.

    python benchmarks/gpu_multirank.py [--cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# fp32 logits of unit-to-ten scale; reordered sums across ranks and chunks move them by
# ~1e-6 on CPU; GPU kernels (cuBLAS split-K, SDPA vs our blockwise path) by up to ~1e-4.
# A masking or cache bug moves them by ~1e-1.
LOGITS_ATOL = {"cpu": 1e-4, "cuda": 1e-3}
PROMPT, CHUNK, NEW_TOKENS = 301, 64, 6  # 301 divides by no 2P: padding paths run
CASES = {
    2: [dict(ulysses=2), dict(ring=2, ring_mode="pass-kv", sequence_layout="zigzag"),
        dict(ring=2, ring_mode="pass-q", sequence_layout="contiguous")],
    4: [dict(ulysses=2, ring=2, ring_mode="pass-kv"), dict(ring=4), dict(ulysses=4)],
}


def tiny_folder(root: Path) -> str:
    """Llama: 4 heads, 2 KV heads (Ulysses 4 replicates them), 2 layers, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = root / "gpu-tiny-llama"
    if not (folder / "config.json").is_file():
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             eos_token_id=None, bos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)  # well separated greedy choices
        model.save_pretrained(folder)
    return str(folder)


def _ids():
    import torch

    return torch.randint(0, 96, (1, PROMPT), generator=torch.Generator().manual_seed(7))


def on_rank(model_dir: str, cases: list[dict]) -> list[dict]:
    import torch

    from toolkit import parallelize
    from benchmarks.models import load
    out = []
    for case in cases:
        lcm = parallelize(load(model_dir, "sdpa"), chunk_size=CHUNK, **case)
        logits = lcm.prefill(_ids()).cpu()
        tokens = lcm.generate(_ids(), max_new_tokens=NEW_TOKENS).token_ids
        out.append({"logits": logits, "tokens": tokens, "device": str(lcm.topo.device)})
    return out


def reference(model_dir: str, device: str) -> tuple:
    import torch

    from benchmarks.models import load

    model = load(model_dir, "sdpa").to(device)
    ids = _ids().to(device)
    with torch.no_grad():
        logits = model(ids, logits_to_keep=1).logits[0, -1].float().cpu()
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, tokens[0, PROMPT:].tolist()


def run(root: Path, use_cuda: bool) -> list[dict]:
    import torch

    from toolkit.rank_group import RankGroup

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = "cuda" if use_cuda else "cpu"
    folder = tiny_folder(root)
    want_logits, want_tokens = reference(folder, device)
    rows = []
    for world, cases in CASES.items():
        t0 = time.perf_counter()
        env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world)} if use_cuda else {}
        if not use_cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        with RankGroup(world, threads=1, env=env) as ranks:
            per_rank = ranks.run(on_rank, folder, cases, timeout=300)
        for i, case in enumerate(cases):
            errors = [float((r[i]["logits"] - want_logits).abs().max()) for r in per_rank]
            same = all(r[i]["tokens"] == want_tokens for r in per_rank)
            ok = max(errors) <= LOGITS_ATOL[device] and same
            rows.append({"world": world, "case": case, "device": per_rank[0][i]["device"], "max_logit_err": max(errors),
                         "tolerance": LOGITS_ATOL[device], "same_greedy_tokens": same, "ok": ok,
                         "seconds": time.perf_counter() - t0})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU tensors")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    import torch

    rows = run(Path(args.root), torch.cuda.is_available() and not args.cpu)
    for r in rows:
        print(f"world {r['world']} {json.dumps(r['case'])}: {'ok' if r['ok'] else 'FAIL'} "
              f"(max logit error {r['max_logit_err']:.1e}, same tokens {r['same_greedy_tokens']}, on {r['device']})")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
