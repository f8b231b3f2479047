"""Local attention kernels against the float64 reference; the LSE merge."""
import pytest
import torch

from toolkit.attention.kernels import (
    attention_flops, attention_reference, attention_with_lse, decode_attention, merge_many, merge_partials,
)

# fp32 kernels vs float64 on unit-scale random inputs: reordering error ~1e-6; 2e-5 leaves margin
# without hiding a masking bug (those show up as O(1e-1) errors).
ATOL = 2e-5


def _inputs(b, h, g, sq, sk, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen)
    k = torch.randn(b, g, sk, d, generator=gen)
    v = torch.randn(b, g, sk, d, generator=gen)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,g", [(4, 4), (8, 2), (6, 3)])
@pytest.mark.parametrize("sq,sk", [(17, 17), (5, 23), (1, 9), (64, 64), (3, 130)])
def test_kernel_matches_float64_reference(causal, h, g, sq, sk):
    q, k, v = _inputs(2, h, g, sq, sk, 16, seed=sq * 131 + sk * 7 + h)
    out, lse = attention_with_lse(q, k, v, causal=causal, scale=0.3)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal, scale=0.3)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=0)


def test_bottom_right_causal_alignment():
    """The last query sees every key; the first of 5 queries over 23 keys sees 19."""
    q, k, v = _inputs(1, 2, 2, 5, 23, 8, seed=3)
    out, _ = attention_with_lse(q, k, v, causal=True)
    full, _ = attention_with_lse(q[:, :, -1:], k, v, causal=False)
    torch.testing.assert_close(out[:, :, -1:], full, atol=ATOL, rtol=0)
    first, _ = attention_with_lse(q[:, :, :1], k[:, :, :19], v[:, :, :19], causal=False)
    torch.testing.assert_close(out[:, :, :1], first, atol=ATOL, rtol=0)


def test_empty_keys_give_neutral_partial():
    q, k, v = _inputs(1, 2, 2, 4, 0, 8, seed=1)
    out, lse = attention_with_lse(q, k, v, causal=False)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    q2, k2, v2 = _inputs(1, 2, 2, 4, 6, 8, seed=2)
    o2, l2 = attention_with_lse(q2, k2, v2, causal=False)
    merged, mlse = merge_partials(out, lse, o2, l2)
    torch.testing.assert_close(merged, o2)
    torch.testing.assert_close(mlse, l2)


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("h,g", [(4, 2), (4, 4)])
def test_merge_of_partials_equals_whole(parts, h, g):
    q, k, v = _inputs(1, h, g, 7, 41, 16, seed=parts)
    bounds = torch.linspace(0, 41, parts + 1).long().tolist()
    partials = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], causal=False) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_many(partials)
    ref_out, ref_lse = attention_reference(q, k, v, causal=False)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=0)


def test_merge_is_stable_for_large_logits():
    """The naive exp form overflows at lse ~ 1e3; the sigmoid form does not."""
    out_a, out_b = torch.ones(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    lse_a, lse_b = torch.tensor([[[1000.0, -1000.0]]]), torch.tensor([[[1000.0, -999.0]]])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[0, 0, 0], torch.full((4,), 0.5))


def test_attention_flops_counts_causal_half():
    assert attention_flops(10, 10, 2, 8, causal=False) == 4 * 100 * 16
    assert attention_flops(10, 10, 2, 8, causal=True) == 4 * 55 * 16
    assert attention_flops(2, 10, 1, 1, causal=True) == 4 * (2 * 8 + 3)


@pytest.mark.parametrize("heads,kv_heads,length,block", [(8, 2, 37, 16), (6, 6, 5, 64), (4, 1, 64, 64)])
def test_decode_attention_matches_reference_in_blocks(heads, kv_heads, length, block):
    """The grouped-matmul decode kernel, over key blocks merged by LSE, against float64."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, 1, 16, generator=g)
    k, v = torch.randn(2, kv_heads, length, 16, generator=g), torch.randn(2, kv_heads, length, 16, generator=g)
    out, lse = decode_attention(q, k, v, 16 ** -0.5, block=block)
    ref_out, ref_lse = attention_reference(q, k, v, causal=False)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=0)


def test_decode_attention_shares_keys_across_rows_and_masks_lengths():
    """Batch-1 keys read by B query rows equal each row alone; key_lengths hide a padded tail."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 6, 1, 8, generator=g)
    k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    out, lse = decode_attention(q, k, v, 0.3)
    for b in range(3):
        ref_out, ref_lse = attention_reference(q[b : b + 1], k, v, causal=False, scale=0.3)
        torch.testing.assert_close(out[b : b + 1].double(), ref_out, atol=ATOL, rtol=0)
        torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=ATOL, rtol=0)
    kb, vb = k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)
    lengths = torch.tensor([20, 7, 0])
    out, lse = decode_attention(q, kb, vb, 0.3, key_lengths=lengths, block=8)
    for b, n in enumerate([20, 7]):
        ref_out, ref_lse = attention_reference(q[b : b + 1], k[:, :, :n], v[:, :, :n], causal=False, scale=0.3)
        torch.testing.assert_close(out[b : b + 1].double(), ref_out, atol=ATOL, rtol=0)
        torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=ATOL, rtol=0)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))  # no keys: an empty partial


