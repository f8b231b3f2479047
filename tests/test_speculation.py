"""Speculation (toolkit.engine.speculation): guesses checked in the engine's decode step give
exactly the answers of plain decode, in every layout, greedy and sampled; a guessed step whose
guesses were wrong leaves the cache as plain decode leaves it."""
import pytest
import torch

import engine_bodies
from helpers import ENGINE_LAYOUTS, LOGITS_ATOL, layout_ids
from toolkit.engine.speculation import Drafter, prompt_lookup
from toolkit.options import parse_speculate

NEW = 24
# repeated stretches make prompt lookup guess: right where the answer loops or copies, wrong where it
# turns; the last prompt ends on a pair seen earlier, so its first guesses are what followed that pair
_BASE = [int(t) for t in torch.randint(0, 96, (19,), generator=torch.Generator().manual_seed(0))]
PROMPTS = [_BASE * 3, _BASE[:6] * 4 + _BASE, _BASE[7:] + _BASE[:11] * 2 + [3], _BASE[:12] + _BASE[3:5]]
LAYOUTS = ENGINE_LAYOUTS + [(1, "gemma2", {}), (2, "gemma2", dict(ring=2))]  # gemma2: a window of 8, soft-capping
NAMES = layout_ids(LAYOUTS)


@pytest.mark.parametrize("world,name,layout", LAYOUTS, ids=NAMES)
def test_guessed_decode_equals_plain_decode(pools, tiny_dirs, world, name, layout):
    results = pools(world).run(engine_bodies.guessed_and_plain, tiny_dirs(name), dict(layout, chunk_size=16),
                               PROMPTS, NEW)
    main = results[0]
    for i in range(len(PROMPTS)):
        got, plain = torch.stack(main["together_logits"][i]), torch.stack(main["plain_logits"][i])
        assert got.shape == plain.shape
        diff = (got - plain).abs().max().item()
        assert diff <= LOGITS_ATOL, f"prompt {i}: logits with guesses differ from plain decode by {diff}"
    drafted = sum(s["drafted"] for s in main["stats"])
    accepted = sum(s["accepted"] for s in main["stats"])
    assert 0 < accepted < drafted, f"guesses must come out both right and wrong (greedy, sampled): {main['stats']}"
    for rank, got in enumerate(results):
        assert got["together"] == got["plain"], f"rank {rank}: greedy tokens with guesses, together"
        assert got["alone"] == got["plain"], f"rank {rank}: greedy tokens with guesses, alone"
        assert got["auto"] == got["plain"], f"rank {rank}: greedy tokens with auto"
        assert got["sampled_guessed"] == got["sampled_plain"], f"rank {rank}: seeded sampling with guesses"
        assert got["states_left"] == 0


@pytest.mark.parametrize("world,draft,layout", [(1, "llama", {}), (2, "llama", dict(ring=2)), (2, "qwen3", dict(ulysses=2))],
                         ids=["world1-itself", "ring2-itself", "ulysses2-qwen3"])
