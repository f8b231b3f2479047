"""Elastic sequence parallelism: each request runs on the block of SP ranks its length needs,
and its answer is its single-process answer whatever block it got and whatever ran beside it."""
import pytest
import torch

import elastic_bodies
from helpers import LOGITS_ATOL

NEW = 12
_BASE = [int(t) for t in torch.randint(0, 96, (97,), generator=torch.Generator().manual_seed(3))]
# short ones (one SP rank), medium (two), long (all); repeats make prompt lookup guess
PROMPTS = [_BASE[:9], _BASE[5:17] * 2, _BASE[:40], _BASE[10:13] * 5, _BASE, _BASE[20:52], _BASE[1:8], _BASE[::-1]]
POLICY = (20, 60)
SETTINGS = dict(kv_blocks=64, block_tokens=16, max_running=4)
LAYOUTS = [(2, dict(ring=2), SETTINGS), (2, dict(ulysses=2), SETTINGS), (4, dict(ulysses=2, ring=2), SETTINGS),
           (4, dict(tp=2, ring=2), SETTINGS),
           (2, dict(ring=2), dict(SETTINGS, kv_blocks=12))]  # a pool too small for all at once: preemptions


@pytest.fixture(scope="module")
def single(pools, tiny_dirs):
    return pools(1).run(elastic_bodies.placed_runs, tiny_dirs("llama"), dict(chunk_size=16), PROMPTS, NEW, None,
                        SETTINGS)[0]


@pytest.mark.parametrize("world,layout,settings", LAYOUTS,
                         ids=["ring2", "ulysses2", "ulysses2-ring2", "tp2-ring2", "ring2-preempting"])
def test_every_request_gets_its_single_process_answer_on_its_block(pools, tiny_dirs, single, world, layout, settings):
    results = pools(world).run(elastic_bodies.placed_runs, tiny_dirs("llama"), dict(layout, chunk_size=16), PROMPTS,
                               NEW, POLICY, settings)
    sp = layout.get("ulysses", 1) * layout.get("ring", 1)
    main = results[0]
    for mode in ("off", "ngram:3"):
        placed = main[mode + "_placed"]
        for prompt, ranks in zip(PROMPTS, placed):
            wanted = 1 if len(prompt) < POLICY[0] else min(2, sp) if len(prompt) < POLICY[1] else sp
            if settings["kv_blocks"] < SETTINGS["kv_blocks"]:  # more ranks where one rank's pool is too small
                wanted = max(wanted, 2 if -(-(len(prompt) + NEW) // 16) * 2 > settings["kv_blocks"] else 1)
            assert len(ranks) == wanted, f"a {len(prompt)}-token prompt ran on SP ranks {ranks}"
        assert any(r[0] != 0 for r in placed), f"no request ran without rank 0: {placed}"
        for i in range(len(PROMPTS)):
            got, want = torch.stack(main[mode + "_logits"][i]), torch.stack(single["off_logits"][i])
            diff = (got - want).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{mode}: prompt {i} on SP ranks {placed[i]}: logits differ by {diff}"
        for rank, got in enumerate(results):
            assert got[mode] == single["off"], f"rank {rank} ({mode}): greedy tokens differ from one process's"
    assert (main["preemptions"] > 0) == (settings["kv_blocks"] < SETTINGS["kv_blocks"]), main["preemptions"]
    for rank, got in enumerate(results):
        assert got["groups_after"] == 0, f"rank {rank}: admitting requests made process groups"
        assert got["states_left"] == 0


def test_a_prefix_shared_on_another_rank_is_read_there(pools, tiny_dirs, single):
    """Rank 0 holds only the prefix's id and length; the request reading it is placed where its keys
    lie, and its answer is the single-process answer to the whole prompt. One that one rank's pool
    could never hold does not read it (it would wait for ever): it computes its whole prompt."""
    filler, prompt, more = PROMPTS[0], PROMPTS[5], PROMPTS[6]
    much_more = _BASE * 6  # 582 tokens: 39 blocks of 16 on both ranks, 78 on one (the pool has 64)
    results = pools(2).run(elastic_bodies.prefix_on_another_rank, tiny_dirs("llama"), dict(ring=2, chunk_size=16),
                           filler, prompt, more, much_more, NEW)
    alone, big = pools(1).run(elastic_bodies.placed_runs, tiny_dirs("llama"), dict(chunk_size=16),
                              [prompt + more, prompt + much_more], NEW, None, SETTINGS)[0]["off"]
    for rank, got in enumerate(results):
        assert got["prompt_ranks"] == [[0], [1]] and got["ranks"] == [1], got
        assert got["tokens"] == alone, f"rank {rank}: the answer read by reference differs from one process's"
        assert got["first"] == [single["off"][0], single["off"][5]]
        assert got["holds_keys"] == (rank == 1), f"rank {rank} holds keys it does not serve"
        assert got["big"] == big and got["big_ranks"] == [0, 1]
        assert got["states_left"] == 0
    assert results[0]["big_shared"] == 0  # rank 0's request: it read no prefix
