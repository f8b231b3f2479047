"""Pipeline bubble, measured against the formula (P-1)/M.

P stages of a balanced random-weight model, M prefill chunks. Each stage records the time
it computes; the bubble is idle time over compute time, (wall - busy) / busy, which the
GPipe analysis predicts as (P-1)/M for equal micro-batches. Chunks here are MLP-dominated
(short context, wide layers) so that they cost the same, as the formula assumes.
Usage: python benchmarks/pipeline_bubble.py [--stages 2] [--chunks 8] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, world: int, port: int, chunks: int, chunk_size: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from toolkit import parallelize

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4 * world,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=65536)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lcm = parallelize(model, pp=world, chunk_size=chunk_size)
    ids = torch.randint(0, 512, (1, chunks * chunk_size), generator=torch.Generator().manual_seed(1))
    lcm.prefill(ids)  # warm-up
    rows = []
    for _ in range(3):
        lcm.stage.busy_s = 0.0
        dist.barrier()
        t0 = time.perf_counter()
        lcm.prefill(ids)
        dist.barrier()
        wall = time.perf_counter() - t0
        rows.append((wall, lcm.stage.busy_s))
    results.put((rank, rows))
    dist.destroy_process_group()


def measure(stages: int, chunks: int, chunk_size: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, stages, port, chunks, chunk_size, results)) for r in range(stages)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    # per repeat: the slowest stage's busy time against the common wall time
    bubbles = sorted(wall / max(by_rank[r][i][1] for r in by_rank) - 1 for i, (wall, _) in enumerate(by_rank[0]))
    measured = bubbles[len(bubbles) // 2]
    expected = (stages - 1) / chunks
    busy = [sorted(row[1] for row in by_rank[r])[1] for r in sorted(by_rank)]
    # unequal stages: the first chunk crosses every stage, the rest queue behind the slowest
    # one, so the bubble is (sum of per-chunk stage times - slowest) / (M * slowest)
    per_chunk = [b / chunks for b in busy]
    unequal = (sum(per_chunk) - max(per_chunk)) / (chunks * max(per_chunk))
    return dict(stages=stages, chunks=chunks, chunk_size=chunk_size, measured_bubble=measured,
                formula_bubble=expected, relative_error=measured / expected - 1,
                formula_with_measured_stage_times=unequal, per_repeat=bubbles, busy_by_stage=busy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    result = measure(args.stages, args.chunks, args.chunk_size)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipeline_bubble.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
