"""What the GPU decode paths rest on, shown on CPU: reservations are exact; the static step (the
CUDA graph's) reads the live keys, not the reserved capacity, and still gives eager decode's
tokens; the calls into flash-attn follow its documented semantics (held to a float64 model of
flash_attn_func and flash_attn_with_kvcache written from flash-attn 2.6-2.8's sources: layout
[B, S, heads, d], window bounds and their clamping, soft-capping, lse +inf for a row with no
key); a config with dynamic RoPE is refused with --cuda-graph in one line; a captured pass's
traffic is counted once per replay. What only a GPU shows is in benchmarks/gpu_check."""
from __future__ import annotations

import pytest
import torch

from helpers import LOGITS_ATOL, one_error_line
from helpers import ids as _ids

PROMPT = _ids(37, seed=11).tolist()[0]


# ---- a float64 model of flash-attn's two entry points ------------------------------------------------
def _flash_visible(n_q: int, n_k: int, left: int, right: int, clamp_k: int) -> torch.Tensor:
    """[n_q, n_k] keys each query sees, as flash-attn 2.6-2.8 decide it (flash_api.cpp, mask.h)."""
    left = -1 if left >= clamp_k else left        # mha_fwd / mha_fwd_kvcache: a bound >= seqlen_k is none
    right = -1 if right >= clamp_k else right
    if left < 0 and right >= 0:                   # set_params_fprop: the other bound becomes seqlen_k
        left = clamp_k
    if left >= 0 and right < 0:
        right = clamp_k
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    if left < 0 and right < 0:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    return (j >= i + n_k - n_q - left) & (j <= i + n_k - n_q + right)


def _flash_rows(q, k, v, scale, visible, softcap):
    """q [S, H, d], k/v [Sk, G, d] float64 -> out [S, H, d], lse [H, S] (+inf where a row sees nothing)."""
    H, G = q.shape[1], k.shape[1]
    kk, vv = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    s = torch.einsum("shd,thd->hst", q, kk) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("hst,thd->shd", torch.exp(s - lse[..., None]).nan_to_num(0.0), vv)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def emulated_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    calls.append(("func", tuple(window_size), softcap))
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and q.dtype == k.dtype == v.dtype
    B, S, H, d = q.shape
    Sk = k.shape[1]
    assert k.shape == v.shape == (B, Sk, k.shape[2], d) and H % k.shape[2] == 0
    left, right = window_size
    if causal:
        right = 0
    outs, lses = [], []
    for b in range(B):
        o, l = _flash_rows(q[b].double(), k[b].double(), v[b].double(), softmax_scale,
                           _flash_visible(S, Sk, left, right, Sk), softcap)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs).to(q.dtype), torch.stack(lses).float(), None


def emulated_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                     cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                     rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                     return_softmax_lse=False):
    calls.append(("kvcache", tuple(window_size), softcap))
    assert k is None and v is None and block_table is None and return_softmax_lse
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.dtype == k_cache.dtype
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous()
    B, S, H, d = q.shape
    cap = k_cache.shape[1]
    assert k_cache.shape == v_cache.shape == (B, cap, k_cache.shape[2], d) and cache_seqlens.shape == (B,)
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])
        o, l = _flash_rows(q[b].double(), k_cache[b, :n].double(), v_cache[b, :n].double(), softmax_scale,
                           _flash_visible(S, n, *window_size, cap), softcap)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs).to(q.dtype), torch.stack(lses).float()


calls: list = []


