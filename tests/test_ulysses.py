"""Ulysses prefill and decode on gloo ranks vs the single-process HF model (same weights)."""
import pytest
import torch

import bodies
import tiny_models

from helpers import LOGITS_ATOL
from helpers import ids as _ids


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
    from toolkit.config import make_run_config

    config = tiny_models.CONFIGS["llama9"]().to_dict()
    with pytest.raises(ValueError, match="valid Ulysses degrees: 1, 3"):
        make_run_config(config, 4, ulysses=4)


def test_degrees_that_do_not_multiply_to_the_world_list_what_fits():
    from toolkit.config import make_run_config

    config = tiny_models.CONFIGS["llama"]().to_dict()  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"world size 4; layouts that fit these heads: tp=1 ulysses=1 ring=4, "
                                         r"tp=1 ulysses=2 ring=2, tp=1 ulysses=4 ring=1, tp=2 ulysses=1 ring=2"):
        make_run_config(config, 4, ulysses=2, ring=3)
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide 4 attention heads; valid sizes: "
                                         "1, 2, 4"):
        make_run_config(config, 3, tp=3)
    assert make_run_config(config, 4, tp=4).dims.tp == 4  # each of the 2 KV heads on two ranks
