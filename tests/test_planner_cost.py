"""The cost model: hand counts of memory and bytes, overlap, calibration on Meta's TTFTs."""
import dataclasses

import pytest

from toolkit.planner import RunSpec, estimate, load_hardware, load_model_dims
from toolkit.planner.cost import GIB

SMOL = load_model_dims("smollm2-135m")
LLAMA8 = load_model_dims("llama-3.1-8b")
LLAMA405 = load_model_dims("llama-3.1-405b")
H100 = load_hardware("h100-80gb")
META_H100 = load_hardware("h100-96gb")


def test_memory_hand_count_smollm2_single_device():
    spec = RunSpec(context=8192, new_tokens=0, dtype="bfloat16")
    cost = estimate(SMOL, H100, 1, 1, 1, 1, spec)
    # Weights: 134,515,008 parameters (tied embeddings counted once) x 2 bytes.
    assert cost.weights_gib * GIB == 134_515_008 * 2
    # KV cache: 2 (K and V) x 30 layers x 3 KV heads x 64 dims x 8192 tokens x 2 bytes.
    assert cost.kv_cache_gib * GIB == 2 * 30 * 3 * 64 * 8192 * 2 == 188_743_680
    # Activations of one 8192-token chunk: residual + normed input (2 x 576), q/k/v and
    # output (2 x 9 + 2 x 3 heads of 64), gate/up/product (3 x 1536), the head-layout
    # q/k/v (9 + 2 x 3 heads of 64), all bf16, plus fp32 logits of the last token.
    tokens = 8192
    per_token = 2 * 576 + (2 * 9 + 2 * 3) * 64 + 3 * 1536 + (9 + 2 * 3) * 64
    assert cost.activations_gib * GIB == tokens * per_token * 2 + 49152 * 4
    assert cost.memory_gib_per_device == pytest.approx(
        cost.weights_gib + cost.kv_cache_gib + cost.activations_gib)


def test_memory_shards_with_tp_ulysses_ring_and_pp():
    spec = RunSpec(context=8192, new_tokens=0, dtype="bfloat16")
    embed = 49152 * 576 * 2
    layers = 30 * SMOL.layer_params * 2
    tp3 = estimate(SMOL, H100, 3, 1, 1, 1, spec)
    # AutoTP shards the layers, not the (tied) embedding; the final norm stays whole.
    assert tp3.weights_gib * GIB == pytest.approx(layers / 3 + embed + 576 * 2)
    assert tp3.kv_cache_gib * GIB == 2 * 30 * 1 * 64 * 8192 * 2
    # Ulysses 9 over 3 KV heads: each rank keeps 1 (replicated) KV head for all tokens.
    u9 = estimate(SMOL, H100, 1, 9, 1, 1, spec)
    assert u9.kv_cache_gib * GIB == 2 * 30 * 1 * 64 * 8192 * 2
    assert u9.weights_gib == estimate(SMOL, H100, 1, 1, 1, 1, spec).weights_gib
    # Ring 4: every rank keeps all 3 KV heads for a quarter of the tokens.
    r4 = estimate(SMOL, H100, 1, 1, 4, 1, spec)
    assert r4.kv_cache_gib * GIB == 2 * 30 * 3 * 64 * 2048 * 2
    # PP 3: 10 layers per stage, and the stage with the (tied) embedding holds it whole.
    p3 = estimate(SMOL, H100, 1, 1, 1, 3, spec)
    assert p3.weights_gib * GIB == pytest.approx(layers / 3 + embed)
    assert p3.kv_cache_gib * GIB == 2 * 10 * 3 * 64 * 8192 * 2


def test_tp_all_reduce_bytes():
    spec = RunSpec(context=8192, new_tokens=0)
    cost = estimate(LLAMA8, H100, 8, 1, 1, 1, spec)
    # Two all-reduces of [N, h] per layer; a ring all-reduce sends 2*(P-1)/P of it.
    assert cost.tp_bytes_per_layer == pytest.approx(2 * 2 * 7 / 8 * 8192 * 4096 * 2)


