"""GPU rows for what only a CUDA device shows of the decode step a graph captures: bf16 tokens
of the static step and its graph while the fallback's read span grows every few tokens (each
growth is a new capture, on every rank at the same step), window and soft-cap attention
issuing no host sync, and a config with dynamic RoPE refused before any weight is read."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from benchmarks import gpu_models
from benchmarks.gpu_rows import Rows


def graph_rows(rows: Rows, models, dev, root: Path) -> None:
    if dev.type != "cuda":
        rows.add("bf16 decode with re-captured graphs; window attention without host syncs; dynamic RoPE refused",
                 "skip", "dry run: these need a CUDA device")
        return
    with rows.guard("bf16 decode, growing read span"):
        _recaptures(rows, models)
    with rows.guard("window and soft-cap attention, no host sync"):
        _no_syncs(rows, dev)
    with rows.guard("dynamic RoPE with --cuda-graph"):
        _dynamic_rope_refused(rows, models, root)


def _recaptures(rows: Rows, models) -> None:
    from toolkit import LongContextModel
    from toolkit.engine import static_decode

    lcm = LongContextModel.from_pretrained(models["chat-llama"], chunk_size=64, dtype="bfloat16", timeout_s=120)
    ids = gpu_models.prompt_ids()
    saved, tokens = static_decode.SPAN_SLACK, {}
    static_decode.SPAN_SLACK = 4  # the span grows every few tokens: many captures in one answer
    try:
        for mode in ("eager", "static", "cuda-graph"):
            lcm.decode_mode = mode
            tokens[mode] = lcm.generate(ids, 48).token_ids
    finally:
        static_decode.SPAN_SLACK, lcm.decode_mode = saved, "eager"
    same = tokens["cuda-graph"] == tokens["static"]
    rows.add("bf16 decode, read span growing every 4 tokens: the graph's tokens equal the static step's", same,
             f"48 tokens; eager's equal too: {tokens['eager'] == tokens['static']} (bf16 near-ties may differ)")


def _no_syncs(rows: Rows, dev) -> None:
    from toolkit.attention.window import positional_attention

    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 4, 1, 64, generator=gen).to(dev, torch.bfloat16)         # one decode query
    k, v = (torch.randn(1, 2, 300, 64, generator=gen).to(dev, torch.bfloat16) for _ in range(2))
    q_pos, k_pos = torch.tensor([299]), torch.arange(300)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        positional_attention(q, k, v, q_pos, k_pos, 0.125, window=64, softcap=30.0)
        ok, why = True, "no synchronising call"
    except RuntimeError as err:
        ok, why = False, str(err).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows.add("window 64 and soft-cap 30 decode attention on CUDA bf16 issues no host sync", ok, why)


def _dynamic_rope_refused(rows: Rows, models, root: Path) -> None:
    from toolkit import LongContextModel

    folder = root / "dynamic-llama"
    if not folder.is_dir():
        shutil.copytree(models["chat-llama"], folder)
        config = json.loads((folder / "config.json").read_text())
        theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
        config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": theta}
        (folder / "config.json").write_text(json.dumps(config))
    try:
        LongContextModel.from_pretrained(str(folder), cuda_graph=True, timeout_s=120)
        ok, why = False, "loaded: the capture would fail at its first host comparison"
    except ValueError as err:
        ok, why = "dynamic" in str(err), str(err)[:160]
    rows.add("a config with dynamic RoPE and --cuda-graph: refused in one line before the weights", ok, why)