def _truth(q, k, v, scale, visible, softcap=None):
    """q [B, H, Sq, d], k/v [B, G, Sk, d]; visible [Sq, Sk] -> float64 (out, lse), -inf for no key."""
    H, G = q.shape[1], k.shape[1]
    kk, vv = k.double().repeat_interleave(H // G, 1), v.double().repeat_interleave(H // G, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]).nan_to_num(0.0) @ vv), lse


# ---- the static step's kernel: flash's KV-cache call and the fallback ------------------------------
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 3.0), (6, 3.0), (40, None), (60, 2.0)])
@pytest.mark.parametrize("kernel", ["flash", "fallback"])
def test_cache_attention_sees_each_rows_live_keys(monkeypatch, kernel, window, softcap):
    from toolkit.attention import cache_decode

    monkeypatch.setattr(cache_decode, "CACHE_KEY_BLOCK", 8)  # several blocks of keys, merged
    gen = torch.Generator().manual_seed(5)
    cap, lengths = 48, [30, 0, 1]
    q = torch.randn(3, 4, 1, 16, generator=gen)
    k, v = torch.randn(3, 2, cap, 16, generator=gen), torch.randn(3, 2, cap, 16, generator=gen)
    fn = emulated_flash_attn_with_kvcache if kernel == "flash" else None
    out, lse = cache_decode.cache_attention(q, k, v, torch.tensor(lengths, dtype=torch.int32), 0.3, span=32,
                                            window=window, softcap=softcap, kernel=fn)
    assert out.shape == q.shape and lse.shape == (3, 4, 1)
    for b, n in enumerate(lengths):
        j = torch.arange(cap)
        seen = (j < n) & ((j >= n - window) if window else True)
        ref_out, ref_lse = _truth(q[b : b + 1], k[b : b + 1], v[b : b + 1], 0.3, seen[None, :], softcap)
        torch.testing.assert_close(out[b : b + 1].double(), ref_out, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=2e-5, rtol=0)  # -inf where n == 0


def test_the_fallback_copies_span_keys_to_fp32_not_the_reserved_capacity():
    """A bf16 cache of 4096 reserved positions with 40 live keys: the fp32 copies the fallback makes
    hold the span's keys (64), never the capacity's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from toolkit.attention.cache_decode import cache_attention

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.fp32.append(t.numel())
            return out

    cap, g, d = 4096, 2, 16
    q = torch.randn(1, 4, 1, d, dtype=torch.bfloat16)
    k, v = torch.randn(1, g, cap, d, dtype=torch.bfloat16), torch.randn(1, g, cap, d, dtype=torch.bfloat16)
    with Outputs() as seen:
        out, lse = cache_attention(q, k, v, torch.tensor([40], dtype=torch.int32), 0.25, span=64, kernel=None)
    assert max(seen.fp32) == 64 * g * d, max(seen.fp32)  # the span's K (and V) in fp32, nothing larger
    ref_out, ref_lse = _truth(q, k[:, :, :40], v[:, :, :40], 0.25, torch.ones(1, 40, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=0)  # bf16 output
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=0)


# ---- windows and soft-capping in prefill and eager decode: flash-attn's band --------------------------
@pytest.mark.parametrize("window,softcap", [(None, 4.0), (5, None), (5, 4.0), (64, 4.0), (3, None)])
@pytest.mark.parametrize("keys", ["consecutive", "zigzag"])
def test_positional_attention_through_flash_attn_keeps_the_position_mask(window, softcap, keys):
    """A 20-token chunk at positions 30..49 against a cache and itself, in query blocks of 16: blocks
    that see every key, bands flash-attn takes as window_size, and blocks it would misread (the
    masked fp32 path) all give the float64 truth of the position mask."""
    from toolkit.attention.window import positional_attention

    gen = torch.Generator().manual_seed(3)
    q_pos = torch.arange(30, 50)
    if keys == "consecutive":
        k_pos = torch.arange(0, 50)
    else:  # a ring shard: two zigzag pieces of each earlier chunk, then this chunk's
        k_pos = torch.cat([torch.arange(0, 5), torch.arange(25, 30), torch.arange(30, 50)])
    q = torch.randn(1, 4, q_pos.numel(), 16, generator=gen)
    k, v = torch.randn(1, 2, k_pos.numel(), 16, generator=gen), torch.randn(1, 2, k_pos.numel(), 16, generator=gen)
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen &= k_pos[None, :] > q_pos[:, None] - window
    ref_out, ref_lse = _truth(q, k, v, 0.3, seen, softcap)
    for flash in (emulated_flash_attn_func, None):
        calls.clear()
        out, lse = positional_attention(q, k, v, q_pos, k_pos, 0.3, window, softcap, flash=flash)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)
        if flash is not None and keys == "consecutive":
            assert any(c[1] != (-1, -1) for c in calls), calls  # a band went to flash-attn as window_size


def test_flash_band_refuses_what_flash_attn_would_read_otherwise():
    from toolkit.attention.window import flash_band

    assert flash_band(4, 10, 0, True, None) == (-1, 0)      # the causal diagonal
    assert flash_band(4, 10, 3, True, 8) == (4, 3)           # a window band, keys ending 3 before the last query
    assert flash_band(4, 10, 3, False, 8) is None            # keys with a gap: positions are not indices
    assert flash_band(16, 4, 5, True, None) is None          # right >= m: flash-attn would drop the bound
    assert flash_band(4, 10, 8, True, 8) is None             # the last query sees none of these keys


def test_positional_attention_makes_no_host_to_device_copy_for_its_masks():
    """On a device other than the CPU (here `meta`, where shapes run without data) the mask's
    positions are built there from runs (aranges), never copied from the host: a copy from pageable
    host memory is a stream sync on CUDA, per layer and step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from toolkit.attention.window import positional_attention

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if len({t.device.type for t in tensors}) > 1 or "_to_copy" in str(func):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q_pos = torch.arange(30, 50)
    k_pos = torch.cat([torch.arange(0, 5), torch.arange(25, 30), torch.arange(30, 50)])
    q, k = torch.empty(1, 4, 20, 16, device="meta"), torch.empty(1, 2, 30, 16, device="meta")
    for window, softcap in [(5, None), (None, 4.0), (5, 4.0)]:
        with Copies() as seen:
            positional_attention(q, k, k, q_pos, k_pos, 0.3, window, softcap, flash=None)  # decode: one query
            positional_attention(q[:, :, -1:], k, k, q_pos[-1:], k_pos, 0.3, window, softcap, flash=None)
        assert not seen.seen, seen.seen