def test_ulysses_bytes_closed_form():
    spec = RunSpec(context=8192, new_tokens=0)
    cost = estimate(LLAMA8, H100, 1, 8, 1, 1, spec)
    local = 8192 / 8  # tokens per rank before the all-to-all
    q = out = local * 32 * 128
    k = v = local * 8 * 128
    assert cost.ulysses_bytes_per_layer == pytest.approx((q + k + v + out) * 7 / 8 * 2)
    # Below the ~4*N*h/P of the MHA case thanks to GQA.
    assert cost.ulysses_bytes_per_layer < 4 * 8192 * 4096 * 2 / 8
    # Ulysses 16 over 8 KV heads: K and V are replicated to 16 heads before sending.
    wide = estimate(LLAMA8, H100, 1, 16, 1, 1, spec, gpus_per_node=16)
    local = 8192 / 16
    expected = (2 * local * 32 * 128 + 2 * local * 16 * 128) * 15 / 16 * 2
    assert wide.ulysses_bytes_per_layer == pytest.approx(expected)


def test_ring_bytes_pass_kv_and_pass_q():
    base = RunSpec(context=8192, new_tokens=0)
    kv = estimate(LLAMA8, H100, 1, 1, 4, 1, dataclasses.replace(base, ring_mode="pass-kv"))
    # Each rank sends its K and V shard (8 heads x 128 x N/4 tokens) P-1 times.
    assert kv.ring_bytes_per_layer == pytest.approx(3 * 2 * 8 * 128 * 2048 * 2)
    q = estimate(LLAMA8, H100, 1, 1, 4, 1, dataclasses.replace(base, ring_mode="pass-q"))
    # Queries out and (out, lse fp32) back, P-1 times.
    assert q.ring_bytes_per_layer == pytest.approx(3 * 2048 * 32 * (2 * 128 * 2 + 4))


def test_ring_transfer_hidden_only_when_compute_covers_it():
    spec = RunSpec(context=65536, new_tokens=0)
    fast = estimate(LLAMA8, H100, 1, 1, 8, 1, spec)
    assert fast.ring_comm_hidden
    no_comm = estimate(LLAMA8, dataclasses.replace(H100, intra_node_gbps=1e9,
                                                   intra_node_latency_us=1e-9),
                       1, 1, 8, 1, spec)
    assert fast.prefill_seconds == pytest.approx(no_comm.prefill_seconds, rel=1e-3)
    slow = estimate(LLAMA8, dataclasses.replace(H100, intra_node_gbps=0.05), 1, 1, 8, 1, spec)
    assert not slow.ring_comm_hidden
    assert slow.prefill_seconds > 1.5 * fast.prefill_seconds


def test_zigzag_balances_causal_work():
    spec = RunSpec(context=32768, new_tokens=0, chunk_size=32768)
    zigzag = estimate(LLAMA8, H100, 1, 1, 4, 1, spec)
    contiguous = estimate(LLAMA8, H100, 1, 1, 4, 1,
                          dataclasses.replace(spec, sequence_layout="contiguous"))
    assert contiguous.compute_seconds > zigzag.compute_seconds


def test_pp_does_not_speed_up_decode():
    spec = RunSpec(context=4096, new_tokens=128)
    tp4 = estimate(LLAMA8, H100, 4, 1, 1, 1, spec)
    tp4_pp2 = estimate(LLAMA8, H100, 4, 1, 1, 2, spec)
    tp8 = estimate(LLAMA8, H100, 8, 1, 1, 1, spec)
    assert tp4_pp2.decode_ms_per_token >= tp4.decode_ms_per_token
    assert tp8.decode_ms_per_token < tp4_pp2.decode_ms_per_token


def test_decode_streams_weights_and_cache_at_the_decode_efficiency():
    """World 1, memory-bound: ms/token is (weights + head + KV cache bytes) / (bandwidth x decode_efficiency)."""
    spec = RunSpec(context=8192, new_tokens=128)
    full = estimate(LLAMA8, H100, 1, 1, 1, 1, spec)
    half = estimate(LLAMA8, dataclasses.replace(H100, decode_efficiency=0.5), 1, 1, 1, 1, spec)
    assert half.decode_ms_per_token == pytest.approx(2 * full.decode_ms_per_token, rel=1e-9)
    d = LLAMA8
    layers = d.num_layers * (d.attention_params_per_layer + d.norm_params_per_layer + d.mlp_params_per_layer) * 2
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * (8192 + 64) * 2
    assert full.decode_ms_per_token == pytest.approx((layers + d.lm_head_params * 2 + kv) / 3350e9 * 1e3, rel=1e-9)


