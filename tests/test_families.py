"""The model families beyond Llama: each tiny random model, loaded by shares (meta build, slice
reads) in every layout its heads allow at world 1, 2 and 4, against the single-process HF
model: prefill and decode logits within LOGITS_ATOL (eager and the static step), greedy
tokens equal. Phi-3's 37-token prompt passes its original length of 32 in chunks of 16
(LongRoPE must use the long factors everywhere); its qkv_proj and gate_up_proj are fused;
Mixtral and Qwen3-MoE cut their fused experts over TP; qwen2_kv2 has fewer KV heads (2) than
TP ranks (4); mistral_swa and qwen2_swa (use_sliding_window) window their layers as transformers does."""
import pytest
import torch

import bodies
import decode_bodies
import tiny_models
from helpers import DOC, LOGITS_ATOL, MORE, QUESTIONS
from helpers import ids as _ids

NEW = 6
PROMPT = _ids(37, seed=21).tolist()[0]
EVERY = [(1, {}), (2, dict(ulysses=2)), (2, dict(ring=2)), (2, dict(ring=2, ring_mode="pass-q")),
         (4, dict(ulysses=2, ring=2)), (2, dict(tp=2)), (4, dict(tp=2, ring=2)), (2, dict(pp=2))]
CASES = [(name, world, layout) for name in ("phi3", "mixtral", "qwen3_moe") for world, layout in EVERY]
CASES += [("qwen2_kv2", 4, dict(tp=4)), ("qwen2_kv2", 4, dict(tp=2, ulysses=2))]
WINDOWED = [(name, world, layout) for name in ("gemma2", "gemma3") for world, layout in EVERY]
WINDOWED += [("mistral_swa", 1, {}), ("mistral_swa", 2, dict(ring=2)), ("mistral_swa", 4, dict(ulysses=2, ring=2))]
WINDOWED += [("qwen2_swa", 1, {}), ("qwen2_swa", 2, dict(ring=2, ring_mode="pass-q"))]


def label(case):
    name, _, layout = case
    return f"{name}-" + ("-".join(f"{k}{v}" for k, v in layout.items()) or "world1")


@pytest.fixture(scope="module")
def truth():
    """name -> (greedy tokens, logits after the prompt and each token) of the single-process HF model."""
    return lambda name: tiny_models.decode_truth(name, tuple(PROMPT), NEW)


@pytest.mark.parametrize("name,world,layout", CASES, ids=[label(c) for c in CASES])
def test_family_matches_the_single_process_model(pools, tiny_dirs, truth, name, world, layout):
    tokens, logits = truth(name)
    results = pools(world).run(decode_bodies.decode_paths, tiny_dirs(name), dict(layout, chunk_size=16),
                               PROMPT, tokens)
    for rank, got in enumerate(results):
        for mode in ("eager", "static"):
            diff = (got[mode] - logits).abs().max().item()
            assert diff <= LOGITS_ATOL, f"rank {rank} {mode}: logits differ by {diff}"
        assert got["tokens"] == tokens, f"rank {rank}: greedy tokens"


@pytest.mark.parametrize("name,world,layout", WINDOWED, ids=[label(c) for c in WINDOWED])
def test_windowed_and_soft_capped_families_match_the_single_process_model(pools, tiny_dirs, truth, name, world,
                                                                         layout):
    """Sliding windows of 8 positions against a 37-token prompt in chunks of 16: every chunk and
    ring block reads the keys its queries can see by position; Gemma 2 soft-caps every score."""
    tokens, logits = truth(name)
    results = pools(world).run(decode_bodies.decode_paths, tiny_dirs(name), dict(layout, chunk_size=16),
                               PROMPT, tokens, ("eager",))
    for rank, got in enumerate(results):
        diff = (got["eager"] - logits).abs().max().item()
        assert diff <= LOGITS_ATOL, f"rank {rank}: logits differ by {diff}"
        assert got["tokens"] == tokens, f"rank {rank}: greedy tokens"


def test_experts_are_cut_and_kv_heads_replicated_as_the_planner_counts(pools, tiny_dirs):
    """What a rank holds: a TP rank keeps 1/tp of every expert; with 2 KV heads over tp=4 each
    rank keeps (and caches) one KV head."""
    got = pools(2).run(bodies.held_shapes, tiny_dirs("mixtral"), dict(tp=2))
    for rank, shapes in enumerate(got):
        assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == [4, 112, 64], rank  # [E, 2I/2, H]
        assert shapes["model.layers.0.mlp.experts.down_proj"] == [4, 64, 56], rank
    got = pools(4).run(bodies.held_shapes, tiny_dirs("qwen2_kv2"), dict(tp=4))
    for rank, shapes in enumerate(got):
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == [8, 64], rank  # one head of 8
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == [16, 64], rank  # 2 of 8 query heads
        assert shapes["cache_kv_heads"] == 1


def test_a_cache_saved_with_replicated_kv_heads_loads_on_another_layout(pools, tiny_dirs, tmp_path):
    """Saved at tp=4 over 2 KV heads (each rank's file a copy of one head): loaded at ring=2 and
    at world 1, the answers are those of the single-process model."""
    import session_bodies

    doc, questions = _ids(45, seed=3).tolist()[0], [_ids(20, seed=5).tolist()[0]]
    model = tiny_models.build("qwen2_kv2")
    expected = tiny_models.reference_generate(model, torch.tensor([doc + questions[0]]), NEW)
    saved = pools(4).run(session_bodies.ask_after_prefill, tiny_dirs("qwen2_kv2"), dict(tp=4, chunk_size=16),
                         doc, questions, NEW, str(tmp_path / "kv"))
    assert saved[0]["tokens"] == [expected]
    for world, case in ((2, dict(ring=2)), (1, {})):
        for rank, got in enumerate(pools(world).run(session_bodies.ask_after_load, tiny_dirs("qwen2_kv2"),
                                                    dict(case, chunk_size=16), str(tmp_path / "kv"), questions, NEW)):
            assert got["tokens"] == [expected], f"{case} rank {rank}"