# ---- exact reservations -----------------------------------------------------------------------------
def test_a_reservation_allocates_what_it_asks_and_only_unreserved_appends_double():
    from toolkit.engine.cache import LayerKV

    kv = LayerKV()
    kv.append(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), reserve=100)
    assert kv.capacity == 100
    kv.reserve(101)
    assert kv.capacity == 101  # not 200: the one slot asked for
    kv.reserve(50)
    assert kv.capacity == 101
    kv.append(torch.randn(1, 2, 91, 4), torch.randn(1, 2, 91, 4), reserve=101)
    assert kv.capacity == 101 and kv.length == 101
    kv.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), reserve=101)  # past the reservation: doubling
    assert kv.capacity == 202 and kv.length == 102


def test_the_static_step_reserves_exactly_its_room_and_reads_the_live_keys(tiny_dirs, monkeypatch):
    """Prefilled with room for 2 tokens, then a static step for 300: every layer holds exactly its
    keys + 300 + 1 (one slot a ring rank not taking the token writes to). Its attention reads the
    longest shard + SPAN_SLACK keys (work counted), not the capacity; with a span growing every few
    tokens (SPAN_SLACK 2) its logits and tokens are eager decode's."""
    from toolkit import LongContextModel
    from toolkit.attention.kernels import attention_flops, counting_work
    from toolkit.engine import static_decode
    from toolkit.engine.decode import decode_step, decoder

    lcm = LongContextModel.from_pretrained(tiny_dirs("llama"), chunk_size=16)
    ids = torch.tensor([PROMPT])
    first = lcm.prefill(ids, reserve_new_tokens=2)
    eager = decoder(lcm.model, lcm.last_state, lcm.stage, "eager", 8)
    forced = [int(first.argmax())]
    want = []
    for i in range(8):
        want.append(eager(forced[-1], len(PROMPT) + i))
        forced.append(int(want[-1].argmax()))

    lcm.prefill(ids, reserve_new_tokens=2)
    static = static_decode.StaticDecodeAttention(lcm.last_state, 300)
    assert {kv.capacity for kv in static.base.cache.layers.values()} == {len(PROMPT) + 300 + 1}
    heads, d = 4, 16  # the tiny llama: 4 query heads of 16
    with counting_work() as work:
        got = decode_step(lcm.model, forced[0], len(PROMPT), static)
    span = len(PROMPT) + 1 + static_decode.SPAN_SLACK
    assert static.span == span < len(PROMPT) + 300
    assert work == [attention_flops(1, span, heads, d, causal=False)] * 2  # two layers
    assert (got - want[0]).abs().max() <= LOGITS_ATOL

    monkeypatch.setattr(static_decode, "SPAN_SLACK", 2)  # a new span every few tokens: new shapes, same tokens
    lcm.prefill(ids, reserve_new_tokens=8)
    static = static_decode.StaticDecodeAttention(lcm.last_state, 8)
    spans = []
    for i in range(8):
        got = decode_step(lcm.model, forced[i], len(PROMPT) + i, static)
        spans.append(static.span)
        assert (got - want[i]).abs().max() <= LOGITS_ATOL, i
        assert int(got.argmax()) == forced[i + 1]
    assert len(set(spans)) >= 2 and spans == sorted(spans), spans  # grown while decoding, by an eighth


