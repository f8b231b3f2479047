"""Loading a mixture-of-experts model at tp=2 never allocates more of an expert than the rank's
share (issue 31, finding 2). What is counted is allocations, not resident memory: `to_empty` on
the CPU leaves its pages untouched, so RSS would not show a whole expert allocated and never
written. Two witnesses on each rank, during the real loading path (meta build, DeepSpeed
AutoTP's `init_inference`, the share reads):
- every tensor any aten op produces (a TorchDispatchMode sees factory ops, `empty_like` in
  `to_empty` included, copies and views): the largest storage behind a 3-D expert-shaped one,
  over this rank's share of that expert tensor;
- the shapes of the experts at the moment DeepSpeed materialises the model (`Module.to_empty`,
  called through unchanged).
The pre-flight's expert bytes per rank (the planner's formula it calls) equal what was allocated."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TP = 2


class ExpertAllocations(TorchDispatchMode):
    """Shapes and storage sizes of the 3-D tensors with a leading expert dimension that any op
    produces while active (meta tensors are not allocations and are left out)."""

    def __init__(self, experts: int):
        super().__init__()
        self.experts, self.seen = experts, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.dim() == 3 and t.shape[0] == self.experts:
                self.seen.append((str(func), tuple(t.shape), t.untyped_storage().nbytes() // t.element_size()))
        return out


def expert_dims(config) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a Mixtral or Qwen3-MoE config."""
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return experts, config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def allocations_while_loading(model_dir: str, case: dict) -> dict:
    """On this rank: load by shares under the two witnesses; -> the largest expert storage over
    its share, the expert shapes at DeepSpeed's to_empty, the bytes the experts hold."""
    from transformers import AutoConfig

    from toolkit import LongContextModel
    from toolkit.tensor_parallel.experts import intermediate_share

    experts, hidden, size = expert_dims(AutoConfig.from_pretrained(model_dir))
    at_to_empty, original = [], torch.nn.Module.to_empty

    def to_empty(module, *args, **kwargs):  # the real one, after noting what it is about to allocate
        at_to_empty.append({n: list(p.shape) for n, p in module.named_parameters() if p.is_meta})
        return original(module, *args, **kwargs)

    torch.nn.Module.to_empty = to_empty
    try:
        with ExpertAllocations(experts) as seen:
            lcm = LongContextModel.from_pretrained(model_dir, chunk_size=16, **case)
    finally:
        torch.nn.Module.to_empty = original
    rank = lcm.topo.coords["tp"]
    a, b = intermediate_share(size, case["tp"], rank)
    share = {"gate_up": experts * 2 * (b - a) * hidden, "down": experts * hidden * (b - a)}  # elements
    over = {}  # op -> the largest expert storage it produced, over this rank's share of that tensor
    for op, shape, numel in seen.seen:
        ratio = numel / share["gate_up" if shape[2] == hidden else "down"]
        over[op] = max(over.get(op, 0.0), ratio)
    params = dict(lcm.model.named_parameters())
    experts = {n: p for n, p in params.items() if p.dim() == 3}
    return dict(over=over, at_to_empty=at_to_empty, held={n: list(p.shape) for n, p in params.items()},
                experts=sorted(experts), expert_bytes=sum(p.numel() * p.element_size() for p in experts.values()),
                rank=rank)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_no_rank_allocates_more_of_an_expert_than_its_share(pools, tiny_dirs, name):
    """Largest expert tensor allocated while loading at tp=2, over the rank's share: 1 (it was 2:
    DeepSpeed's to_empty made every expert whole, and accelerate's meta build allocated each
    parameter for the moment it took to move it to meta)."""
    from transformers import AutoConfig

    from toolkit.planner import load_model_dims
    from toolkit.planner.memory import expert_bytes

    got = pools(TP).run(allocations_while_loading, tiny_dirs(name), dict(tp=TP))
    for r in got:
        assert r["over"], f"rank {r['rank']}: the witness saw no expert tensor at all"
        worst = max(r["over"], key=r["over"].get)
        assert max(r["over"].values()) == 1.0, \
            f"rank {r['rank']}: {worst} made an expert tensor {r['over'][worst]:.2f} times its share"
        # DeepSpeed materialised the model once, every parameter already at the shape the rank keeps
        assert len(r["at_to_empty"]) == 1 and r["at_to_empty"][0] == r["held"], f"rank {r['rank']}"
    # the pre-flight's expert bytes per rank (its dims, the planner's formula) are what was allocated
    dims = load_model_dims(AutoConfig.from_pretrained(tiny_dirs(name)).to_dict())  # as check_memory builds them
    assert all(len(r["experts"]) == 2 * dims.moe_layers for r in got)  # gate_up_proj and down_proj per MoE layer
    assert expert_bytes(dims, TP, 1, 4) == max(r["expert_bytes"] for r in got) > 0
    assert expert_bytes(dims, 1, 1, 4) == sum(r["expert_bytes"] for r in got)  # even split: the shares add up


def test_the_preflight_counts_each_ranks_share_of_the_experts():
    """Mixtral-8x7B's experts are ~90 GB in bf16; a TP rank holds ceil(I/tp) of each expert's
    intermediate rows (14336 rows over tp=3: 4779 on the first ranks), and the weights the
    pre-flight plans for contain exactly that."""
    import dataclasses

    from toolkit.planner import load_model_dims
    from toolkit.planner.memory import expert_bytes, weight_bytes

    d = load_model_dims("mixtral-8x7b")
    whole = expert_bytes(d, 1, 1, 2)
    assert whole == 32 * 8 * 3 * 4096 * 14336 * 2 and whole == pytest.approx(90.2e9, rel=1e-3)
    for tp in (2, 4, 8):
        assert expert_bytes(d, tp, 1, 2) == whole / tp
    assert expert_bytes(d, 3, 1, 2) == 32 * 8 * 3 * 4096 * 4779 * 2
    # one more intermediate row: the pre-flight's weights grow by what the fullest rank's experts grow
    wider = dataclasses.replace(d, intermediate_size=14336 + 2)
    for tp in (1, 2, 3):
        grown = weight_bytes(wider, tp, 1, 2, 2) - weight_bytes(d, tp, 1, 2, 2)
        assert grown == pytest.approx(expert_bytes(wider, tp, 1, 2) - expert_bytes(d, tp, 1, 2))
