"""Elastic placement's scheduling, alone (pure Python): the blocks of SP ranks a request may
run on, per-rank pools that charge a request on d of D ranks D/d blocks per block of positions,
the least-loaded choice, and the rule that keeps a long request from starving: admission is
first come, first served, so a request that needs every rank waits only for the requests
already running to finish (or be preempted), never for ones that came after it."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.distributed.placement import Placement, block_ranks, placements
from toolkit.engine.blocks import blocks_for
from toolkit.engine.placed_pool import PlacedPool, Placer
from toolkit.engine.scheduler import Scheduler
from toolkit.planner import load_hardware, load_model_dims
from toolkit.planner.elastic import DegreeModel


def test_blocks_are_aligned_layouts_of_the_launched_one():
    assert placements(2, 2) == [Placement(1, 1, 0), Placement(1, 1, 1), Placement(1, 1, 2), Placement(1, 1, 3),
                                Placement(2, 1, 0), Placement(2, 1, 2), Placement(2, 2, 0)]
    assert [p.degree for p in placements(1, 8)] == [1] * 8 + [2] * 4 + [4] * 2 + [8]
    # tp=2 x ulysses=2 x ring=2: SP rank s, TP slot t is global rank 2s + t; ring-major inside a block
    full = Placement(2, 2, 0)
    assert block_ranks(full, "ulysses", 2, 1, 3) == [5, 7] and block_ranks(full, "ring", 2, 1, 3) == [3, 7]
    assert block_ranks(Placement(2, 1, 2), "ulysses", 2, 0, 3) == [4, 6]
    assert block_ranks(Placement(1, 2, 2), "ring", 1, 0, 3) == [2, 3]
    assert block_ranks(Placement(1, 1, 3), "sp", 1, 0, 3) == [3]


def test_a_request_on_fewer_ranks_holds_more_of_each():
    pool = PlacedPool(16, 16, placements(1, 4))
    pool.place(1, Placement(1, 1, 2))  # one of four ranks: each position costs it four times as much
    pool.grow(1, 17)
    assert [p.used for p in pool.pools] == [0, 0, 8, 0]
    assert pool.fits(1, 64) and not pool.fits(1, 65)  # 16 blocks: 4 positions-blocks on one rank of four
    pool.place(2, Placement(1, 4, 0))
    pool.grow(2, 33)
    assert [p.used for p in pool.pools] == [3, 3, 11, 3]
    assert pool.shares(1, 2) and pool.release(1) == 8 and pool.free == 13 and pool.used == 3


def _placer(sp, degree_for, num_blocks=64):
    pool = PlacedPool(num_blocks, 16, placements(1, sp))
    return pool, Placer(pool, degree_for)


def test_short_requests_spread_over_the_ranks_and_long_ones_span_what_they_need():
    pool, placer = _placer(4, lambda prompt, new, loaded: 1 if prompt < 100 else 4)
    sched = Scheduler(pool, 512, 8, 256, placer)
    for rid in range(8):
        sched.add(rid, 50, 8)
    sched.add(8, 500, 8)
    plan = sched.schedule()
    assert [sched.placement(rid).first for rid in plan.admitted] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert sched.placement(8).degree == 4
    # each rank's step budget (256 with nothing decoding) holds its own two chats; the long prompt takes
    # what is left on the fullest of its ranks
    assert [n for rid, _, n in plan.prefill] == [50] * 8 + [256 - 100]
    # a request too big for one rank's pool at the degree asked for gets more ranks
    assert placer.degree(10, 20) == 1 and placer.degree(10, 10 + 16 * 20) == 2 and placer.degree(10, 10 + 16 * 40) == 4


def test_a_request_reading_a_shared_prefix_runs_where_the_prefix_lies():
    pool, placer = _placer(2, lambda prompt, new, loaded: 1)
    home = Placement(1, 1, 1)
    assert placer.choices(10, 20, home) == [home]


def _drive(sched: Scheduler, arrivals: list[tuple[int, int, int, int]], max_steps: int = 4000) -> dict[int, tuple]:
    """arrivals: (step, rid, prompt, answer) -> rid: (first step admitted, step finished). Checks, each step,
    every rank's pool and its running requests as the engine relies on them."""
    pool, pending, left = sched.pool, sorted(arrivals), {rid: n for _, rid, _, n in arrivals}
    seen, step = {}, 0
    while pending or not sched.idle:
        while pending and pending[0][0] <= step:
            _, rid, prompt, answer = pending.pop(0)
            sched.add(rid, prompt, answer)
        decoding = {t.rid for t in sched.running if t.tokens - t.computed == 1}
        plan = sched.schedule()
        assert decoding - set(plan.decode) <= set(plan.preempted), "a decoding request was held up"
        for rid in plan.admitted:
            seen.setdefault(rid, [step, None])
        for r, rank_pool in enumerate(pool.pools):
            assert rank_pool.used + rank_pool.free == rank_pool.num_blocks
            on_rank = [t for t in sched.running if r in pool.where[t.rid].members]
            assert len(on_rank) <= sched.max_running
            assert sum(rank_pool.held(t.rid) for t in on_rank) == rank_pool.used, "blocks held by no running request"
            for t in on_rank:
                share = pool.sp // pool.where[t.rid].degree
                assert rank_pool.held(t.rid) >= blocks_for(t.own(t.computed), pool.block_size) * share
        for rid in plan.decode + [r for r, _, _ in plan.prefill]:
            if sched.ready(rid):
                left[rid] -= 1
                if left[rid] == 0:
                    sched.finish(rid)
                    seen[rid][1] = step
                else:
                    sched.appended(rid)
        step += 1
        assert step < max_steps, "the requests never finished"
    assert all(p.free == p.num_blocks for p in pool.pools)
    return {rid: tuple(v) for rid, v in seen.items()}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4]), st.integers(8, 40), st.integers(1, 6),
       st.lists(st.tuples(st.integers(0, 30), st.integers(1, 200), st.integers(1, 12)), min_size=1, max_size=14))
