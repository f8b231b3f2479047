"""Measured communication equals the closed form to the byte; zigzag balances causal work."""
import pytest

import bodies
from helpers import HEAD_DIMS, sent_by_layer
from helpers import ids as _ids
from toolkit.attention.ring import causal_work_per_rank
from benchmarks.traffic import ring_bytes_per_layer, ulysses_bytes_per_layer

@pytest.mark.parametrize("name,n,chunk", [("llama", 37, 64), ("qwen2", 50, 16)])
def test_ulysses_bytes_equal_closed_form(pools, tiny_dirs, name, n, chunk):
    heads, kv, d = HEAD_DIMS[name]
    for world in (2, 4):
        got = pools(world).run(bodies.comm_bytes_per_layer, tiny_dirs(name), _ids(n), dict(ulysses=world, chunk_size=chunk))
        want = ulysses_bytes_per_layer(n, chunk, world, heads, kv, d, elem=4)
        for per_rank in got:
            assert sent_by_layer(per_rank, ("ulysses",)) == {0: want, 1: want}


def test_ulysses_moves_q_k_v_in_one_all_to_all_and_the_output_in_another(pools, tiny_dirs):
    n, chunk = 40, 16  # three chunks
    got = pools(2).run(bodies.comm_calls_per_layer, tiny_dirs("llama"), _ids(n), dict(ulysses=2, chunk_size=chunk))
    for per_rank in got:
        assert {k: v for k, v in per_rank.items() if k[0] == "ulysses"} == {("ulysses", 0): 6, ("ulysses", 1): 6}


@pytest.mark.parametrize("mode", ["pass-kv", "pass-q"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_bytes_equal_closed_form(pools, tiny_dirs, mode, layout):
    heads, kv, d = HEAD_DIMS["llama"]
    n, chunk, world = 45, 16, 3  # three chunks: pass-kv hops carry growing, unequal cache shards
    case = dict(ring=world, chunk_size=chunk, ring_mode=mode, sequence_layout=layout)
    got = pools(world).run(bodies.comm_bytes_per_layer, tiny_dirs("llama"), _ids(n), case)
    for me, per_rank in enumerate(got):
        want = ring_bytes_per_layer(n, chunk, world, heads, kv, d, 4, mode, me, layout=layout)
        assert sent_by_layer(per_rank, ("ring_kv", "ring_q", "ring_q_out")) == {0: want, 1: want}


def test_hybrid_bytes_equal_closed_form(pools, tiny_dirs):
    heads, kv, d = HEAD_DIMS["qwen2"]
    n, chunk = 40, 24
    got = pools(4).run(bodies.comm_bytes_per_layer, tiny_dirs("qwen2"), _ids(n),
                       dict(ulysses=2, ring=2, chunk_size=chunk, ring_mode="pass-kv"))
    for rank, per_rank in enumerate(got):
        me = rank // 2  # ring rank: ulysses is the inner degree
        want_u = ulysses_bytes_per_layer(n, chunk, 2, heads, kv, d, 4, ring=2)
        want_r = ring_bytes_per_layer(n, chunk, 2, heads, kv, d, 4, "pass-kv", me, ulysses=2)
        assert sent_by_layer(per_rank, ("ulysses",)) == {0: want_u, 1: want_u}
        assert sent_by_layer(per_rank, ("ring_kv",)) == {0: want_r, 1: want_r}


@pytest.mark.parametrize("ring", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_and_contiguous_does_not(ring):
    zig = causal_work_per_rank(65536, ring, zigzag=True)
    con = causal_work_per_rank(65536, ring, zigzag=False)
    assert sum(zig) == pytest.approx(sum(con))  # same total work, different split
    assert max(zig) / (sum(zig) / ring) <= 1.05
    assert max(con) / (sum(con) / ring) >= 2 * ring / (ring + 1) - 0.01  # last rank does ~2R/(R+1) of the mean
