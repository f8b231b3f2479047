"""Test bodies that run on every rank of a RankPool (module level, so spawn can import them)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from toolkit import parallelize


def _load(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prefill_logits(model_dir: str, ids: torch.Tensor, cases: list[dict]) -> list[torch.Tensor]:
    """Last-position logits for each case (parallelize kwargs)."""
    out = []
    for case in cases:
        lcm = parallelize(_load(model_dir), **case)
        out.append(lcm.prefill(ids))
    return out


def greedy_tokens(model_dir: str, ids: torch.Tensor, new_tokens: int, cases: list[dict]) -> list[list[int]]:
    out = []
    for case in cases:
        lcm = parallelize(_load(model_dir), **case)
        out.append(lcm.generate(ids, max_new_tokens=new_tokens).token_ids)
    return out


def forced_decode_logits(model_dir: str, ids: torch.Tensor, tokens: list[int], case: dict) -> torch.Tensor:
    """Prefill, then feed `tokens` one by one: logits after prefill and after each token."""
    from toolkit.engine.decode import decode_step

    lcm = parallelize(_load(model_dir), **case)
    rows = [lcm.prefill(ids, reserve_new_tokens=len(tokens))]
    for i, tok in enumerate(tokens):
        rows.append(decode_step(lcm.model, tok, ids.shape[1] + i, lcm.last_state))
    return torch.stack(rows)


def comm_bytes_per_layer(model_dir: str, ids: torch.Tensor, case: dict) -> dict:
    """Bytes this rank sent and received per layer during one prefill, by tag."""
    lcm = parallelize(_load(model_dir), **case)
    lcm.topo.comm.counter.reset()
    lcm.prefill(ids)
    return {k: tuple(v) for k, v in lcm.topo.comm.counter.by_key.items()}


def comm_calls_per_layer(model_dir: str, ids: torch.Tensor, case: dict) -> dict:
    """How many counted collectives this rank ran per (tag, layer) during one prefill."""
    lcm = parallelize(_load(model_dir), **case)
    lcm.topo.comm.counter.reset()
    lcm.prefill(ids)
    return dict(lcm.topo.comm.counter.calls)


def generate_real(model_dir: str, ids: torch.Tensor, new_tokens: int, case: dict) -> list[int]:
    """The same path a user takes: LongContextModel.from_pretrained on a saved folder."""
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    return lcm.generate(ids, max_new_tokens=new_tokens).token_ids


def tp_trap_probe() -> dict:
    """With tp=2 on 4 CPU ranks, is DeepSpeed's world-wide shm all-reduce switched off?"""
    import deepspeed.comm.comm as ds_comm

    from toolkit.distributed.topology import ParallelDims, Topology
    from toolkit.tensor_parallel.autotp import disable_world_allreduce_if_unsafe

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    topo = Topology.build(ParallelDims(tp=2, ulysses=2))
    ds_comm.cdb.shm_vector_kernel_level = getattr(ds_comm.cdb, "shm_vector_kernel_level", 0) or 1
    level_before = ds_comm.cdb.shm_vector_kernel_level
    disabled = disable_world_allreduce_if_unsafe(topo)
    # the call DeepSpeed's row-parallel layers make, on the TP group only
    x = torch.full((3,), float(topo.rank + 1))
    ds_comm.inference_all_reduce(x, group=topo.group("tp"))
    return dict(disabled=disabled, level_before=level_before, value=x[0].item(), rank=topo.rank)


def topology_groups() -> dict:
    """Group rank lists this rank belongs to, built by Topology.build from the launcher env."""
    import torch.distributed as dist

    from toolkit.distributed.topology import ParallelDims, Topology

    topo = Topology.build(ParallelDims(tp=2, ring=2))
    return {dim: dist.get_process_group_ranks(g) if g is not None else [topo.rank]
            for dim, g in topo.groups.items()} | {"ranks_per_node": topo.ranks_per_node}