def test_flop_count_matches_meta_1m_run():
    # arXiv:2411.01783: the 1M-token Llama3-405B prefill is 4.9e18 FLOPs, 4.1e18 of
    # them in attention (their "1M" is 10^6 tokens).
    cost = estimate(LLAMA405, META_H100, 8, 1, 16, 1,
                    RunSpec(context=1_000_000, new_tokens=0, ffn_dtype="fp8"), 8)
    assert cost.prefill_flops_total == pytest.approx(4.9e18, rel=0.02)
    assert cost.attention_flops_total == pytest.approx(4.1e18, rel=0.02)


# Meta's TP8 TTFT for Llama3-405B on one 8 x H100-96GB node, FFN weights in FP8
# (arXiv:2411.01783; REFERENCES.md): tokens -> seconds.
META_TP8_TTFT = {8192: 1.740, 32768: 7.658, 131072: 42.010}


@pytest.mark.parametrize("tokens, measured", sorted(META_TP8_TTFT.items()))
def test_calibration_on_meta_tp8_ttft(tokens, measured):
    spec = RunSpec(context=tokens, new_tokens=0, ffn_dtype="fp8")
    predicted = estimate(LLAMA405, META_H100, 8, 1, 1, 1, spec, gpus_per_node=8)
    assert predicted.prefill_seconds == pytest.approx(measured, rel=0.25)
    assert predicted.memory_gib_per_device < META_H100.memory_gib


def test_one_efficiency_explains_all_three_lengths():
    # The same single number from the yaml; a physical model, so the three errors
    # stay small together rather than one being fitted.
    errors = []
    for tokens, measured in META_TP8_TTFT.items():
        spec = RunSpec(context=tokens, new_tokens=0, ffn_dtype="fp8")
        got = estimate(LLAMA405, META_H100, 8, 1, 1, 1, spec, 8).prefill_seconds
        errors.append(got / measured - 1)
    assert max(abs(e) for e in errors) < 0.15
    assert META_H100.efficiency == 0.5


def test_extrapolates_to_meta_16_node_context_parallel_run():
    # Not fitted: TP8 x ring16 over 16 nodes, 1M tokens in 77 s (arXiv:2411.01783
    # abstract). The model lands within 25% with the same efficiency.
    spec = RunSpec(context=1_000_000, new_tokens=0, ffn_dtype="fp8")
    cost = estimate(LLAMA405, META_H100, 8, 1, 16, 1, spec, gpus_per_node=8)
    assert cost.ring_comm_hidden
    assert cost.prefill_seconds == pytest.approx(77.0, rel=0.25)


def test_fp8_needs_hardware_support():
    with pytest.raises(ValueError, match="no FP8"):
        estimate(LLAMA8, load_hardware("a100-80gb"), 1, 1, 1, 1,
                 RunSpec(context=128, ffn_dtype="fp8"))


def test_catalog_families_count_their_published_sizes():
    """Totals and active parameters as their makers publish them (Mistral AI: Mixtral 8x7B 46.7B,
    12.9B per token; Qwen: Qwen3-30B-A3B 30.5B, 3.3B activated; Google: Gemma 3 27B; Microsoft:
    Phi-3.5-mini 3.8B), from the configs alone."""
    sizes = {name: load_model_dims(name) for name in ("mixtral-8x7b", "qwen3-30b-a3b", "gemma-3-27b", "phi-3.5-mini")}
    assert sizes["mixtral-8x7b"].params / 1e9 == pytest.approx(46.7, abs=0.05)
    assert sizes["mixtral-8x7b"].active_params / 1e9 == pytest.approx(12.9, abs=0.05)
    assert sizes["qwen3-30b-a3b"].params / 1e9 == pytest.approx(30.5, abs=0.05)
    assert sizes["qwen3-30b-a3b"].active_params / 1e9 == pytest.approx(3.3, abs=0.1)
    assert sizes["gemma-3-27b"].params / 1e9 == pytest.approx(27.0, abs=0.1)
    assert (sizes["gemma-3-27b"].sliding_layers, sizes["gemma-3-27b"].sliding_window) == (52, 1024)
    assert sizes["phi-3.5-mini"].params / 1e9 == pytest.approx(3.8, abs=0.05)
    assert sizes["phi-3.5-mini"].sliding_layers == 0  # its 262144-position window is longer than its context


