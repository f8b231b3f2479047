"""A quantised KV cache (int8, int4 two a byte, fp8 e4m3; a scale per token and KV head; bf16
and fp16 casts): each format's round trip within its bound; its bytes against the closed form,
exactly; and the same tokens in every layout as at world 1 with the same kv dtype, since a
token's quantisation depends on its own numbers only, never on which rank holds it."""
import math

import pytest
import torch

import decode_bodies
import session_bodies
from helpers import DOC, HEAD_DIMS, MORE, sent_by_layer
from helpers import ids as _ids
from toolkit.attention.kv_quant import StoredKV, dequantize, quantize
from toolkit.engine.cache import LayerKV

KINDS = ("int8", "int4", "fp8", "bf16", "fp16")
NEW = 6
PROMPT = _ids(70, seed=31).tolist()[0]  # five chunks of 16: most of what the prompt attends is quantised
# fp32 logits of unit-to-ten scale; a quantised cache's keys are read through the same rounding on
# every layout, but the projections that make them differ by ~1e-6 between layouts, which can move
# a number across a rounding boundary: one int8 step is 1/127 of the head's largest number
LAYOUT_ATOL = {"int8": 2e-2, "fp8": 5e-2, "int4": 2e-1, "bf16": 1e-2, "fp16": 1e-2}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_stays_within_the_formats_bound(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.logspace(-2, 1, 50)[None, None, :, None]  # 0.01x .. 10x
    data, scale = quantize(x, kind)
    back = dequantize(data, scale, kind, torch.float32)
    err = (back - x).abs()
    if kind in ("int8", "int4"):  # round to the nearest step of absmax/qmax: at most half a step
        step = x.abs().amax(-1, keepdim=True) / (127 if kind == "int8" else 7)
        assert bool((err <= step / 2 * (1 + 1e-6)).all())
    elif kind == "fp8":  # e4m3: 3 mantissa bits, half a spacing is 2^-4 of the number; subnormals below 2^-6
        floor = x.abs().amax(-1, keepdim=True) / 448 * 2 ** -10
        assert bool((err <= torch.maximum(x.abs() * 2 ** -4, floor) * (1 + 1e-6)).all())
    elif kind == "bf16":  # 7 mantissa bits
        assert bool((err <= x.abs() * 2 ** -8).all())
    else:  # fp16: 10 mantissa bits; below 2^-14 subnormal, spaced 2^-24
        assert bool((err <= torch.clamp(x.abs() * 2 ** -11, min=2 ** -25)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_stored_shard_reads_as_one_empty_block(kind):
    """A shard whose window evicted every key still gives the kernels one block, [B, g, 0, d]."""
    data, scale = quantize(torch.randn(1, 2, 0, 64), kind)
    stored = StoredKV(data, data, kind, scale, scale)
    blocks = list(stored.blocks(torch.float32))
    assert [(start, k.shape, v.shape) for start, k, v in blocks] == [(0, (1, 2, 0, 64), (1, 2, 0, 64))]


@pytest.mark.parametrize("kind,head_dim", [(k, d) for k in KINDS for d in (64, 128)])
def test_cache_bytes_match_the_closed_form(kind, head_dim):
    """Bytes a cache holds over bf16's: int8/fp8 (d + 4)/2d, int4 (d/2 + 4)/2d, bf16/fp16 1."""
    kv = LayerKV(kind)
    x = torch.randn(1, 2, 37, head_dim, dtype=torch.bfloat16)
    kv.append(x, x, reserve=37)
    held = sum(p.numel() * p.element_size() for p in kv.planes)
    closed = {"int8": (head_dim + 4) / (2 * head_dim), "fp8": (head_dim + 4) / (2 * head_dim),
              "int4": (head_dim / 2 + 4) / (2 * head_dim), "bf16": 1.0, "fp16": 1.0}[kind]
    assert held == 2 * 2 * 37 * 2 * head_dim * closed  # K and V, 2 heads, 37 tokens, bf16's bytes x ratio
    assert math.isclose(held / (2 * 2 * 37 * head_dim * 2), closed)


LAYOUTS = [(2, dict(ring=2)), (2, dict(ring=2, ring_mode="pass-q")), (2, dict(ulysses=2)),
           (4, dict(ulysses=2, ring=2)), (2, dict(tp=2)), (2, dict(pp=2))]


@pytest.fixture(scope="module")
def world1(pools, tiny_dirs):
    cache = {}

    def get(kind):
        if kind not in cache:
            first = pools(1).run(decode_bodies.decode_paths, tiny_dirs("llama4l"),
                                 dict(chunk_size=16, kv_dtype=kind), PROMPT, [0] * NEW, ("eager",))[0]
            cache[kind] = first
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ("int8", "int4", "fp8"))
@pytest.mark.parametrize("world,layout", LAYOUTS, ids=["-".join(f"{k}{v}" for k, v in c.items()) for _, c in LAYOUTS])
def test_every_layout_gives_world_ones_tokens_with_the_same_kv_dtype(pools, tiny_dirs, world1, kind, world, layout):
    want = world1(kind)
    results = pools(world).run(decode_bodies.decode_paths, tiny_dirs("llama4l"),
                               dict(layout, chunk_size=16, kv_dtype=kind), PROMPT, [0] * NEW, ("eager",))
    for rank, got in enumerate(results):
        assert got["tokens"] == want["tokens"], f"rank {rank}"
        diff = (got["eager"] - want["eager"]).abs().max().item()
        assert diff <= LAYOUT_ATOL[kind], f"rank {rank}: logits differ by {diff}"


@pytest.mark.parametrize("kind", ("int8", "int4"))
def test_ring_hops_carry_the_cache_as_stored(pools, tiny_dirs, kind):
    """pass-KV sends a quantised shard as it is stored (data and scales) and the chunk's piece at
    full precision: the bytes per layer equal the closed form with the stored token's bytes."""
    import bodies
    from benchmarks.traffic import ring_bytes_per_layer
    from toolkit.attention.kv_formats import bytes_per_token_head

    heads, kv, d = HEAD_DIMS["llama"]
    n, chunk, world = 45, 16, 3
    case = dict(ring=world, chunk_size=chunk, ring_mode="pass-kv", kv_dtype=kind)
    got = pools(world).run(bodies.comm_bytes_per_layer, tiny_dirs("llama"), _ids(n), case)
    for me, per_rank in enumerate(got):
        want = ring_bytes_per_layer(n, chunk, world, heads, kv, d, 4, "pass-kv", me,
                                    cached_token_bytes=bytes_per_token_head(kind, d, 4))
        assert sent_by_layer(per_rank, ("ring_kv",)) == {0: want, 1: want}
        plain = ring_bytes_per_layer(n, chunk, world, heads, kv, d, 4, "pass-kv", me)
        assert want < plain


@pytest.mark.parametrize("world,layout", [(1, {}), (2, dict(ring=2)), (2, dict(ulysses=2))],
                         ids=["world1", "ring2", "ulysses2"])
def test_an_int8_document_session_answers_as_prefilled_and_saves_its_kv_dtype(pools, tiny_dirs, tmp_path, world,
                                                                              layout):
    """A session over an int8 cache: questions in turn and in one batch give the same tokens; the
    cache saves as int8 (scales included), loads on another layout with the same answers, and an
    auto run is refused with what to pass."""
    case = dict(layout, chunk_size=16, kv_dtype="int8")
    together = pools(world).run(decode_bodies.asked_together, tiny_dirs("llama"), case, DOC, MORE, NEW)
    for rank, got in enumerate(together):
        assert got["together"] == got["alone"] and got["together_sampled"] == got["alone_sampled"], f"rank {rank}"
    path = str(tmp_path / "kv")
    saved = pools(world).run(session_bodies.ask_after_prefill, tiny_dirs("llama"), case, DOC, MORE[:2], NEW, path)
    assert saved[0]["manifest"]["kv_dtype"] == "int8"
    other = dict(ring=2, chunk_size=16, kv_dtype="int8") if world == 1 else dict(chunk_size=16, kv_dtype="int8")
    loaded = pools(2 if world == 1 else 1).run(session_bodies.ask_after_load, tiny_dirs("llama"), other, path,
                                               MORE[:2], NEW)
    assert all(got["tokens"] == saved[0]["tokens"] for got in loaded)
    refusal = pools(1).run(session_bodies.load_refusal, tiny_dirs("llama"), dict(chunk_size=16), path)[0]
    assert "stored as int8; this run stores auto (--kv-dtype int8 reads it)" in refusal


@pytest.mark.parametrize("chunk", [16, 32])
def test_a_quantised_cache_under_sliding_windows_and_soft_capping(pools, tiny_dirs, chunk):
    """Gemma 2 (windows, soft-capped scores) with an int8 cache: ring=2 reads each block's window
    from the dequantised shard and gives world 1's tokens. In chunks of 32 (four times the
    window) one rank's whole shard of the first chunk is evicted before the second: an empty
    quantised shard must still give its (empty) partial."""
    case = dict(chunk_size=chunk, kv_dtype="int8")
    want = pools(1).run(decode_bodies.decode_paths, tiny_dirs("gemma2"), case, PROMPT, [0] * NEW, ("eager",))[0]
    for rank, got in enumerate(pools(2).run(decode_bodies.decode_paths, tiny_dirs("gemma2"), dict(case, ring=2),
                                            PROMPT, [0] * NEW, ("eager",))):
        assert got["tokens"] == want["tokens"], f"rank {rank}"
        assert (got["eager"] - want["eager"]).abs().max().item() <= LAYOUT_ATOL["int8"]

