"""Mixture-of-experts layers under tensor parallelism (Mixtral, Qwen3-MoE).

transformers 5 keeps the experts as fused 3-D parameters (gate_up_proj [E, 2I, H], down_proj
[E, H, I]); DeepSpeed AutoTP replaces only 2-D linears, so it leaves every expert whole on every
rank. Here each rank keeps the intermediate rows [a, b) of every expert: the gate and up halves
cut alike, down_proj along its input. An expert's output is then a partial sum over the
intermediate dimension; one all-reduce over the TP group after the experts (what AutoTP's
row-parallel layers do after down_proj) completes it. The router is replicated: every TP rank
holds the same hidden states, routes every token the same way, and top-k routing is per token,
so the sequence split does not change it either.

The cut is made before DeepSpeed sees the model: `init_inference` materialises a meta model with
`to_empty`, which allocates every parameter at the shape it has then, so experts still whole on
the meta model would be allocated whole on every rank (Mixtral-8x7B: ~90 GB in bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.topology import Topology


@dataclass(frozen=True)
class ExpertShare:
    """A rank's part of one fused experts module: intermediate rows [start, stop) of `size`
    (gate_up_proj keeps those rows of its gate half, then of its up half; down_proj those columns)."""

    start: int
    stop: int
    size: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @classmethod
    def whole(cls, size: int) -> "ExpertShare":
        return cls(0, size, size)


def expert_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The modules holding fused 3-D experts (gate_up_proj and down_proj)."""
    found = []
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3:
            found.append((name, module))
    return found


def intermediate_share(size: int, tp: int, rank: int) -> tuple[int, int]:
    """[a, b) of the intermediate rows on TP rank `rank`: even, the first size % tp ranks one more."""
    base, extra = divmod(size, tp)
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def shard_experts(model, topo: Topology) -> dict[str, ExpertShare]:
    """Cut every experts module to this rank's share and sum its output over the TP group.
    Meta parameters (the loader's path, before anything is allocated) get the share's shape;
    real ones (a model loaded whole) are sliced. -> {experts module name: its share}."""
    tp, rank = topo.dims.tp, topo.coords["tp"]
    shares = {}
    for name, module in expert_modules(model):
        experts, two_i, hidden = module.gate_up_proj.shape
        size = two_i // 2
        share = ExpertShare(*intermediate_share(size, tp, rank), size)
        a, b = share.start, share.stop
        gate_up, down = module.gate_up_proj.data, module.down_proj.data
        if gate_up.is_meta:
            gate_up = gate_up.new_empty((experts, 2 * share.rows, hidden))  # [E, 2I/tp, H], meta
            down = down.new_empty((experts, hidden, share.rows))            # [E, H, I/tp], meta
        else:
            gate_up = torch.cat([gate_up[:, a:b], gate_up[:, size + a : size + b]], dim=1)  # gate rows, up rows
            down = down[:, :, a:b].contiguous()
        module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        module.down_proj = torch.nn.Parameter(down, requires_grad=False)
        group, comm = topo.group("tp"), topo.comm
        module.register_forward_hook(lambda _m, _args, out, g=group: comm.all_reduce(out, g, tag="experts"))
        shares[name] = share
    return shares