def test_moe_holds_every_expert_and_reads_a_tokens_experts_in_decode():
    mixtral = load_model_dims("mixtral-8x7b")
    dense = dataclasses.replace(mixtral, num_experts=0, experts_per_token=0,
                                intermediate_size=8 * mixtral.intermediate_size)  # same bytes, one wide MLP
    spec = RunSpec(context=4096, new_tokens=2)
    moe_cost, dense_cost = estimate(mixtral, H100, 8, 1, 1, 1, spec), estimate(dense, H100, 8, 1, 1, 1, spec)
    assert moe_cost.weights_gib == pytest.approx(dense_cost.weights_gib, rel=1e-3)
    # decode streams the attention, the 2 routed experts and the head instead of all 8 experts
    d = mixtral
    layer_read = (d.attention_params_per_layer + d.norm_params_per_layer + d.active_mlp_params_per_layer) * 2 / 8
    kv = 2 * 1 * d.head_dim * (4096 + 1) * 2  # one KV head per rank (8 over tp=8), K and V
    expected = d.num_layers * (layer_read + kv) + d.lm_head_params * 2 / 8
    assert moe_cost.decode_ms_per_token == pytest.approx(expected / 3350e9 * 1e3 + d.num_layers * 2 * (
        10e-3 + 2 * 7 / 8 * d.hidden_size * 2 / 450e9 * 1e3), rel=1e-6)  # two all-reduces a layer (tp=8, NVLink)
    assert moe_cost.decode_ms_per_token < 0.4 * dense_cost.decode_ms_per_token


def test_sliding_window_layers_hold_their_window_not_the_context():
    gemma = load_model_dims("gemma-3-27b")
    spec = RunSpec(context=131072, new_tokens=0, chunk_size=8192)
    windowed = estimate(gemma, H100, 8, 1, 1, 1, spec)
    global_only = estimate(dataclasses.replace(gemma, sliding_window=0, sliding_layers=0), H100, 8, 1, 1, 1, spec)
    # 10 global layers hold 131072 positions, 52 local ones their 1024 and the 8192-token chunk
    assert windowed.kv_cache_gib / global_only.kv_cache_gib == pytest.approx(
        (10 * 131072 + 52 * (1024 + 8192)) / (62 * 131072), rel=1e-4)  # positions rounded up per rank
    assert windowed.attention_flops_total < 0.2 * global_only.attention_flops_total


@pytest.mark.parametrize("extra,expected", [
    (dict(model_type="phi3", sliding_window=2047, max_position_embeddings=4096), (2047, 32)),  # Phi-3-mini-4k
    (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), (4096, 32)),
    (dict(model_type="qwen2", sliding_window=4096, use_sliding_window=False, max_position_embeddings=32768), (0, 0)),
    (dict(model_type="qwen2", sliding_window=4096, use_sliding_window=True, max_window_layers=28,
          max_position_embeddings=32768), (4096, 4)),
    (dict(model_type="qwen3_moe", sliding_window=None, max_position_embeddings=40960), (0, 0))])
def test_windowed_layers_follow_transformers_rules_for_each_family(extra, expected):
    """Which layers a config's window reaches, as transformers masks them (any family with a window
    set and no per-layer types windows every layer; Qwen only with use_sliding_window, past max_window_layers)."""
    from toolkit.planner.model_dims import model_dims_from_dict

    dims = model_dims_from_dict(dict(num_hidden_layers=32, hidden_size=512, num_attention_heads=8,
                                     intermediate_size=1024, vocab_size=1000, **extra))
    assert (dims.sliding_window, dims.sliding_layers) == expected
