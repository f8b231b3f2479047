"""Pipeline bubble, measured against the formula (P-1)/M.

P stages of a balanced random-weight model, M prefill chunks. Each stage records the time
it computes, chunk by chunk; the bubble is idle time over compute time, (wall - busy) /
busy, which the GPipe analysis predicts as (P-1)/M for equal micro-batches. Chunks here
are MLP-dominated (wide layers, short context) so that they cost nearly the same, as the
formula assumes. The same per-chunk times also give the bubble the schedule itself
implies (a flow shop: stage s starts chunk i when it has finished chunk i-1 and stage s-1
has finished chunk i), which holds for unequal chunks too: measured against it, the gap is
what the engine adds (sends, waits) beyond the schedule.
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


def _rank(rank: int, world: int, port: int, chunks: int, chunk_size: int, shape: dict, layers: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # random weights shrink activations layer by layer into denormals, which make the
    # element-wise ops of later stages ~2x slower on x86: flush them so stages stay equal
    torch.set_flush_denormal(True)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= world:  # one core per stage, as a GPU rank owns its device (measured: unpinned
        os.sched_setaffinity(0, {cores[rank]})  # ranks drift onto shared cores and stages differ by ~30%)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from toolkit import parallelize

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, num_hidden_layers=layers * world, max_position_embeddings=65536, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    lcm = parallelize(model, pp=world, chunk_size=chunk_size)
    ids = torch.randint(0, 512, (1, chunks * chunk_size), generator=torch.Generator().manual_seed(1))
    lcm.prefill(ids)  # warm-up
    rows = []
    for _ in range(REPEATS):
        lcm.stage.busy_s = 0.0
        lcm.stage.busy_log.clear()
        dist.barrier()
        t0 = time.perf_counter()
        lcm.prefill(ids)
        dist.barrier()
        wall = time.perf_counter() - t0
        rows.append((wall, lcm.stage.busy_s, list(lcm.stage.busy_log)))
    results.put((rank, rows))
    dist.destroy_process_group()


REPEATS = 9
# MLP-dominated: 2*h*(4h + 3i) linear FLOPs per token per layer against 4*h*context for
# attention, so the last chunk (context M*chunk) costs only a little more than the first.
# Small enough that both stages' weights stay in the shared L3 cache: streaming them from
# memory, the two cores slowed each other by ~25%, and the fill and drain chunks (one
# stage running alone) came out faster than the rest.
SHAPE = dict(hidden_size=128, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=4)
LAYERS = 2  # per stage


def schedule_bubble(times: list[list[float]]) -> float:
    """Bubble a pipeline schedule implies for per-stage, per-chunk times [P][M]:
    makespan (flow-shop recurrence) over the busiest stage's compute, minus 1."""
    stages, chunks = len(times), len(times[0])
    done = [[0.0] * chunks for _ in range(stages)]
    for s in range(stages):
        for i in range(chunks):
            ready = max(done[s - 1][i] if s else 0.0, done[s][i - 1] if i else 0.0)
            done[s][i] = ready + times[s][i]
    return done[-1][-1] / max(sum(row) for row in times) - 1


def measure(stages: int, chunks: int, chunk_size: int, shape: dict | None = None, layers: int = LAYERS) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    shape = shape or SHAPE
    procs = [ctx.Process(target=_rank, args=(r, stages, port, chunks, chunk_size, shape, layers, results))
             for r in range(stages)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    repeats = range(len(by_rank[0]))
    # per repeat: the common wall time over the busiest stage's compute
    bubbles = [by_rank[0][i][0] / max(by_rank[r][i][1] for r in by_rank) - 1 for i in repeats]
    implied = [schedule_bubble([by_rank[r][i][2] for r in sorted(by_rank)]) for i in repeats]
    mid = sorted(repeats, key=lambda i: bubbles[i])[len(bubbles) // 2]  # the median repeat
    expected = (stages - 1) / chunks
    chunk_s = [by_rank[r][mid][2] for r in sorted(by_rank)]  # [P][M] seconds
    mean = [sum(row) / len(row) for row in chunk_s]
    return dict(stages=stages, chunks=chunks, chunk_size=chunk_size, model=dict(shape, layers=layers * stages),
                measured_bubble=bubbles[mid], formula_bubble=expected, relative_error=bubbles[mid] / expected - 1,
                schedule_bubble=implied[mid], engine_overhead=bubbles[mid] - implied[mid],
                per_repeat=bubbles, schedule_per_repeat=implied,
                busy_by_stage=[sum(row) for row in chunk_s], chunk_seconds=chunk_s,
                # fill and drain run one stage alone: how their chunks compare with the mean
                first_chunk_stage0_over_mean=chunk_s[0][0] / mean[0],
                last_chunk_last_stage_over_mean=chunk_s[-1][-1] / mean[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    result = measure(args.stages, args.chunks, args.chunk_size)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pipeline_bubble.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