def test_every_request_finishes_and_no_rank_is_overcommitted(sp, num_blocks, max_running, reqs):
    pool = PlacedPool(num_blocks, 8, placements(1, sp))
    sched = Scheduler(pool, 64, max_running, 32, Placer(pool, lambda prompt, new, loaded: 1 if prompt < 60 else 2))
    arrivals = [(at, rid, prompt, new) for rid, (at, prompt, new) in enumerate(reqs)
                if blocks_for(prompt + new, 8) <= num_blocks]  # the rest would be refused at add
    done = _drive(sched, arrivals)
    assert set(done) == {rid for _, rid, _, _ in arrivals}


def test_a_long_request_behind_a_stream_of_short_ones_starts_within_a_bound():
    """Short chats arrive every step, for ever; a long one that needs both ranks arrives among
    them. First come, first served: it waits only for the chats already running (each at most
    its answer's steps), then every later chat waits behind it."""
    pool = PlacedPool(256, 16, placements(1, 2))
    sched = Scheduler(pool, 512, 4, 256, Placer(pool, lambda prompt, new, loaded: 1 if prompt < 100 else 2))
    answer, long_at = 20, 10
    arrivals = [(step, step, 30, answer) for step in range(60)] + [(long_at, 1000, 400, 5)]
    done = _drive(sched, arrivals)
    started = done[1000][0]
    assert started - long_at <= answer + 2, f"the long request waited {started - long_at} steps"
    assert all(done[rid][0] >= started for rid in range(long_at + 1, 60)), "a later chat went ahead of it"


def test_the_cost_model_puts_short_prompts_on_one_rank_and_long_ones_on_more():
    model = DegreeModel(load_model_dims("smollm2-135m"), load_hardware("cpu"), 1, 1, 2, 4096, "float32", "auto")
    degrees = [model(prompt, 64) for prompt in (100, 512, 2048, 8192, 65536)]
    assert degrees[0] == 1 and degrees[-1] == 2 and degrees == sorted(degrees), degrees
    hw = load_hardware("h100-80gb")
    big = DegreeModel(load_model_dims("llama-3.1-70b"), hw, 8, 1, 8, 8192, "bfloat16", "auto")
    assert big(1000, 256) < big(1 << 20, 256) == 8
    # with requests waiting, the degree that costs the ranks least within 2x of the fastest: fewer
    # ranks for a 64K prompt on Llama-3.1-8B, never one whose cache does not fit a device
    small = DegreeModel(load_model_dims("llama-3.1-8b"), hw, 1, 8, 1, None, "bfloat16", "auto")
    idle, loaded = small(65536, 256), small(65536, 256, True)
    times = small.times(65536, 256)
    assert idle == 8 and loaded < idle and times[loaded] <= 2 * min(times.values())
    assert 1 not in small.times(1 << 20, 256) and small(1 << 20, 256, True) >= 2


def test_a_request_with_others_waiting_behind_it_is_placed_for_throughput():
    """degree_for hears whether requests wait behind the one being placed (the last in line does not)."""
    asked = []
    pool, placer = _placer(2, lambda prompt, new, loaded: asked.append(loaded) or (1 if loaded else 2))
    sched = Scheduler(pool, 512, 8, 256, placer)
    for rid in range(3):
        sched.add(rid, 40, 8)
    sched.schedule()
    assert asked == [True, True, False]
    assert [sched.placement(rid).degree for rid in range(3)] == [1, 1, 2]