@pytest.mark.parametrize("world,case", [(1, {}), (2, dict(ring=2))], ids=["world1", "ring2"])
def test_questions_on_both_sides_of_the_long_rope_switch_decode_as_asked_alone(pools, tiny_dirs, world, case):
    """Phi-3's switch at 32 tokens, a 20-token document: a question whose answer stays below it,
    two that cross it (each decodes alone) and two past it (one batch)."""
    doc = _ids(20, seed=3).tolist()[0]
    questions = [_ids(n, seed=n).tolist()[0] for n in (3, 8, 10, 14, 16)]
    for rank, got in enumerate(pools(world).run(decode_bodies.asked_around_a_rope_switch, tiny_dirs("phi3"),
                                                dict(case, chunk_size=16), doc, questions, NEW)):
        assert got["together"] == got["alone"], f"rank {rank}"
        # one batch: the engine runs each step's rows by the rotary table their positions need
        assert got["sizes"] == [len(questions)] * len(questions), f"rank {rank}"


@pytest.mark.parametrize("name,world,layout,doc_len", [("gemma2", 1, {}, 45), ("gemma3", 2, dict(ring=2), 45),
                                                       ("gemma2", 2, dict(ulysses=2), 45), ("gemma2", 1, {}, 4),
                                                       ("gemma3", 2, dict(ring=2), 4)],
                         ids=["gemma2-world1", "gemma3-ring2", "gemma2-ulysses2", "gemma2-world1-short",
                              "gemma3-ring2-short"])
def test_windowed_questions_decoded_together_equal_separate_asks(pools, tiny_dirs, name, world, layout, doc_len):
    """ask_many on a windowed, soft-capped model: each row reads the document keys its own window
    holds (rows do not share a mask), greedy and sampled, rows ending at different steps. After a
    4-token document the rows straddle the window of 8 (the 3-token question's row starts inside
    it, the 20-token one's past it): the window must still hold for the rows past it."""
    for rank, got in enumerate(pools(world).run(decode_bodies.asked_together, tiny_dirs(name),
                                                dict(layout, chunk_size=16), DOC[:doc_len], MORE, NEW)):
        assert got["together"] == got["alone"] and got["pairs"] == got["alone"], f"rank {rank}"
        assert got["together_sampled"] == got["alone_sampled"], f"rank {rank}"


@pytest.mark.parametrize("world,layout", [(1, {}), (2, dict(ring=2)), (2, dict(ulysses=2))],
                         ids=["world1", "ring2", "ulysses2"])
def test_sliding_layers_keep_only_their_window(pools, tiny_dirs, truth, world, layout):
    """After a 37-token prompt (chunks of 16) and 6 new tokens, the last forward was the token at
    position 41: a sliding layer (window 8) holds positions 34..41 over all ring shards, a global
    layer all 42, and the sliding layers' buffers stay the size of a window and a chunk."""
    tokens, _ = truth("gemma3")
    got = pools(world).run(bodies.held_after_generate, tiny_dirs("gemma3"), dict(layout, chunk_size=16),
                           torch.tensor([PROMPT]), NEW)
    last = len(PROMPT) + NEW - 2
    for layer, kind in enumerate(got[0]["layer_types"]):
        rings = got if "ring" in layout else got[:1]  # Ulysses ranks hold the same positions
        held = sorted(p for rank in rings for p in rank["positions"][layer])
        if kind == "sliding_attention":
            assert held == list(range(last - 8 + 1, last + 1)), layer
            assert all(rank["capacity"][layer] <= 2 * (8 + 16) for rank in got), layer
        else:
            assert held == list(range(last + 1)), layer
    assert all(rank["tokens"] == tokens for rank in got)


def test_a_windowed_cache_saved_on_one_layout_answers_on_others(pools, tiny_dirs, tmp_path):
    """Gemma 3's sliding layers save only their last keys (the manifest says which): loaded on
    other layouts, answers equal the single-process model's."""
    import session_bodies

    model = tiny_models.build("gemma3")
    expected = [tiny_models.reference_generate(model, torch.tensor([DOC + q]), NEW) for q in QUESTIONS]
    saved = pools(2).run(session_bodies.ask_after_prefill, tiny_dirs("gemma3"), dict(ring=2, chunk_size=16),
                         DOC, QUESTIONS, NEW, str(tmp_path / "kv"))
    assert saved[0]["tokens"] == expected
    import json

    manifest = json.loads((tmp_path / "kv" / "manifest.json").read_text())
    assert manifest["evicted"] == {"0": 24, "2": 24}  # the last chunk started at 32: keys <= 32 - 8 went
    for world, case in ((1, {}), (2, dict(ulysses=2))):
        for rank, got in enumerate(pools(world).run(session_bodies.ask_after_load, tiny_dirs("gemma3"),
                                                    dict(case, chunk_size=16), str(tmp_path / "kv"), QUESTIONS, NEW)):
            assert got["tokens"] == expected, f"{case} rank {rank}"
