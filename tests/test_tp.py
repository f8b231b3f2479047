"""DeepSpeed AutoTP, alone and composed with Ulysses and ring (TP x SP), vs single process."""
import pytest
import torch

import bodies
import tiny_models
from helpers import RankPool
from helpers import LOGITS_ATOL
from helpers import ids as _ids
from toolkit.distributed.topology import ParallelDims


def test_tp_2_logits_and_greedy_tokens(pools, tiny_dirs):
    ref = tiny_models.build("qwen2")
    ids = _ids(37, seed=4)
    want_logits = tiny_models.reference_logits(ref, ids)
    want_tokens = tiny_models.reference_generate(ref, ids, 32)
    for per_rank in pools(2).run(bodies.prefill_logits, tiny_dirs("qwen2"), ids, [dict(tp=2, chunk_size=10)]):
        torch.testing.assert_close(per_rank[0], want_logits, atol=LOGITS_ATOL, rtol=0)
    for per_rank in pools(2).run(bodies.greedy_tokens, tiny_dirs("qwen2"), ids, 32, [dict(tp=2, chunk_size=16)]):
        assert per_rank[0] == want_tokens


@pytest.mark.parametrize("sp", [dict(ulysses=2), dict(ring=2)])
def test_tp_by_sp_at_world_4_matches(pools, tiny_dirs, sp):
    """tp=2 x sp=2 on 4 CPU ranks: DeepSpeed's world-wide CPU all-reduce would sum SP ranks too."""
    ref = tiny_models.build("llama")
    ids = _ids(41, seed=6)
    want_logits = tiny_models.reference_logits(ref, ids)
    want_tokens = tiny_models.reference_generate(ref, ids, 32)
    got = pools(4).run(bodies.prefill_logits, tiny_dirs("llama"), ids, [dict(tp=2, chunk_size=12, **sp)])
    for per_rank in got:
        torch.testing.assert_close(per_rank[0], want_logits, atol=LOGITS_ATOL, rtol=0)
    for per_rank in pools(4).run(bodies.greedy_tokens, tiny_dirs("llama"), ids, 32, [dict(tp=2, chunk_size=16, **sp)]):
        assert per_rank[0] == want_tokens


def test_world_wide_shm_allreduce_is_switched_off_when_tp_is_smaller(pools):
    for rank, probe in enumerate(pools(4).run(bodies.tp_trap_probe)):
        assert probe["disabled"]
        assert probe["value"] == (3.0 if rank < 2 else 7.0), "summed over the TP pair only"


def test_run_config_keeps_tp_inside_a_node():
    from toolkit.config import make_run_config

    dims = ParallelDims(tp=2, ring=2)
    for group in dims.group_ranks("tp"):
        assert group[0] // 2 == group[-1] // 2, f"TP group {group} spans nodes of 2 ranks"
    config = tiny_models.CONFIGS["llama"]().to_dict()  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="TP=2 x Ulysses=2 = 4 GPUs spans 2 nodes of 2"):
        make_run_config(config, 4, ranks_per_node=2, tp=2, ulysses=2)
    config = tiny_models.CONFIGS["mistral"]().to_dict()  # 8 heads, 4 KV heads
    with pytest.raises(ValueError, match="TP=4 spans 2 nodes of 2 GPUs"):
        make_run_config(config, 4, ranks_per_node=2, tp=4)


def test_topology_from_launcher_env_with_2_ranks_per_node():
    pool = RankPool(4, env={"LOCAL_WORLD_SIZE": "2"})
    try:
        for rank, groups in enumerate(pool.run(bodies.topology_groups)):
            assert groups["ranks_per_node"] == 2
            assert groups["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
            assert groups["ring"] == [rank % 2, rank % 2 + 2]
        messages = pool.run(bodies.run_config_refusal)
        assert all("TP=4 spans 2 nodes of 2 GPUs" in m for m in messages), messages
    finally:
        pool.close()
