"""Planner rules and choices: every validity rule, rank order, auto layout, errors."""
from pathlib import Path

import pytest

from toolkit.planner import (PlanError, auto_layout, load_hardware, load_model_dims,
                             pipeline_bubble, plan, rank_groups, structural_errors,
                             valid_degrees, validate_layout)
from toolkit.planner.model_dims import ModelDims, list_models, model_dims_from_dict
from toolkit.planner.hardware import list_hardware


def dims(heads=32, kv=8, layers=32, head_dim=128, name="synthetic"):
    """Llama-shaped dims with the head counts a rule needs."""
    return ModelDims(name=name, num_layers=layers, hidden_size=heads * head_dim,
                     num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                     intermediate_size=4 * heads * head_dim, vocab_size=32000,
                     max_position_embeddings=131072)


SMOL = load_model_dims("smollm2-135m")
LLAMA8 = load_model_dims("llama-3.1-8b")
LLAMA70 = load_model_dims("llama-3.1-70b")


# --- model and hardware configs -------------------------------------------------

def test_required_models_and_hardware_ship():
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen2.5-7b", "qwen2.5-72b",
            "mistral-7b", "smollm2-135m"} <= set(list_models())
    assert {"h100-80gb", "h100-96gb", "h200", "a100-80gb", "l40s", "cpu"} <= set(list_hardware())
    for name in list_hardware():
        hw = load_hardware(name)
        assert 0 < hw.efficiency <= 1 and hw.memory_gib > 0 and hw.gpus_per_node >= 1


@pytest.mark.parametrize("name, billions", [
    ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.6), ("llama-3.1-405b", 405.9),
    ("qwen2.5-7b", 7.62), ("mistral-7b", 7.25), ("smollm2-135m", 0.1345)])
def test_parameter_counts_match_published_sizes(name, billions):
    # Published sizes: the model cards (8.03B, 70.6B, 405B, 7.61B, 7.25B, 134.5M).
    assert load_model_dims(name).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_smollm2_dims_match_design_notes():
    assert (SMOL.num_layers, SMOL.hidden_size, SMOL.num_heads, SMOL.num_kv_heads,
            SMOL.head_dim, SMOL.intermediate_size, SMOL.vocab_size,
            SMOL.max_position_embeddings, SMOL.tie_word_embeddings) == \
        (30, 576, 9, 3, 64, 1536, 49152, 8192, True)


def test_dims_from_hf_dict_and_config_json(tmp_path: Path):
    hf = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 100, "_name_or_path": "tiny"}
    d = load_model_dims(hf)
    assert (d.num_kv_heads, d.head_dim, d.name) == (4, 16, "tiny")  # HF defaults
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 6, '
        '"num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": 50, '
        '"max_position_embeddings": 512, "tie_word_embeddings": true}')
    d = load_model_dims(tmp_path)
    assert (d.num_layers, d.num_kv_heads, d.head_dim, d.tie_word_embeddings) == (3, 2, 16, True)
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        model_dims_from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_model_dims("no-such-model")


# --- validity rules --------------------------------------------------------------

def test_product_must_equal_world():
    reasons = structural_errors(LLAMA8, 2, 1, 1, 1, world=4, gpus_per_node=8)
    assert any("must multiply to the world size" in r for r in reasons)


def test_tp_must_divide_attention_heads():
    reasons = structural_errors(LLAMA8, 3, 1, 1, 1, world=3, gpus_per_node=8)
    assert reasons == ["tensor parallel size 3 does not divide 32 attention heads; "
                       "valid sizes: 1, 2, 4, 8, 16, 32"]  # 16 and 32 replicate the 8 KV heads


def test_tp_must_divide_or_replicate_kv_heads():
    reasons = structural_errors(dims(heads=24, kv=8), 3, 1, 1, 1, world=3, gpus_per_node=8)
    assert reasons == ["tensor parallel size 3 neither divides the 8 KV heads nor is a multiple of them "
                       "(to replicate each over tp/8 ranks); valid sizes: 1, 2, 4, 8, 24"]
    # Llama-70B's 8 KV heads at tp=16: each replicated on 2 ranks (within a 16-GPU node)
    assert structural_errors(LLAMA70, 16, 1, 1, 1, world=16, gpus_per_node=16) == []


