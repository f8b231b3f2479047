"""What a quantised KV cache costs in accuracy and saves in bytes, per kv dtype, on the demo model
(world 1 in this process, 2 ranks for the wire):

- kv_needle_accuracy_{dtype}: the needle harness of needle.py (the same prompts), greedy, with the
  cache stored in that dtype; `auto` is full precision;
- kv_kl_{dtype}: the mean KL divergence KL(full || dtype) of the next-token distribution over
  `positions` positions of a real text (this repository's README), each token decoded after a
  prefilled prefix with the true previous tokens forced;
- kv_bytes_ratio_{dtype}: the bytes the cache holds over a bf16 cache's (measured on the cache
  after the prefill), beside the closed form: (d + 4)/2d for int8 and fp8, (d/2 + 4)/2d for int4;
- ring_kv_bytes_ratio_{dtype}: the bytes ring=2 pass-KV hops carry over a bf16 cache's, counted
  by the comm counter, over a prompt of many chunks (each chunk's own pieces travel at the
  model's precision: fp32 on CPU, so the ratio is higher than a bf16 model's would be).
"""
from __future__ import annotations

from pathlib import Path

from .needle import NEW_TOKENS, build_prompt

KINDS = ("auto", "int8", "fp8", "int4")
README = Path(__file__).resolve().parents[1] / "README.md"


def text_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer(README.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _model(model_dir: str, kind: str, chunk: int):
    from toolkit import LongContextModel

    return LongContextModel.from_pretrained(model_dir, kv_dtype=kind, chunk_size=chunk, ulysses=1, ring=1,
                                            preflight=False)


def forced_distributions(lcm, ids: list[int], prefix: int, positions: int):
    """log-softmax [positions, V] of the next token after prefix, prefix+1, ...: teacher-forced."""
    import torch

    from toolkit.engine.decode import decoder

    logits = [lcm.prefill(torch.tensor([ids[:prefix]]), reserve_new_tokens=positions)]
    step = decoder(lcm.model, lcm.last_state, lcm.stage, "eager", positions)
    for i in range(positions - 1):
        logits.append(step(ids[prefix + i], prefix + i))
    return torch.log_softmax(torch.stack(logits).float(), dim=-1)


def cache_bytes(lcm, ids: list[int]) -> int:
    """Bytes the cache holds for these ids, buffers sized to exactly them."""
    import torch

    lcm.prefill(torch.tensor([ids]))
    return sum(p[:, :, : kv.length].numel() * p.element_size()
               for kv in lcm.last_state.cache.layers.values() for p in kv.planes)


def ring_bytes_on_rank(model_dir: str, kind: str, ids: list[int], chunk: int) -> int:
    """Bytes this rank's pass-KV hops sent in one ring=2 prefill with the cache in `kind`."""
    import torch

    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(model_dir, kv_dtype=kind, ring=2, ring_mode="pass-kv", chunk_size=chunk,
                                           preflight=False)
    lcm.topo.comm.counter.reset()
    lcm.prefill(torch.tensor([ids]))
    return sum(s for (tag, _), (s, _r) in lcm.topo.comm.counter.by_key.items() if tag == "ring_kv")


def kv_dtypes(ranks, model_dir: str, size: dict, threads: int) -> tuple[dict, list]:
    import torch
    from transformers import AutoTokenizer

    from toolkit.attention.kv_formats import bytes_per_token_head
    from toolkit.models import head_dim as model_head_dim

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = text_ids(tokenizer, size["prefix"] + size["positions"])
    needles = [build_prompt(tokenizer, length, depth, seed=length + i)
               for length in size["lengths"] for i, depth in enumerate(size["depths"])]
    metrics, rows, logprobs = {}, [], {}
    head_dim = None
    for kind in KINDS + ("bf16",):
        lcm = _model(model_dir, kind, size["chunk"])
        head_dim = model_head_dim(lcm.config)
        row = {"kv_dtype": kind, "cache_bytes": cache_bytes(lcm, text[: size["prefix"]])}
        if kind != "bf16":  # bf16 only as the byte baseline
            answers = [tokenizer.decode(lcm.generate(ids, max_new_tokens=NEW_TOKENS).token_ids, skip_special_tokens=True)
                       for ids, _ in needles]
            row["needle"] = [str(key) in answer for (_, key), answer in zip(needles, answers)]
            row["answers"] = answers
            metrics[f"kv_needle_accuracy_{kind}"] = sum(row["needle"]) / len(row["needle"])
            logprobs[kind] = forced_distributions(lcm, text, size["prefix"], size["positions"])
        rows.append(row)
    bf16 = next(r for r in rows if r["kv_dtype"] == "bf16")["cache_bytes"]
    wire_text = text_ids(tokenizer, size["wire_tokens"])
    wire = {kind: sum(ranks.run(ring_bytes_on_rank, model_dir, kind, wire_text, size["wire_chunk"]))
            for kind in ("bf16", "int8", "fp8", "int4")}
    for row in rows:
        kind = row["kv_dtype"]
        if kind in ("int8", "fp8", "int4"):
            full, mine = logprobs["auto"], logprobs[kind]
            kl = (full.exp() * (full - mine)).sum(-1)  # [positions]
            row.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()))
            metrics[f"kv_kl_{kind}"] = float(kl.mean())
            metrics[f"kv_bytes_ratio_{kind}"] = row["cache_bytes"] / bf16
            metrics[f"kv_bytes_ratio_{kind}_closed_form"] = bytes_per_token_head(kind, head_dim, 4) / (2 * head_dim)
            metrics[f"ring_kv_bytes_ratio_{kind}"] = wire[kind] / wire["bf16"]
    run = {"bench": "kv_dtypes", "model": "SmolLM2-135M-Instruct", "rows": rows, "head_dim": head_dim,
           "needle_prompts": [{"tokens": len(ids), "passkey": key} for ids, key in needles],
           "kl_text": "README.md of this repository", "wire_bytes": wire, **size,
           "baseline": "the same model with the cache in its own dtype (fp32), world 1, this process"}
    return metrics, [run]
