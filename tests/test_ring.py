"""Ring attention (pass-KV, pass-Q, zigzag, contiguous), hybrid Ulysses x ring, sharded decode."""
import pytest
import torch

import bodies
import tiny_models
from helpers import LOGITS_ATOL
from helpers import ids as _ids


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_ring_prefill_logits_match_single_process(pools, tiny_dirs, world, name):
    ref_model = tiny_models.build(name)
    lengths = [(41, 10), (29, 64), (53, 16)]  # not divisible by 2P; several chunk sizes
    refs = {n: tiny_models.reference_logits(ref_model, _ids(n, seed=n)) for n, _ in lengths}
    for n, chunk in lengths:
        cases = [dict(ring=world, chunk_size=chunk, sequence_layout=layout, ring_mode=mode)
                 for layout in ("zigzag", "contiguous") for mode in ("pass-kv", "pass-q")]
        got = pools(world).run(bodies.prefill_logits, tiny_dirs(name), _ids(n, seed=n), cases)
        for rank, per_rank in enumerate(got):
            for case, logits in zip(cases, per_rank):
                torch.testing.assert_close(logits, refs[n], atol=LOGITS_ATOL, rtol=0,
                                           msg=lambda m: f"{name} world={world} n={n} {case} rank={rank}: {m}")


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hybrid_ulysses_by_ring_at_world_4(pools, tiny_dirs, name):
    ref_model = tiny_models.build(name)
    ids = _ids(45, seed=11)
    want = tiny_models.reference_logits(ref_model, ids)
    cases = [dict(ulysses=2, ring=2, chunk_size=c, ring_mode=m) for c in (12, 45) for m in ("pass-kv", "pass-q")]
    for per_rank in pools(4).run(bodies.prefill_logits, tiny_dirs(name), ids, cases):
        for logits in per_rank:
            torch.testing.assert_close(logits, want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("world,case", [
    (2, dict(ring=2)), (4, dict(ring=4)), (4, dict(ulysses=2, ring=2)), (3, dict(ring=3, sequence_layout="contiguous")),
])
def test_ring_greedy_32_tokens_equal_hf_generate(pools, tiny_dirs, world, case):
    ref_model = tiny_models.build("llama")
    ids = _ids(45, seed=7)
    want = tiny_models.reference_generate(ref_model, ids, 32)
    got = pools(world).run(bodies.greedy_tokens, tiny_dirs("llama"), ids, 32, [dict(chunk_size=16, **case)])
    for rank, per_rank in enumerate(got):
        assert per_rank[0] == want, f"rank {rank} {case}"


@pytest.mark.parametrize("world,case", [(3, dict(ring=3)), (4, dict(ulysses=2, ring=2))])
def test_sharded_cache_decode_logits_16_steps(pools, tiny_dirs, world, case):
    ref_model = tiny_models.build("mistral")
    ids = _ids(31, seed=3)
    tokens = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    want = tiny_models.reference_decode_logits(ref_model, ids, tokens)
    got = pools(world).run(bodies.forced_decode_logits, tiny_dirs("mistral"), ids, tokens, dict(chunk_size=8, **case))
    for per_rank in got:
        torch.testing.assert_close(per_rank, want, atol=LOGITS_ATOL, rtol=0)


def test_heads_that_do_not_divide_run_on_the_ring(pools, tiny_dirs):
    """6 heads / 3 KV heads on 4 ranks: Ulysses can't, the default layout falls to ring."""
    ref_model = tiny_models.build("llama9")
    ids = _ids(33, seed=2)
    want = tiny_models.reference_logits(ref_model, ids)
    for per_rank in pools(4).run(bodies.prefill_logits, tiny_dirs("llama9"), ids, [dict(chunk_size=9)]):
        torch.testing.assert_close(per_rank[0], want, atol=LOGITS_ATOL, rtol=0)


def test_ring_mode_rule_follows_meta():
    from toolkit.attention.ring import choose_ring_mode

    # Llama3-405B heads (128 / 8 KV): threshold 2*8/128 = 0.125 (arXiv:2411.01783, Alg. 1)
    assert choose_ring_mode("auto", 1000, 0, 128, 8) == "pass-kv"
    assert choose_ring_mode("auto", 1000, 7000, 128, 8) == "pass-kv"  # 0.125: not below
    assert choose_ring_mode("auto", 1000, 9000, 128, 8) == "pass-q"
    assert choose_ring_mode("pass-kv", 1, 10**6, 128, 8) == "pass-kv"  # an override wins


def test_auto_mode_switches_to_pass_q_once_the_cache_dominates(pools, tiny_dirs):
    """tiny qwen2: 8 heads / 2 KV heads, threshold 0.5: chunk 1 pass-KV, chunks 3+ pass-Q."""
    counts = pools(2).run(bodies.comm_bytes_per_layer, tiny_dirs("qwen2"), _ids(64, seed=1),
                          dict(ring=2, chunk_size=16, ring_mode="auto"))[0]
    tags = {tag for tag, _layer in counts}
    assert {"ring_kv", "ring_q"} <= tags