def test_tp_must_not_span_nodes():
    reasons = structural_errors(dims(heads=32, kv=32), 16, 1, 1, 1, world=16, gpus_per_node=8)
    assert reasons == ["TP=16 spans 2 nodes of 8 GPUs: keep TP within a node and use ring "
                       "across nodes"]


def test_tp_groups_must_tile_a_node():
    reasons = structural_errors(dims(heads=12, kv=12), 4, 1, 3, 1, world=12, gpus_per_node=6)
    assert len(reasons) == 1 and "straddle nodes of 6 GPUs" in reasons[0]
    # A world smaller than a node is one node: TP=3 on 3 of 8 GPUs is fine.
    assert structural_errors(dims(heads=12, kv=12), 3, 1, 1, 1, 3, gpus_per_node=8) == []


def test_ulysses_must_divide_heads_per_tp_rank():
    reasons = structural_errors(SMOL, 1, 4, 1, 1, world=4, gpus_per_node=8)
    assert reasons == ["Ulysses degree 4 does not divide the 9 attention heads per TP rank "
                       "(tp=1); valid Ulysses degrees: 1, 3, 9"]


def test_ulysses_kv_heads_split_or_replicate():
    model = dims(heads=12, kv=6)
    reasons = structural_errors(model, 1, 4, 1, 1, world=4, gpus_per_node=8)
    assert len(reasons) == 1 and "one must divide the other" in reasons[0]
    assert "valid Ulysses degrees: 1, 2, 3, 6, 12" in reasons[0]
    # 9 ranks over 3 KV heads: each KV head replicated 3 times, allowed.
    assert structural_errors(SMOL, 1, 9, 1, 1, world=9, gpus_per_node=16) == []
    assert structural_errors(SMOL, 3, 3, 1, 1, world=9, gpus_per_node=16) == []


def test_ulysses_group_stays_in_a_node():
    reasons = structural_errors(LLAMA8, 1, 16, 1, 1, world=16, gpus_per_node=8)
    assert len(reasons) == 1 and "spans 2 nodes of 8" in reasons[0]
    reasons = structural_errors(LLAMA8, 4, 4, 1, 1, world=16, gpus_per_node=8)
    assert len(reasons) == 1 and "use ring across nodes" in reasons[0]
    assert structural_errors(LLAMA8, 4, 2, 2, 1, world=16, gpus_per_node=8) == []


def test_ring_has_no_head_limit_and_may_span_nodes():
    assert structural_errors(SMOL, 1, 1, 7, 1, world=7, gpus_per_node=8) == []
    assert structural_errors(LLAMA8, 8, 1, 4, 1, world=32, gpus_per_node=8) == []


def test_pp_at_most_the_layer_count():
    assert structural_errors(SMOL, 1, 1, 1, 30, world=30, gpus_per_node=64) == []
    reasons = structural_errors(SMOL, 1, 1, 1, 32, world=32, gpus_per_node=64)
    assert reasons == ["pipeline size 32 exceeds the 30 layers; use pp <= 30"]


def test_degrees_must_be_positive_integers():
    reasons = structural_errors(LLAMA8, 0, 1, 1, 1, world=1)
    assert reasons == ["tp must be a positive integer, got 0"]


def test_memory_rule_names_a_layout_that_fits():
    reasons = validate_layout(LLAMA70, 1, 1, 2, 1, world=2, gpus_per_node=8,
                              hardware="h100-80gb", context=1024)
    assert len(reasons) == 1
    assert reasons[0].startswith("needs ") and "h100-80gb has 80 GiB; fits with tp=2" in reasons[0]
    assert validate_layout(LLAMA70, 2, 1, 1, 1, 2, 8, "h100-80gb", 1024) == []