def test_a_draft_models_guesses_give_plain_decodes_answers(pools, tiny_dirs, world, draft, layout):
    """The draft model is the model itself (every guess right but where ties fall apart; sampled, q = p,
    so every guess is kept but for rounding) or another tiny model with the same vocabulary (most
    guesses wrong); rank 0 alone holds it. A sampled request's tokens are the same whatever the
    number of guesses a step and the company (its draws are seeded by position)."""
    results = pools(world).run(engine_bodies.drafted_and_plain, tiny_dirs("llama"), tiny_dirs(draft),
                               dict(layout, chunk_size=16), PROMPTS, NEW)

    def kept(stats):
        return sum(s["drafted"] for s in stats), sum(s["accepted"] for s in stats)

    (drafted, accepted), (sampled, sampled_kept) = kept(results[0]["stats"]), kept(results[0]["sampled_stats"])
    assert drafted > 0 and (accepted > drafted // 2 if draft == "llama" else accepted < drafted), results[0]["stats"]
    assert sampled > 0 and (sampled_kept >= sampled - 2 if draft == "llama" else sampled_kept < sampled), results[0]
    for rank, got in enumerate(results):
        assert got["drafted"] == got["plain"] and got["alone"] == got["plain"], f"rank {rank}: greedy tokens"
        assert got["sampled_drafted"] == got["sampled_one_guess_alone"], f"rank {rank}: seeded sampling"
        assert got["draft_on_this_rank"] == (rank == 0)


def test_a_draft_model_with_other_tokens_is_refused():
    from types import SimpleNamespace

    from toolkit.loading.draft import check_draft_config

    with pytest.raises(ValueError, match="must share the model's tokenizer"):
        check_draft_config(SimpleNamespace(vocab_size=32000), SimpleNamespace(vocab_size=96))


@pytest.mark.parametrize("world,name,layout", [(1, "llama", {}), (2, "llama", dict(ring=2)),
                                               (2, "llama", dict(ulysses=2)), (1, "llama", dict(kv_dtype="int8")),
                                               (1, "gemma2", {}), (2, "gemma2", dict(ring=2))],
                         ids=["world1", "ring2", "ulysses2", "int8", "gemma2-world1", "gemma2-ring2"])
def test_wrong_guesses_leave_the_cache_plain_decode_leaves(pools, tiny_dirs, world, name, layout):
    results = pools(world).run(engine_bodies.cache_after_wrong_guesses, tiny_dirs(name), dict(layout, chunk_size=16),
                               PROMPTS[0][:29], [7, 8, 9], [10, 11, 12, 13])
    for rank, got in enumerate(results):
        plain, guessed = got["lengths"]
        assert plain == guessed, f"rank {rank}: shard lengths {guessed} after rollback, plain decode {plain}"
        assert got["positions"] and got["layers"], f"rank {rank}: keys' positions or layers differ"
        assert not got["old_changed"], f"rank {rank}: the keys before the step changed"
        assert got["new_diff"] <= 1e-5, f"rank {rank}: kept keys differ by {got['new_diff']}"


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    tokens = torch.tensor([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 8, 1, 2, 3])
    # the latest "1 2 3" with three tokens after it; the two before it went on differently (4 9 1, 5 6 7)
    assert prompt_lookup(tokens, 3) == ([5, 6, 7], 6)
    assert prompt_lookup(tokens, 8) == ([4, 9, 1, 2, 3, 5, 6, 7], 6)  # none has 8 after it: the earliest
    assert prompt_lookup(torch.tensor([1, 2, 3, 4]), 3) == ([], 0)  # nothing repeats
    assert prompt_lookup(torch.tensor([7] * 7), 2) == ([7, 7], 9)  # a loop: the last two occurrences agree


def test_speculate_values_are_checked():
    assert parse_speculate("ngram:5").k == 5 and parse_speculate("off").mode == "off"
    assert parse_speculate("draft").k == 4 and parse_speculate("draft:2").mode == "draft"
    for bad in ("ngram:0", "ngram:99", "draft:0", "auto:3", "on", 3):
        with pytest.raises(ValueError, match="allowed values: auto, off, ngram"):
            parse_speculate(bad)


def test_auto_stops_guessing_when_guesses_fail_and_tries_again_later():
    drafter = Drafter(parse_speculate("auto"), [1, 2, 3, 1, 2, 3, 1, 2])
    cost = lambda width: 1.0 if width == 1 else 1.6  # noqa: E731 - a CPU's: any width costs about the same
    assert drafter.propose(10, lambda width: 1.0), "a repeating prompt is guessed at first"
    for _ in range(10):
        drafter.verified(4, 0)
    tries = [len(drafter.propose(10, cost)) for _ in range(200)]
    assert tries[:10] == [0] * 10, "guesses that fail stop"
    assert any(tries), "what failed fades: guessing is tried again"
    drafter.verified(4, 4)
    for _ in range(8):
        drafter.verified(4, 4)
    assert len(drafter.propose(10, cost)) >= 3, "guesses that hold grow"


def test_auto_weighs_guesses_by_what_a_wider_step_costs():
    """Where one guess costs as much as eight (a CPU's matmuls), auto guesses eight, not one; where each
    guess costs a whole step, it does not guess."""
    drafter = Drafter(parse_speculate("auto"), list(range(8)) * 4)
    drafter.propose(16, lambda width: 1.0)
    for _ in range(4):
        drafter.verified(4, 3)
    flat = drafter.propose(16, lambda width: 1.0 if width == 1 else 1.6 if width <= 9 else 2.1)  # measured here
    steep = drafter.propose(16, lambda width: float(width))
    assert len(flat) == 8 and steep == [], (flat, steep)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_with_guesses_draws_from_the_model_distribution():
    """A tiny vocabulary, 4,000 seeds: the first token of a checked step follows p0 whatever the guess,
    and where the guess was kept the next follows p1; an acceptance rule that keeps a guess too
    often (min(1, 2p)) fails the same test. Threshold: chi-square with 4 degrees of freedom at
    p = 0.001 is 18.47."""
    from toolkit.engine.decode import Sampling
    from toolkit.engine.request import Request
    from toolkit.engine.speculation import choose_checked

    p0, p1 = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2]), torch.tensor([0.4, 0.05, 0.25, 0.1, 0.2])
    rows = torch.stack([p0.log(), p1.log()])  # [S=2, V=5]: after the token, after the guess
    guess = 3
    first, second = torch.zeros(5), torch.zeros(5)
    wrong = torch.zeros(5)
    for seed in range(4000):
        request = Request([0], 2, Sampling(do_sample=True, seed=seed))
        taken = []
        choose_checked(request, rows, [guess], lambda token: taken.append(token) or request.output.append(token) or token)
        first[taken[0]] += 1
        if len(taken) == 2:
            second[taken[1]] += 1
        g = torch.Generator().manual_seed(seed)  # a wrong rule: keep the guess with probability min(1, 2 p)
        keep = torch.rand((), generator=g) < min(1.0, 2 * float(p0[guess]))
        wrong[guess if keep else int(torch.multinomial(p0, 1, generator=g))] += 1
    assert _chi_square(first, p0) < 18.47, first
    assert second.sum() > 500 and _chi_square(second, p1) < 18.47, second
    assert _chi_square(wrong, p0) > 18.47, "the test must tell a wrong acceptance rule"