def test_the_static_step_soft_caps_as_eager_decode_does(tiny_dirs):
    """Gemma 2 soft-caps every score: the static step does it through the kernel's own argument
    (tanh on the fallback's fp32 scores here), within its window of 8 positions."""
    from toolkit import LongContextModel
    from toolkit.engine.decode import decoder

    lcm = LongContextModel.from_pretrained(tiny_dirs("gemma2"))
    ids = torch.tensor([PROMPT[:4]])
    rows = {}
    for mode in ("eager", "static"):
        logits = lcm.prefill(ids, reserve_new_tokens=4)
        step = decoder(lcm.model, lcm.last_state, lcm.stage, mode, 4)
        token, rows[mode] = int(logits.argmax()), []
        for position in range(4, 7):
            rows[mode].append(step(token, position))
            token = int(rows[mode][-1].argmax())
    diff = (torch.stack(rows["static"]) - torch.stack(rows["eager"])).abs().max().item()
    assert diff <= LOGITS_ATOL, diff


# ---- dynamic RoPE and --cuda-graph ------------------------------------------------------------------
def _dynamic_llama(folder) -> str:
    import tiny_models
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **{
        **tiny_models.COMMON, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def test_dynamic_rope_is_found_under_every_key_transformers_reads():
    from transformers import Gemma3TextConfig, LlamaConfig

    from toolkit.engine.capturable import dynamic_rope_types
    from toolkit.rope_scaling import scaled

    assert dynamic_rope_types(LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0})) == ["dynamic"]
    assert dynamic_rope_types(LlamaConfig(rope_scaling={"type": "dynamic", "factor": 2.0})) == ["dynamic"]  # older key
    per_layer = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                 "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
    assert dynamic_rope_types(Gemma3TextConfig(rope_parameters=per_layer)) == ["dynamic"]
    assert dynamic_rope_types(LlamaConfig()) == []
    assert dynamic_rope_types(scaled(LlamaConfig(), "dynamic:2")) == []  # --rope-scaling dynamic fixes the base once


def test_cuda_graph_refuses_a_config_with_dynamic_rope_in_one_line_before_loading(tmp_path, monkeypatch):
    """On a CUDA machine (its check passed here by saying there is one: nothing past the config is
    reached) a model whose own config has dynamic RoPE is refused before any weight is read."""
    from click.testing import CliRunner

    from toolkit import LongContextModel
    from toolkit.cli import cli

    folder = _dynamic_llama(tmp_path / "dynamic")
    if not torch.cuda.is_available():  # without CUDA, that is what is said first (the model is never read)
        with pytest.raises(ValueError, match="CUDA device"):
            LongContextModel.from_pretrained(folder, cuda_graph=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="dynamic RoPE scaling") as refused:
        LongContextModel.from_pretrained(folder, cuda_graph=True)
    assert "\n" not in str(refused.value) and "drop --cuda-graph" in str(refused.value)
    result = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--model", folder, "--cuda-graph"])
    assert "dynamic RoPE scaling" in one_error_line(result)