def test_pp_warns_about_too_few_chunks_but_stays_valid():
    result = plan(LLAMA8, "h100-80gb", 4, 16384, fixed={"tp": 1, "ulysses": 1, "ring": 1,
                                                        "pp": 4}, chunk_size=4096)
    chosen = result.chosen
    assert chosen.valid and chosen.pp == 4
    # causal chunks: the last one costs most, so the bubble is above GPipe's (P-1)/M = 75%
    bubble = chosen.cost.pipeline_bubble
    assert 0.75 < bubble < 1.5
    assert chosen.warnings == [f"pipeline of 4 stages gets only 4 prefill chunks (bubble {bubble:.0%} of "
                               "compute); use chunk size <= 1024 for >= 16 chunks (M >= 4*pp)"]


def test_bubble_formulas_match_the_seed_examples():
    # Seed (REFERENCES.md): P=4, M=8, k=2 -> 18.75% vs 37.5% GPipe; P=4, M=4 -> 75%.
    assert pipeline_bubble(4, 8, 2) == 0.1875
    assert pipeline_bubble(4, 8) == 0.375
    assert pipeline_bubble(4, 4) == 0.75
    assert pipeline_bubble(1, 3) == 0.0


def test_bubble_of_unequal_chunks_follows_the_flow_shop_schedule():
    # equal chunk costs: GPipe's formula
    assert pipeline_bubble(4, 8, 1, [2.0] * 8) == 0.375
    # chunk i costs i + 1/2 (attention over everything before it dominates): makespan
    # sum + (P-1) * max, so the bubble is (P-1) * 7.5 / 32, approaching 2(P-1)/M
    assert pipeline_bubble(2, 8, 1, [i + 0.5 for i in range(8)]) == 7.5 / 32
    # brute-force flow shop on random costs agrees
    import random

    rng = random.Random(0)
    for stages in (2, 3, 5):
        costs = [rng.uniform(0.5, 2.0) for _ in range(7)]
        done = [0.0] * stages
        for c in costs:
            for s in range(stages):
                done[s] = max(done[s], done[s - 1] if s else 0.0) + c
        assert abs(pipeline_bubble(stages, 7, 1, costs) - (done[-1] / sum(costs) - 1)) < 1e-12


def test_rank_order_is_pp_ring_ulysses_tp():
    groups = rank_groups(tp=2, ulysses=2, ring=2, pp=2)
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["ulysses"][:2] == [[0, 2], [1, 3]]
    assert groups["ring"][:2] == [[0, 4], [1, 5]]
    assert groups["pp"][:2] == [[0, 8], [1, 9]]
    for name in groups:
        assert sorted(r for g in groups[name] for r in g) == list(range(16))