def run_config_refusal() -> str:
    """TP=4 over the launcher's nodes of 2 ranks: refused before any group or weight exists."""
    from transformers import MistralConfig

    from toolkit.api import run_config_for

    config = MistralConfig(num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    try:
        run_config_for(config, tp=4)
    except ValueError as err:
        return str(err)
    return ""


def eight_rank_generate(model_dir: str, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Heavily oversubscribed (8 ranks on 2 cores): hybrid and ring layouts must not deadlock."""
    out = []
    for case in (dict(ulysses=2, ring=4), dict(ring=8, ring_mode="pass-q")):
        lcm = parallelize(_load(model_dir), chunk_size=24, **case)
        out.append(lcm.generate(ids, max_new_tokens=new_tokens).token_ids)
    return out


def auto_layout_at_runtime(model_dir: str, contexts: list[int]) -> list[dict]:
    """What the `auto` preset picks with the real world size, per prompt length."""
    from transformers import AutoConfig

    from toolkit.api import run_config_for

    config = AutoConfig.from_pretrained(model_dir)
    out = []
    for context in contexts:
        run = run_config_for(config, "auto", context)
        out.append(dict(tp=run.dims.tp, ulysses=run.dims.ulysses, ring=run.dims.ring))
    return out


def loaded_both_ways(model_dir: str, case: dict, ids: torch.Tensor, new_tokens: int) -> dict:
    """This rank's model loaded by share (LongContextModel.from_pretrained: meta build, slice
    reads) and by the whole-model path (HF from_pretrained, then parallelize) with the same
    RunConfig: names whose values differ in any bit, tensors left on meta, greedy tokens."""
    from toolkit import LongContextModel

    shared = LongContextModel.from_pretrained(model_dir, **case)
    whole_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, shared.run.dtype)).eval()
    whole = parallelize(whole_model, config=shared.run)
    mine = dict(shared.model.named_parameters(remove_duplicate=False)) | dict(shared.model.named_buffers())
    theirs = dict(whole.model.named_parameters(remove_duplicate=False)) | dict(whole.model.named_buffers())
    differ = sorted(n for n in set(mine) | set(theirs)
                    if n not in mine or n not in theirs or mine[n].dtype != theirs[n].dtype
                    or mine[n].shape != theirs[n].shape or not torch.equal(mine[n], theirs[n]))
    on_meta = sorted(n for n, t in mine.items() if t.is_meta)
    held = sum(p.numel() for p in shared.model.parameters())  # each parameter once (tied: one)
    return dict(differ=differ, on_meta=on_meta, tensors=len(mine), held_params=held, coords=shared.topo.coords,
                tokens=shared.generate(ids, max_new_tokens=new_tokens).token_ids)


def held_shapes(model_dir: str, case: dict) -> dict:
    """Shapes of this rank's parameters (loaded by shares) and the KV heads its cache holds."""
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(model_dir, chunk_size=16, **case)
    lcm.prefill(torch.arange(10)[None] % lcm.config.vocab_size)
    shapes = {n: list(p.shape) for n, p in lcm.model.named_parameters()}
    return dict(shapes, cache_kv_heads=lcm.last_state.cache.layer(0).view()[0].shape[1])


def held_after_generate(model_dir: str, case: dict, ids: torch.Tensor, new_tokens: int) -> dict:
    """Keys each layer's cache holds on this rank after a generate, and its buffer's capacity (plain
    decode: a step that checks guesses drops a window's old keys by its first position, so it may
    hold up to its guesses more)."""
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    tokens = lcm.generate(ids, max_new_tokens=new_tokens, speculate="off").token_ids
    cache = lcm.last_state.cache
    return dict(held=cache.held_tokens(), capacity={i: kv.capacity for i, kv in cache.layers.items()},
                positions={i: cache.live_positions(i, lcm.last_state.r_rank).tolist() for i in cache.layers},
                tokens=tokens, layer_types=list(lcm.config.layer_types), window=lcm.config.sliding_window)


def threads_over_repeated_loads(model_dir: str, loads: int, case: dict) -> dict:
    """This rank's OS thread count (gloo runs a thread per group) and the groups the topology
    made, after the second and after the last of `loads` loads of the same model."""
    import gc

    import psutil

    from toolkit.distributed.topology import groups_made

    seen = {}
    for i in range(loads):
        lcm = parallelize(_load(model_dir), **case)
        lcm.prefill(torch.arange(11)[None] % 90)
        del lcm
        gc.collect()
        if i in (1, loads - 1):
            seen[i] = (psutil.Process().num_threads(), groups_made())
    return {"second": seen[1], "last": seen[loads - 1]}