@pytest.mark.parametrize("length", [2048, 4097, 9000])
def test_cpu_decode_cut_into_pieces_for_the_threads_matches_reference(length):
    """3 KV heads on 2 threads: the keys are cut into pieces laid side by side (a strided view),
    the pieces' partials merged by LSE, a remainder of L mod n keys merged after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        q = torch.randn(1, 9, 1, 64, generator=g)
        cache = torch.randn(1, 3, length + 100, 64, generator=g)  # a reserved buffer, read up to length
        k, v = cache[:, :, :length], cache.flip(2)[:, :, :length].contiguous()
        out, lse = decode_attention(q, k, v, 0.125)
    finally:
        torch.set_num_threads(threads)
    ref_out, ref_lse = attention_reference(q, k, v, causal=False, scale=0.125)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=0)


def test_counting_work_sees_what_each_kernel_computes():
    """Causal squares count half (plus the diagonal), windows count every pair of their blocks."""
    from toolkit.attention.kernels import counting_work
    from toolkit.attention.window import positional_attention

    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    with counting_work() as work:
        attention_with_lse(q, k, k, causal=True)
        decode_attention(q[:, :, :1], k, k, 0.5)
    assert work == [attention_flops(8, 8, 2, 4, causal=True), attention_flops(1, 8, 2, 4, causal=False)]
    with counting_work() as work:  # window 3, 8 queries in blocks of 16: one block reads keys 0..7
        positional_attention(q, k, k, torch.arange(8), torch.arange(8), 0.5, window=3)
    assert work == [attention_flops(8, 8, 2, 4, causal=False)]
    attention_with_lse(q, k, k, causal=True)  # outside: nothing is counted, nothing fails



def test_onednn_sees_a_bounded_set_of_row_counts():
    """Every row count from 1 to 20,000 reaches oneDNN as one of a few dozen, never fewer rows and at
    most a quarter more (oneDNN keeps a kernel per shape: every count would grow a server for ever)."""
    from toolkit.loading.cpu_linear import EXACT_ROWS, onednn_rows

    called = {rows: onednn_rows(rows) for rows in range(1, 20001)}
    assert all(rows <= c <= max(rows, 1.25 * rows) for rows, c in called.items())
    assert all(called[rows] == rows for rows in range(1, EXACT_ROWS + 1))
    assert len(set(called.values())) <= EXACT_ROWS + 4 * 11, sorted(set(called.values()))


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 2, 48), (5, 48), (3, 3, 48), (1, 9, 48), (65, 48), (0, 48),
                                   (2, 300, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_linear_equals_linear_to_rounding(shape, bias):
    """W @ x^T for a decode step's few rows (one row as two), oneDNN's GEMM past MAX_ROWS, F.linear
    with no rows: fp32 against float64 as close as any GEMM; nn.Linear's parameters and state dict
    kept; undone."""
    from torch import nn

    from toolkit.loading.cpu_linear import ONEDNN, CpuLinear, use_cpu_linear

    assert ONEDNN, "this torch build has no oneDNN: CpuLinear would use F.linear past MAX_ROWS rows"
    model = nn.Sequential(nn.Linear(48, 40, bias=bias), nn.Sequential(nn.Linear(40, 48, bias=bias)))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_linear(model) == 2
    assert [type(m) for m in (model[0], model[1][0])] == [CpuLinear, CpuLinear]
    with torch.no_grad():
        got = model(x)
        want = x.double()
        for layer in (model[0], model[1][0]):
            want = want @ layer.weight.double().t() + (layer.bias.double() if bias else 0)
    assert got.shape == (*shape[:-1], 48) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert use_cpu_linear(model, on=False) == 2 and type(model[1][0]) is nn.Linear
