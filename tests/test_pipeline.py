"""Pipeline parallelism: layer stages, chunks as micro-batches, decode through the stages."""
import pytest
import torch

import bodies
import tiny_models
from helpers import LOGITS_ATOL
from helpers import ids as _ids
from toolkit.engine.pipeline import balanced_stages


def test_balanced_stages_split_by_weight():
    assert balanced_stages([1] * 8, 2) == [(0, 4), (4, 8)]
    assert balanced_stages([1] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    # embeddings on the first stage push a layer to the second
    assert balanced_stages([1] * 6, 2, first_extra=2) == [(0, 2), (2, 6)]
    with pytest.raises(ValueError, match="between 1 and the 4 layers"):
        balanced_stages([1] * 4, 5)


@pytest.mark.parametrize("world,case", [(2, dict(pp=2)), (3, dict(pp=3)), (4, dict(pp=2, ring=2)), (4, dict(pp=2, tp=2))])
def test_pipeline_logits_and_32_greedy_tokens(pools, tiny_dirs, world, case):
    ref = tiny_models.build("llama4l")
    ids = _ids(47, seed=12)
    want_logits = tiny_models.reference_logits(ref, ids)
    want_tokens = tiny_models.reference_generate(ref, ids, 32)
    got = pools(world).run(bodies.prefill_logits, tiny_dirs("llama4l"), ids, [dict(chunk_size=8, **case)])
    for per_rank in got:
        torch.testing.assert_close(per_rank[0], want_logits, atol=LOGITS_ATOL, rtol=0)
    for per_rank in pools(world).run(bodies.greedy_tokens, tiny_dirs("llama4l"), ids, 32, [dict(chunk_size=8, **case)]):
        assert per_rank[0] == want_tokens
