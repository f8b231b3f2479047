"""The continuous-batching engine against the single-process model: every request's greedy
tokens and logits are those of its run alone (and of the single-process HF model), whatever
shares its steps, in every layout; sampled requests with a seed give the same tokens alone or
in a crowd; a pool too small for all of them at once preempts and still gives every answer; a
step is one forward, whatever prefill chunks and decode rows it runs."""
import pytest
import torch

import engine_bodies
import tiny_models
from helpers import ENGINE_LAYOUTS, LOGITS_ATOL, layout_ids
from helpers import ids as _ids

NEW = 12
# lengths around the chunk (16): one token, a short one, exactly a chunk, three chunks and a bit
PROMPTS = [_ids(n, seed=20 + n).tolist()[0] for n in (1, 9, 16, 37, 23)]
# blocks of 2 positions: the longest request needs ceil((37 + 12) / 2) = 25 blocks, so 25 hold any
# one alone; the first step admits the three shortest, whose answers then outgrow what is left
TINY_POOL = dict(kv_blocks=25, block_tokens=2, max_batch_tokens=24)
LAYOUTS = ENGINE_LAYOUTS
NAMES = layout_ids(LAYOUTS)


def _truth(name, prompt, tokens):
    model = tiny_models.build(name)
    return tiny_models.reference_decode_logits(model, torch.tensor([prompt]), tokens)[: len(tokens)]


@pytest.fixture(scope="module")
def eos():
    """A token that, as end-of-sequence, ends some answers early (the single-process truth's)."""
    model = tiny_models.build("llama")
    answers = [tiny_models.reference_generate(model, torch.tensor([p]), NEW) for p in PROMPTS]
    lengths = lambda t: {a.index(t) + 1 if t in a else NEW for a in answers}  # noqa: E731
    return next(t for a in answers for t in a if len(lengths(t)) > 1)


@pytest.mark.parametrize("world,name,layout", LAYOUTS, ids=NAMES)
def test_requests_in_a_crowd_equal_their_runs_alone(pools, tiny_dirs, eos, world, name, layout):
    results = pools(world).run(engine_bodies.crowd_and_alone, tiny_dirs(name), dict(layout, chunk_size=16),
                               PROMPTS, NEW, eos if name == "llama" else None, TINY_POOL)
    main = results[0]
    alone = main["alone"]
    if name == "llama":
        assert {len(a) for a in alone} != {NEW}, "the end-of-sequence token must end some answers early"
        assert main["alone_reasons"] == ["stop" if len(a) < NEW or a[-1] == eos else "length" for a in alone]
    quantised = "kv_dtype" in layout
    for i, prompt in enumerate(PROMPTS):
        got, lone = main["together_logits"][i], main["alone_logits"][i]
        assert len(got) == len(alone[i])
        diff = (torch.stack(got) - torch.stack(lone)).abs().max().item()
        assert diff <= LOGITS_ATOL, f"prompt {i}: logits in the crowd differ from alone by {diff}"
        if not quantised:  # the single-process model: a quantised cache is held to its own solo run
            truth = _truth(name, prompt, alone[i])
            diff = (torch.stack(lone) - truth).abs().max().item()
            assert diff <= LOGITS_ATOL, f"prompt {i}: logits alone differ from the single-process model by {diff}"
    for rank, got in enumerate(results):
        assert got["together"] == alone, f"rank {rank}: greedy tokens in a crowd"
        assert got["together_reasons"] == main["alone_reasons"], f"rank {rank}: finish reasons"
        assert got["together_sampled"] == main["alone_sampled"], f"rank {rank}: seeded sampling in a crowd"
        assert got["tiny_pool"] == got["full"], f"rank {rank}: answers through preemption"
        assert got["generate_list"] == alone, f"rank {rank}: generate(list)"
        assert got["states_left"] == 0, f"rank {rank}: a finished request's cache was kept"
        # the crowd's prompts prefill in chunks beside each other and beside decode rows: one forward a step
        assert got["forwards"] <= got["steps"], f"rank {rank}: {got['forwards']} forwards in {got['steps']} steps"
    assert main["preemptions"] > 0, "the tiny pool must force a preemption"
