"""The CPU's matmuls for a linear layer: the weight on the left for a decode step's few rows,
oneDNN's fp32 GEMM for more.

F.linear(x, W) computes x @ W^T. On the CPU (torch's MKL path) that GEMM reads the weight
transposed, below the speed the memory allows at a decode step's few rows, and below the speed
oneDNN's own fp32 GEMM reaches at every row count. The `linear` benchmark (2 cores, fp32, the demo
model's 211 linears, weights streamed from memory as in decode) shows two kernels that do better:
- up to MAX_ROWS rows, W @ x^T (the weight read as it lies; one row computed as two, a GEMM of two
  columns, not a GEMV): about 0.5x F.linear's time for one row and 0.3-0.6x for two to five;
- past it (a batch of requests, a step of many guesses, a prefill chunk), oneDNN's GEMM on the
  weight as it is (`mkldnn._linear_pointwise`, no packed copy: weight memory is unchanged):
  0.6-0.9x F.linear's from 6 rows to 512 (0.66x at 16, 0.86x at 512), where W @ x^T stops paying
  (from six rows, on two threads and on one, a ring rank's share of a 2-core machine); past 16 rows
  on a bounded set of row counts (onednn_rows), padded with zeros.
Both compute the same products in another order: results agree to fp32 rounding, as between any
two GEMM kernels. Without oneDNN in the torch build, F.linear serves past MAX_ROWS."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 5  # past it W @ x^T is no faster than oneDNN's GEMM, on one thread or two (the linear benchmark)
EXACT_ROWS = 16  # oneDNN runs up to this many rows as they are; past it, on a bounded set of row counts


def onednn_rows(rows: int) -> int:
    """The row count oneDNN's GEMM is called with for `rows` rows: as they are up to EXACT_ROWS,
    past it rounded up to one of four counts per octave (at most a quarter more rows). oneDNN
    builds and keeps a kernel per shape it meets (about half a MiB each, not all returned when its
    cache evicts them): a server whose steps have every row count from 6 to 1,000 grew by hundreds
    of MiB, where a bounded set of counts keeps it flat."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 3)  # rows in [2^k, 2^(k+1)): steps of 2^(k-2)
    return -(-rows // step) * step
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (1 <= M <= MAX_ROWS) -> x @ W^T [M, N], computed as W @ x^T."""
    rows = x.shape[0]
    if rows == 1:
        x = x.expand(2, -1).contiguous()                     # [2, K]: two columns, not a GEMV
    return torch.mm(weight, x.t())[:, :rows].t()             # [N, M] -> [M, N] (a transposed view)


def onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> x @ W^T [M, N] by oneDNN's fp32 GEMM (no bias: added by the caller), on
    onednn_rows(M) rows (zeros below x's)."""
    rows = x.shape[0]
    called = onednn_rows(rows)
    if called != rows:
        x = torch.cat([x, x.new_zeros(called - rows, x.shape[1])])  # [called, K]
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [None], "")[:rows]


class CpuLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose CPU fp32 inference calls use the
    kernels above; every other call (training, other devices and dtypes) is F.linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not rows or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() \
                or (rows > MAX_ROWS and not ONEDNN):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])                  # [M, K]
        out = few_rows(flat, self.weight) if rows <= MAX_ROWS else onednn(flat.contiguous(), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], out.shape[-1])  # [..., N]


def use_cpu_linear(model: nn.Module, on: bool = True) -> int:
    """Every plain nn.Linear of a CPU fp32 model made a CpuLinear (on=False: back) -> how many.
    Other devices and dtypes, and DeepSpeed's tensor-parallel linears, are left as they are."""
    changed = 0
    for module in model.modules():
        if on and type(module) is nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype == torch.float32:
            module.__class__ = CpuLinear
            changed += 1
        elif not on and type(module) is CpuLinear:
            module.__class__ = nn.Linear
            changed += 1
    return changed