def test_the_fixed_shape_decode_step_takes_no_guesses():
    """static and CUDA-graph decode take one token a step: auto does not guess there, ngram is refused."""
    from types import SimpleNamespace

    from toolkit.api import LongContextModel
    from toolkit.config import RunConfig

    def lcm(speculate="auto", mode="eager", draft=False):
        return SimpleNamespace(run=RunConfig(speculate=speculate), decode_mode=mode, has_draft=draft)

    for mode in ("static", "cuda-graph"):
        assert not LongContextModel.speculation(lcm(mode=mode)).on
        with pytest.raises(ValueError, match="cannot check guesses"):
            LongContextModel.speculation(lcm("ngram:3", mode))
    assert LongContextModel.speculation(lcm(), "ngram:5").k == 5
    with pytest.raises(ValueError, match="give --draft-model"):
        LongContextModel.speculation(lcm("draft"))
    assert LongContextModel.speculation(lcm("draft:2", draft=True)).k == 2


def test_a_draft_models_cache_keeps_its_sink_and_a_recent_window():
    """However long the text, the draft reads at most sink + window tokens to guess a position: the
    first few and a window that moves by half its length, by the position alone; each guess is its
    greedy token after them."""
    import tiny_models
    from toolkit.engine.draft_model import DraftModelDrafter

    model = tiny_models.build("llama")
    prompt = _BASE * 2
    drafter = DraftModelDrafter(parse_speculate("draft:3"), prompt, model, sink=2, window=16)
    for step in range(30):
        guesses = drafter.propose(3)
        for i, guess in enumerate(guesses):
            seq = drafter.tokens + guesses[:i]
            start = drafter._window_start(len(seq))
            assert len(seq) - start <= 16 and (start - 2) % 8 == 0, (step, i, start)
            assert guess == tiny_models.reference_generate(model, torch.tensor([seq[:2] + seq[start:]]), 1)[0], (step, i)
        drafter.add(guesses[0] if step % 3 else (guesses[0] + 1) % 96)  # now and then a token it did not guess


def test_speculative_sampling_with_a_draft_draws_from_the_model_distribution():
    """A tiny vocabulary, 4,000 seeds: keeping a guess drawn from q with min(1, p/q), else drawing from
    max(0, p - q), gives tokens that follow p; keeping it with min(1, p) (the one-token rule, wrong
    for a guess drawn from q) fails the same test. Chi-square, 4 degrees of freedom, p = 0.001: 18.47."""
    from toolkit.engine.draft_model import keep_or_redraw, position_generator

    p, q = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2]), torch.tensor([0.4, 0.05, 0.05, 0.3, 0.2])
    right, wrong = torch.zeros(5), torch.zeros(5)
    for seed in range(4000):
        guess = int(torch.multinomial(q, 1, generator=position_generator(seed, 9, 0)))
        right[keep_or_redraw(p, q, guess, position_generator(seed, 9, 1))] += 1
        g = position_generator(seed, 9, 1)
        keep = torch.rand((), generator=g) < p[guess]
        wrong[guess if keep else int(torch.multinomial((p - q).clamp_min(0), 1, generator=g))] += 1
    assert _chi_square(right, p) < 18.47, right
    assert _chi_square(wrong, p) > 18.47, "the test must tell a wrong acceptance rule"


@pytest.mark.parametrize("world,layout", [(1, {}), (2, dict(ring=2))], ids=["world1", "ring2"])
def test_questions_after_one_document_guess_row_by_row(pools, tiny_dirs, world, layout):
    """ask_many's rows read the document's keys once for all of them and each checks its own guesses
    (rows keep different numbers); every answer is its plain one."""
    document = _BASE * 3
    questions = [_BASE[2:9], _BASE[5:8] + [1], [7, 7, 7]]
    results = pools(world).run(engine_bodies.questions_guessed, tiny_dirs("llama"), dict(layout, chunk_size=16),
                               document, questions, NEW)
    assert results[0]["drafted"] > results[0]["accepted"] > 0
    for rank, got in enumerate(results):
        assert got["guessed"] == got["plain"] and got["alone"] == got["plain"], f"rank {rank}"