# ---- a captured pass's traffic, counted per replay ---------------------------------------------------
def _snapshot(counter) -> dict:
    return dict(sent=counter.sent, received=counter.received, calls=dict(counter.calls),
                by_key={key: list(v) for key, v in counter.by_key.items()})


def _delta(after: dict, before: dict) -> dict:
    keys = set(after["by_key"]) | set(before["by_key"])
    return dict(sent=after["sent"] - before["sent"], received=after["received"] - before["received"],
                calls={k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in keys},
                by_key={k: [a - b for a, b in zip(after["by_key"].get(k, [0, 0]), before["by_key"].get(k, [0, 0]))]
                        for k in keys})


def replayed_traffic(model_dir: str, case: dict, prompt: list[int]) -> dict:
    """Per rank: what one static step counts; what a step recorded as a captured pass counts while
    recorded (nothing) and after two replays; the spans every step used (SPAN_SLACK 1: new shapes
    every few tokens, which every rank must change at the same step, or their graphs diverge)."""
    from toolkit import LongContextModel
    from toolkit.engine import static_decode
    from toolkit.engine.decode import decode_step

    lcm = LongContextModel.from_pretrained(model_dir, **case)
    logits = lcm.prefill(torch.tensor([prompt]), reserve_new_tokens=12)
    saved, static_decode.SPAN_SLACK = static_decode.SPAN_SLACK, 1
    try:
        state = static_decode.StaticDecodeAttention(lcm.last_state, 12)
        counter, token, n = lcm.topo.comm.counter, int(logits.argmax()), len(prompt)
        before = _snapshot(counter)
        token = int(decode_step(lcm.model, token, n, state).argmax())
        once = _delta(_snapshot(counter), before)
        traffic = static_decode.PassTraffic(lcm.topo.comm)
        before = _snapshot(counter)
        with traffic.recording():
            token = int(decode_step(lcm.model, token, n + 1, state).argmax())
        recording = _delta(_snapshot(counter), before)
        traffic.replayed()
        traffic.replayed()
        replays = _delta(_snapshot(counter), before)
        keys = [state.shape_key()]
        for i in range(2, 10):
            token = int(decode_step(lcm.model, token, n + i, state).argmax())
            keys.append(state.shape_key())
    finally:
        static_decode.SPAN_SLACK = saved
    return dict(once=once, recording=recording, replays=replays, same_counter=counter is lcm.topo.comm.counter,
                shape_keys=keys)


@pytest.mark.parametrize("layout", [dict(ring=2), dict(ulysses=2)], ids=["ring2", "ulysses2"])
def test_a_captured_pass_is_counted_once_per_replay(pools, tiny_dirs, layout):
    import test_gpu_decode_paths as me

    results = pools(2).run(me.replayed_traffic, tiny_dirs("llama"), dict(layout, chunk_size=16), PROMPT)
    for rank, got in enumerate(results):
        once = got["once"]
        assert once["sent"] > 0 and once["received"] > 0, f"rank {rank}: a decode step moves bytes"
        assert got["recording"]["sent"] == got["recording"]["received"] == 0, f"rank {rank}: a capture moves nothing"
        assert not any(got["recording"]["calls"].values())
        assert got["same_counter"]
        replays = got["replays"]
        assert replays["sent"] == 2 * once["sent"] and replays["received"] == 2 * once["received"], rank
        assert replays["calls"] == {k: 2 * c for k, c in once["calls"].items()}, rank
        assert replays["by_key"] == {k: [2 * s, 2 * r] for k, (s, r) in once["by_key"].items()}, rank
    keys = [got["shape_keys"] for got in results]
    assert keys[0] == keys[1] and len(set(keys[0])) > 1, keys  # recaptured at the same steps on every rank
