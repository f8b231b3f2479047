"""The scheduler and its block pool, alone (pure Python): random arrivals, lengths and pool
sizes, each request's answer length drawn in advance, driven step by step as the engine
drives them. What must hold at every step: blocks are never over-committed and every
request's blocks cover its cache; a request that is decoding is never held up by a prompt
(stall-free); a step's tokens stay in the budget; the oldest running request always makes
progress; every request that fits the pool alone finishes; and at the end every block is free."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.engine.blocks import BlockPool, PoolExhausted, blocks_for
from toolkit.engine.pace import MIN_PREFILL_TOKENS, Pace
from toolkit.engine.scheduler import RequestTooLarge, Scheduler


def drive(scheduler: Scheduler, arrivals: dict, answers: dict, prompts: dict, max_steps: int = 5000,
          prefill_budget=None, shared: dict | None = None):
    """Run the scheduler as the engine does -> (steps, per-step plans, tokens generated per request)."""
    generated = {rid: 0 for rid in answers}
    plans, step = [], 0
    pending = sorted(arrivals.items(), key=lambda kv: kv[1])
    while pending or not scheduler.idle:
        while pending and pending[0][1] <= step:
            rid, _ = pending.pop(0)
            scheduler.add(rid, prompts[rid], answers[rid], (shared or {}).get(rid, 0))
        decoding_before = {t.rid for t in scheduler.running if t.tokens - t.computed == 1}
        oldest = scheduler.running[0].rid if scheduler.running else None
        position = scheduler.prefill_position  # what the pace prices the step's chunks at
        plan = scheduler.schedule(prefill_budget)
        plans.append(plan)
        assert all(start <= position for rid, start, _ in plan.prefill if rid not in plan.admitted), \
            "a prompt under way past the furthest position the pace was told"
        pool = scheduler.pool
        assert pool.used + pool.free == pool.num_blocks
        assert sum(len(b) for b in pool.tables.values()) == pool.used
        assert len(set(b for blocks in pool.tables.values() for b in blocks)) == pool.used, "a block given twice"
        for tracked in scheduler.running:
            assert pool.held(tracked.rid) * pool.block_size >= tracked.own(tracked.computed), "a cache outgrew its blocks"
        for tracked in scheduler.waiting:
            assert pool.held(tracked.rid) == 0 and tracked.computed == tracked.shared
        assert len(scheduler.running) <= scheduler.max_running
        # stall-free: whoever was decoding decodes now, unless the pool forced it out
        assert decoding_before - set(plan.decode) <= set(plan.preempted)
        if plan.decode:
            assert plan.tokens <= max(scheduler.max_batch_tokens, len(plan.decode))
        else:
            assert plan.tokens <= scheduler.chunk_tokens
        assert oldest is None or oldest not in plan.preempted, "the oldest running request was preempted"
        for rid in plan.decode + [r for r, _, _ in plan.prefill]:
            if scheduler.ready(rid):
                generated[rid] += 1
                if generated[rid] >= answers[rid]:
                    scheduler.finish(rid)
                else:
                    scheduler.appended(rid)
        step += 1
        assert step < max_steps, "the requests never finished"
    return step, plans, generated


def test_blocks_are_handed_out_and_taken_back():
    pool = BlockPool(4, 16)
    assert pool.grow(7, 17) == [0, 1] and pool.free == 2
    assert pool.grow(7, 32) == [] and pool.missing(7, 33) == 1
    assert pool.grow(8, 30) == [2, 3]
    with pytest.raises(PoolExhausted):
        pool.grow(7, 33)
    assert pool.release(7) == 2 and pool.free == 2 and pool.held(7) == 0
    assert blocks_for(0, 16) == 0 and blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0, 16)


def test_a_request_that_can_never_fit_is_refused_with_the_numbers():
    scheduler = Scheduler(BlockPool(4, 16), 64, 8, 64)
    with pytest.raises(RequestTooLarge, match=r"room for 70 tokens \(60 of prompt \+ 10 new\).*holds 64 \(4 blocks of 16\)"):
        scheduler.add(0, 60, 10)
    assert scheduler.idle and scheduler.pool.free == 4


def test_decoding_requests_keep_going_while_a_long_prompt_prefills():
    """A long prompt arriving while two chats decode is spread over steps; the chats get a token every step."""
    scheduler = Scheduler(BlockPool(1000, 16), 64, 8, 4096)
    prompts, answers = {0: 10, 1: 12, 2: 5000}, {0: 40, 1: 40, 2: 3}
    steps, plans, generated = drive(scheduler, {0: 0, 1: 0, 2: 3}, answers, prompts)
    assert generated == answers
    long_steps = [p for p in plans if any(rid == 2 for rid, _, _ in p.prefill)]
    beside_chats = [p for p in long_steps if p.decode]
    assert len(beside_chats) >= 30, "the long prompt must be spread over the chats' steps"
    for plan in beside_chats:
        assert set(plan.decode) == {0, 1} and plan.tokens <= 64, "a chat was held up by the long prompt"
    # once the chats are done, the rest of the prompt goes a whole chunk a step
    assert [n for p in long_steps if not p.decode for _, _, n in p.prefill] == [5000 - 62 * len(beside_chats)]
    # nothing decoding: a prompt alone takes a whole chunk per step
    alone = Scheduler(BlockPool(1000, 16), 64, 8, 4096)
    _, plans, _ = drive(alone, {0: 0}, {0: 2}, {0: 5000})
    assert [n for p in plans for _, _, n in p.prefill] == [4096, 904]


def test_a_latency_budget_shrinks_the_prefill_share():
    scheduler = Scheduler(BlockPool(1000, 16), 512, 8, 4096)
    _, plans, _ = drive(scheduler, {0: 0, 1: 1}, {0: 30, 1: 2}, {0: 4, 1: 600}, prefill_budget=50)
    shares = [sum(n for rid, _, n in p.prefill if rid == 1) for p in plans if p.decode]
    assert max(shares) <= 50 and sum(shares) >= 550


def test_preemption_takes_the_newest_and_everyone_finishes():
    scheduler = Scheduler(BlockPool(6, 4), 64, 8, 64)  # 24 positions: any one request, never all three
    prompts, answers = {0: 6, 1: 6, 2: 6}, {0: 14, 1: 14, 2: 14}
    _, plans, generated = drive(scheduler, {0: 0, 1: 0, 2: 0}, answers, prompts)
    assert generated == answers
    preempted = [rid for p in plans for rid in p.preempted]
    assert preempted and 0 not in preempted, "the oldest request is never the one preempted"
    assert scheduler.pool.free == scheduler.pool.num_blocks


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_arrivals_all_finish_within_the_pool(data):
    block = data.draw(st.sampled_from([1, 2, 4, 16]))
    n = data.draw(st.integers(1, 8))
    prompts = {i: data.draw(st.integers(1, 80)) for i in range(n)}
    answers = {i: data.draw(st.integers(1, 40)) for i in range(n)}
    shared = {i: data.draw(st.integers(0, prompts[i] - 1)) for i in range(n)}  # a document's tokens, say
    need = max(blocks_for(prompts[i] - shared[i] + answers[i], block) for i in range(n))
    pool = BlockPool(data.draw(st.integers(need, need * 3)), block)
    scheduler = Scheduler(pool, data.draw(st.integers(2, 128)), data.draw(st.integers(1, 6)),
                          data.draw(st.integers(1, 128)))
    arrivals = {i: data.draw(st.integers(0, 30)) for i in range(n)}
    _, plans, generated = drive(scheduler, arrivals, answers, prompts, shared=shared)
    assert generated == answers
    for plan in plans:  # a shared prefix is never computed again, preempted or not
        assert all(start >= shared[rid] for rid, start, _ in plan.prefill)
    assert pool.free == pool.num_blocks and not pool.tables


def test_a_short_prompt_behind_a_long_one_starts_at_once():
    """A chat arriving while a long prompt prefills is admitted the next step (the long prompt
    takes half the step while someone waits), and ends long before the long prompt is in."""
    scheduler = Scheduler(BlockPool(1000, 16), 512, 8, 512)
    _, plans, _ = drive(scheduler, {0: 0, 1: 2}, {0: 2, 1: 2}, {0: 8000, 1: 100})
    admitted = next(i for i, p in enumerate(plans) if 1 in p.admitted)
    long_done = max(i for i, p in enumerate(plans) if any(rid == 0 for rid, _, _ in p.prefill))
    assert admitted == 2 and admitted + 3 < long_done


def test_pace_turns_a_latency_goal_into_a_prefill_budget():
    pace = Pace()
    assert pace.prefill_budget(100.0) is None  # nothing measured yet: no limit
    pace.measure(0, [(0, 1000)], 2.0)          # 2 ms a prefill token
    pace.measure(4, [], 0.04)                  # a decode step of 4 rows: 40 ms
    assert 28 <= pace.prefill_budget(100.0) <= 30  # (100 - 40) ms / 2 ms, one step known
    pace.measure(4, [(0, 30)], 0.04 + 30 * 0.004)  # prefill dearer beside a longer cache: the budget shrinks
    assert pace.prefill_budget(100.0) < 28
    assert pace.prefill_budget(10.0) == MIN_PREFILL_TOKENS  # a goal below a decode step: prompts still progress
    assert pace.prefill_budget(None) is None


def _true_prefill_s(chunks, alone=False, forward=0.05, per_chunk=0.004, per_token=1.5e-3, per_pair=4e-7):
    """A step's prefill as a CPU runs it: a forward of its own when nothing decodes beside it (packed
    with the decode rows otherwise), a call per chunk, its tokens, its attention's pairs."""
    return forward * alone + sum(per_chunk + per_token * n + per_pair * n * (s + n / 2) for s, n in chunks)


