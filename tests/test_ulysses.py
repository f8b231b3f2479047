"""Ulysses prefill and decode on gloo ranks vs the single-process HF model (same weights)."""
import pytest
import torch

import bodies
import tiny_models

# Logits of the tiny models are of unit-to-ten scale; fp32 reordering across ranks and chunks
# moves them by ~1e-6. 1e-4 is tight enough that any masking or cache bug (O(1e-1)) fails.
LOGITS_ATOL = 1e-4


def _ids(n, seed=0, vocab=96):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3"])
def test_ulysses_prefill_logits_match_single_process(pools, tiny_dirs, world, name):
    model_dir = tiny_dirs(name)
    ref_model = tiny_models.build(name)
    # lengths that don't divide the world, chunks that don't divide the prompt
    cases = [(37, 10), (50, 7), (23, 64)]
    for n, chunk in cases:
        ids = _ids(n, seed=n)
        want = tiny_models.reference_logits(ref_model, ids)
        got = pools(world).run(bodies.prefill_logits, model_dir, ids, [dict(ulysses=world, chunk_size=chunk)])
        for rank, per_rank in enumerate(got):
            torch.testing.assert_close(per_rank[0], want, atol=LOGITS_ATOL, rtol=0,
                                       msg=lambda m: f"{name} world={world} n={n} chunk={chunk} rank={rank}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_greedy_32_tokens_equal_hf_generate(pools, tiny_dirs, world):
    ref_model = tiny_models.build("llama")
    ids = _ids(45, seed=7)
    want = tiny_models.reference_generate(ref_model, ids, 32)
    got = pools(world).run(bodies.greedy_tokens, tiny_dirs("llama"), ids, 32, [dict(ulysses=world, chunk_size=16)])
    for rank, per_rank in enumerate(got):
        assert per_rank[0] == want, f"rank {rank}"


def test_ulysses_decode_logits_follow_single_process(pools, tiny_dirs):
    ref_model = tiny_models.build("qwen2")
    ids = _ids(29, seed=3)
    tokens = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    want = tiny_models.reference_decode_logits(ref_model, ids, tokens)
    got = pools(4).run(bodies.forced_decode_logits, tiny_dirs("qwen2"), ids, tokens, dict(ulysses=4, chunk_size=8))
    for per_rank in got:
        torch.testing.assert_close(per_rank, want, atol=LOGITS_ATOL, rtol=0)


def test_ulysses_refuses_heads_that_do_not_divide(tiny_dirs):
    from toolkit.api import resolve_dims

    config = tiny_models.CONFIGS["llama9"]()
    with pytest.raises(ValueError, match="valid Ulysses degrees: 1, 3, 6"):
        resolve_dims(config, 4, ulysses=4)


def test_degrees_that_do_not_multiply_to_the_world_list_what_fits():
    from toolkit.api import resolve_dims

    config = tiny_models.CONFIGS["llama"]()  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"world size 4; layouts that fit these heads: tp=1 ulysses=1 ring=4, "
                                         r"tp=1 ulysses=2 ring=2, tp=1 ulysses=4 ring=1, tp=2 ulysses=1 ring=2"):
        resolve_dims(config, 4, ulysses=2, ring=3)
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide 4 heads and 2 KV heads; valid sizes: 1, 2"):
        resolve_dims(config, 4, tp=4)
