"""The CPU's decode matmuls: a linear layer's few-row input multiplied with the weight on the left.

F.linear(x, W) computes x @ W^T. With few rows (a decode step: one per request, plus guesses) on
the CPU, that GEMM reads the weight transposed, well below the speed the memory allows, and a
single row goes to a GEMV no faster. W @ x^T reads the weight as it lies. The `linear` benchmark
(2 cores, fp32, the demo model's 211 linears, weights streamed from memory as in decode) times it
at about 0.5x F.linear's for one row (computed as two: a GEMM of two columns), 0.3x for two and
0.65x for five; at nine rows it gains little with 2 threads (0.86x) and is 1.3x slower with one
(a ring rank of a 2-core machine), so past MAX_ROWS rows (more guesses, larger batches, prefill
chunks) F.linear stays. The sums are the same products in another order: results agree to fp32
rounding, as between any two GEMM kernels."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 5  # past it W @ x^T stops paying, on one thread or two (the linear benchmark)


class FewRowsLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose CPU fp32 inference calls with at most
    MAX_ROWS rows multiply W @ x^T; every other call is F.linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 0 < rows <= MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])                     # [M, K]
        if rows == 1:
            flat = flat.expand(2, -1).contiguous()              # [2, K]: two columns, not a GEMV
        out = torch.mm(self.weight, flat.t())[:, :rows].t()     # [N, M] -> [M, N] (a transposed view)
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], out.shape[-1])  # [..., N]


def use_few_rows_linear(model: nn.Module, on: bool = True) -> int:
    """Every plain nn.Linear of a CPU fp32 model made a FewRowsLinear (on=False: back) -> how many.
    Other devices and dtypes, and DeepSpeed's tensor-parallel linears, are left as they are."""
    changed = 0
    for module in model.modules():
        if on and type(module) is nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype == torch.float32:
            module.__class__ = FewRowsLinear
            changed += 1
        elif not on and type(module) is FewRowsLinear:
            module.__class__ = nn.Linear
            changed += 1
    return changed