def test_pace_keeps_the_goal_through_a_long_prompt_beside_decoding_requests():
    """A long prompt prefills beside 4 decoding requests under a 170 ms goal (decode 55 ms), after
    short chats' prompts prefilled alone: every budgeted step keeps the goal to within a few percent
    (a single rate per token, learnt from the chats, overran the first steps by a quarter and fell
    behind as the prompt's keys grew; a forward's cost learnt from steps of prefill alone, charged
    to chunks packed beside decode rows, kept budgets at half what the goal allows), and no budget
    is far below what the goal allows."""
    pace, decode, goal = Pace(), 0.055, 170.0
    for _ in range(4):
        pace.measure(0, [(0, 100)], _true_prefill_s([(0, 100)], alone=True))  # the chats' own prompts, alone
        pace.measure(4, [], decode)
    position, steps = 0, []
    while position < 8000:
        n = pace.prefill_budget(goal, position)
        took = decode + _true_prefill_s([(position, n)])
        pace.measure(4, [(position, n)], took)
        best = max(m for m in range(1, 600) if decode + _true_prefill_s([(position, m)]) <= goal / 1000)
        steps.append((took, n, best))
        position += n
    for took, n, best in steps[3:]:  # past the floor, where the goal allows fewer tokens than it, a step may overrun
        assert took <= 1.05 * goal / 1000 or best < n == MIN_PREFILL_TOKENS, \
            f"a budget of {n} tokens overran the goal: {took * 1000:.0f} ms"
    assert min(n / best for _, n, best in steps[3:]) >= 0.8, "a budget far below what the goal allows"
