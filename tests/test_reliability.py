"""Reliability: properties of the pure parts (hypothesis), flat memory under repeated use,
8 ranks on 2 cores, offline loading."""
import gc
import os
import subprocess
import sys

import psutil
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bodies
import tiny_models
from helpers import ids as _ids
from toolkit.attention.kernels import attention_with_lse, merge_many
from toolkit.attention.layout import SequenceLayout


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), ring=st.integers(1, 5), ulysses=st.integers(1, 4),
       kind=st.sampled_from(["zigzag", "contiguous"]))
def test_split_then_unsplit_is_identity(n, ring, ulysses, kind):
    layout = SequenceLayout(kind, ring, ulysses)
    x = torch.randn(2, n)
    shards = [layout.split(x, r, u, dim=1) for r in range(ring) for u in range(ulysses)]
    assert torch.equal(layout.unsplit(shards, n, dim=1), x)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=2, max_size=5), order_seed=st.integers(0, 10_000),
       seed=st.integers(0, 10_000))
def test_lse_merge_does_not_depend_on_order(cuts, order_seed, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(cuts)
    q, k, v = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, total, 8, generator=gen), torch.randn(1, 2, total, 8, generator=gen)
    bounds = torch.tensor([0] + cuts).cumsum(0).tolist()
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], causal=False) for a, b in zip(bounds, bounds[1:])]
    shuffled = [parts[i] for i in torch.randperm(len(parts), generator=torch.Generator().manual_seed(order_seed))]
    out_a, lse_a = merge_many(parts)
    out_b, lse_b = merge_many(shuffled)
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse_a, lse_b, atol=1e-6, rtol=0)


def test_fifty_generate_calls_keep_memory_flat(tiny_dirs):
    from toolkit import parallelize

    lcm = parallelize(tiny_models.build("qwen2"), chunk_size=32)
    ids = _ids(200, seed=1)
    proc = psutil.Process()
    for _ in range(10):  # warm-up: allocator pools, lazy imports
        lcm.generate(ids, max_new_tokens=8)
    gc.collect()
    warm = proc.memory_info().rss
    for _ in range(50):
        lcm.generate(ids, max_new_tokens=8)
    gc.collect()
    growth = proc.memory_info().rss / warm - 1
    assert growth < 0.05, f"RSS grew {growth:.1%} over 50 generate calls"


def test_eight_ranks_on_two_cores_finish_and_agree(pools, tiny_dirs):
    ids = _ids(70, seed=8)
    want = tiny_models.reference_generate(tiny_models.build("qwen2"), ids, 12)
    got = pools(8).run(bodies.eight_rank_generate, tiny_dirs("qwen2"), ids, 12, timeout=600)
    pools.close_world(8)
    for per_rank in got:
        assert per_rank == [want, want]


def test_local_folder_loads_with_the_network_off(tiny_dirs):
    code = ("from toolkit import LongContextModel; import torch; "
            "m = LongContextModel.from_pretrained(__import__('sys').argv[1], chunk_size=8); "
            "print(len(m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).token_ids))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, tiny_dirs("llama")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("3"), proc.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-c", "from toolkit.models import *; load_config(resolve_source('acme/not-a-model'))"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "cannot find model 'acme/not-a-model'" in missing.stderr


def test_trust_remote_code_is_off_by_default():
    import inspect

    from toolkit import LongContextModel
    from toolkit.loading.build import build_rank_model
    from toolkit.models import load_config, load_tokenizer

    for fn in (LongContextModel.from_pretrained, build_rank_model, load_config, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__


def test_loading_a_model_ten_times_keeps_threads_and_groups_flat(pools, tiny_dirs):
    """Process groups are made once per process: the tenth load of a model (tp=2 through
    DeepSpeed, then ring=2) adds no gloo threads and no groups to what the second left."""
    for case in ({"tp": 2, "ring": 2}, {"ring": 4}):
        for rank in pools(4).run(bodies.threads_over_repeated_loads, tiny_dirs("llama"), 10, case):
            assert rank["last"] == rank["second"], (case, rank)