def test_valid_layouts_keep_tp_and_ulysses_groups_inside_nodes():
    world, node = 32, 8
    for layout in [(8, 1, 4, 1), (4, 2, 4, 1), (2, 4, 2, 2), (1, 8, 4, 1)]:
        assert structural_errors(LLAMA8, *layout, world, node) == []
        groups = rank_groups(*layout)
        for name in ("tp", "ulysses"):
            for group in groups[name]:
                assert len({rank // node for rank in group}) == 1


def test_valid_degrees():
    degrees = valid_degrees(SMOL, world=9, gpus_per_node=16)
    assert degrees["tp"] == [1, 3, 9]  # tp=9: each of the 3 KV heads on 3 ranks
    assert degrees["ulysses"] == [1, 3, 9]
    assert degrees["ulysses_by_tp"][3] == [1, 3]
    assert degrees["ring"] == [1, 3, 9]
    assert valid_degrees(LLAMA8, 16, 8)["tp"] == [1, 2, 4, 8]


# --- choosing --------------------------------------------------------------------

def test_auto_layout_short_prompt_gets_tp():
    layout = auto_layout(LLAMA8, 8, 8, 2000, hardware="h100-80gb")
    assert (layout["tp"], layout["ulysses"], layout["ring"], layout["pp"]) == (8, 1, 1, 1)
    assert "decode latency" in layout["why"]


def test_auto_layout_long_prompt_gets_sequence_parallel():
    layout = auto_layout(LLAMA8, 8, 8, 200_000, hardware="h100-80gb")
    assert layout["ulysses"] * layout["ring"] > 1 and layout["pp"] == 1
    assert "sequence parallel" in layout["why"]


def test_auto_layout_heads_that_do_not_divide_get_ring():
    layout = auto_layout(SMOL, 4, None, 1000, hardware="cpu")
    assert (layout["tp"], layout["ulysses"], layout["ring"], layout["pp"]) == (1, 1, 4, 1)
    assert "ring, not Ulysses=4" in layout["why"]


def test_auto_layout_on_cpu_with_a_tiny_hf_config():
    tiny = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
            "max_position_embeddings": 1 << 20}
    short = auto_layout(tiny, 2, None, 37)
    assert (short["tp"], short["ulysses"] * short["ring"]) == (2, 1)
    long = auto_layout(tiny, 2, None, 50_000)
    assert (long["tp"], long["ulysses"] * long["ring"]) == (1, 2)


def test_pp_only_when_nothing_else_fits():
    # 405B in BF16 is ~811 GB: TP8 x ring2 puts ~101 GB on each 80 GB GPU; only PP fits.
    result = plan("llama-3.1-405b", "h100-80gb", 16, 8192, workload="prefill")
    assert result.chosen.pp == 2 and result.chosen.tp == 8
    assert "pipeline parallel because no layout without it fits" in result.why
    result = plan(LLAMA8, "h100-80gb", 16, 8192, workload="prefill")
    assert result.chosen.pp == 1


def test_decode_workload_prefers_tp():
    result = plan(LLAMA70, "h100-80gb", 8, 4096, workload="decode")
    assert result.chosen.tp == 8


def test_plan_error_says_what_would_fit():
    with pytest.raises(PlanError) as info:
        plan(LLAMA70, "h100-80gb", 1, 4096)
    message = str(info.value)
    assert "fits no layout of 1 x h100-80gb" in message
    assert "2 GPUs (tp=2" in message and "h200" in message
    assert info.value.candidates and not any(c.valid for c in info.value.candidates)
    with pytest.raises(PlanError, match="a prompt of at most"):
        plan(LLAMA8, "l40s", 1, 1_000_000)


def test_forced_invalid_layout_is_never_chosen():
    with pytest.raises(PlanError, match="TP=16 spans 2 nodes of 8 GPUs"):
        plan(LLAMA70, "h100-80gb", 16, 4096, fixed={"tp": 16, "ulysses": 1, "ring": 1, "pp": 1})
    with pytest.raises(PlanError, match="do not divide the world"):
        plan(LLAMA70, "h100-80gb", 8, 4096, fixed={"tp": 3})


def test_planner_sources_import_no_torch():
    import toolkit.planner as planner
    for source in Path(planner.__file__).parent.glob("*.py"):
        text = source.read_text()
        assert "import torch" not in text and "from torch" not in text, source


@pytest.mark.parametrize("hardware", list_hardware())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_step_budget_keeps_a_prefill_step_within_four_decode_steps(hardware, dtype):
    """--max-batch-tokens' default: the largest multiple of 128 tokens whose matmuls take at most
    4 times a decode step's weight read, for any dense model (the ratio does not depend on its size),
    clamped to [128, 8192]."""
    from toolkit.planner import DTYPE_BYTES, step_token_budget

    hw = load_hardware(hardware)
    budget = step_token_budget(hw, dtype)
    assert budget % 128 == 0 and 128 <= budget <= 8192
    for params in (135e6, 8e9, 405e9):
        read_s = params * DTYPE_BYTES[dtype] / (hw.hbm_gbps * 1e9 * hw.decode_efficiency)
        def step_s(tokens):
            return 2 * params * tokens / (hw.matmul_flops(dtype) * hw.efficiency)
        assert budget == 128 or step_s(budget - 128) < 4 * read_s       # none smaller would do
        assert budget == 8192 or step_s(budget) >= 4 * read_s           # ... and it reaches the goal
        assert budget == 128 or step_s(budget) < 4 * read_s + step_s(128)  # within one rounding of it
    assert step_token_budget(hw, dtype, itl_factor=8) >= budget
