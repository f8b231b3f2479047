"""Loading memory: what the largest rank holds at its peak while loading, over the checkpoint.

A random Llama of ~0.8 GB fp32 (safetensors) is loaded on fresh CPU ranks at tp=4, pp=2 and
tp=2 x pp=2, in the checkpoint's dtype and converted to bf16. The figure is
(largest rank's peak RSS - the same run's with a model of the same widths and one layer per
stage) / checkpoint bytes: imports, DeepSpeed and the process itself cancel out. load_s_vs_whole is our load time
over the whole-model path's (HF from_pretrained on every rank, then AutoTP), same layout.
"""
from __future__ import annotations

from .measure import KIB, MEASURE_ENV, _status_kib

# ~205M parameters: 12 layers of hidden 1024 (16 heads, 8 KV heads) and MLP 2816, untied head
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8,
             head_dim=64, vocab_size=32000, tie_word_embeddings=False)
LAYOUTS = {"tp4": dict(tp=4), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2)}


def checkpoint(root, layers: int) -> str:
    """The random checkpoint with `layers` layers (saved once)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(root) / f"loading-{layers}l"
    if not (folder / "config.json").is_file():
        config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=None,
                             eos_token_id=None, pad_token_id=None, **SHAPE)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tmp = folder.with_name(folder.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(folder)
    return str(folder)


def load_on_rank(folder: str, layout: dict, dtype: str, whole: bool) -> dict:
    """Load once in this (fresh) rank; -> seconds and the process's peak RSS so far."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit import LongContextModel, parallelize

    t0 = time.perf_counter()
    if whole:  # every rank reads the whole checkpoint, then trims and shards
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        lcm = parallelize(model, chunk_size=256, dtype=dtype, **layout)
    else:
        lcm = LongContextModel.from_pretrained(folder, chunk_size=256, dtype=dtype, preflight=False, **layout)
    seconds = time.perf_counter() - t0
    held = sum(p.numel() * p.element_size() for p in lcm.model.parameters())
    return {"load_s": seconds, "peak_rss": _status_kib("VmHWM") * KIB, "held_bytes": held}


def _fresh(world: int, *args) -> list[dict]:
    from .rank_group import RankGroup

    with RankGroup(world, threads=1, env=MEASURE_ENV) as ranks:
        return ranks.run(load_on_rank, *args)


def loading(root, layers: int = 12, repeats: int = 3) -> tuple[dict, list]:
    """-> (metrics, runs): load_peak_rss_vs_checkpoint_<layout>[_bf16] (and the whole-model
    path's at tp=4 for reference) and load_s_vs_whole (medians of interleaved fresh runs)."""
    from toolkit.loading.checkpoint import Checkpoint

    from .measure import median

    full = checkpoint(root, layers)
    with Checkpoint(full) as ckpt:
        size = ckpt.nbytes()
    metrics, runs = {}, []
    cases = [(name, layout, dtype, False) for name, layout in LAYOUTS.items() for dtype in ("float32", "bfloat16")]
    cases += [("tp4", LAYOUTS["tp4"], dtype, True) for dtype in ("float32", "bfloat16")]
    for name, layout, dtype, whole in cases:
        world = layout.get("tp", 1) * layout.get("pp", 1)
        ranks = _fresh(world, full, layout, dtype, whole)
        base = _fresh(world, checkpoint(root, layout.get("pp", 1)), layout, dtype, whole)
        peak, base_peak = max(r["peak_rss"] for r in ranks), max(r["peak_rss"] for r in base)
        key = (f"load_peak_rss_vs_checkpoint_{name}" + ("_bf16" if dtype == "bfloat16" else "")
               + ("_whole" if whole else ""))
        metrics[key] = (peak - base_peak) / size
        runs.append({"bench": "loading", "layout": name, "dtype": dtype, "path": "whole" if whole else "shares",
                     "checkpoint_bytes": size, "peak_rss_mib": peak / 2**20,
                     "one_layer_per_stage_peak_rss_mib": base_peak / 2**20,
                     "held_mib_per_rank": [r["held_bytes"] / 2**20 for r in ranks],
                     "load_s": max(r["load_s"] for r in ranks), "ratio": metrics[key]})
    times = {"shares": [], "whole": []}
    for _ in range(repeats):  # interleaved: the machine's drift hits both paths alike
        for path in times:
            times[path].append(max(r["load_s"] for r in _fresh(4, full, LAYOUTS["tp4"], "float32", path == "whole")))
    metrics["load_s_vs_whole"] = median(times["shares"]) / median(times["whole"])
    runs.append({"bench": "loading_time", "layout": "tp4", "dtype": "float32", "seconds": times,
                 "ratio": metrics["load_s_vs_whole"]})
    return metrics, runs
