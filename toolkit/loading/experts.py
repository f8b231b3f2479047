"""Where a mixture-of-experts layer's weights are in a checkpoint.

transformers 5 holds the experts fused: `experts.gate_up_proj` [E, 2I, H] (each expert's gate
rows, then its up rows) and `experts.down_proj` [E, H, I]. Published checkpoints keep one tensor
per expert: Qwen-MoE `mlp.experts.N.{gate,up,down}_proj.weight`, Mixtral
`block_sparse_moe.experts.N.{w1,w3,w2}.weight` (gate, up, down), and Mixtral's router as
`block_sparse_moe.gate.weight` (transformers renames both on load: its conversion mapping for
these families). A checkpoint saved fused is read as it is. Under tensor parallelism a rank
keeps the intermediate rows [a, b) of every expert (tensor_parallel.experts.ExpertShare, given
to the loader in tensor_parallel.splits.Splits).
"""
from __future__ import annotations

from ..tensor_parallel.experts import ExpertShare
from .checkpoint import ShareError

# (prefix in the model, prefix in the checkpoint, names of the gate, up and down tensors)
PER_EXPERT_LAYOUTS = (
    (".mlp.experts", ".mlp.experts", ("gate_proj", "up_proj", "down_proj")),          # Qwen2/Qwen3-MoE
    (".mlp.experts", ".block_sparse_moe.experts", ("w1", "w3", "w2")),                # Mixtral
)
# a model parameter's name -> the checkpoint's, where a family renames a module
RENAMES = ((".mlp.gate.", ".block_sparse_moe.gate."),)  # Mixtral's router


def renamed(name: str, checkpoint) -> str:
    """The checkpoint's name for a parameter that a family stores under another name."""
    for ours, theirs in RENAMES:
        if ours in name and name.replace(ours, theirs) in checkpoint:
            return name.replace(ours, theirs)
    return name


def expert_reads(module, pname: str, param, source: str, checkpoint, share: ExpertShare | None = None):
    """[(checkpoint tensor, index, where in the parameter)] for a fused experts parameter, None
    for any other parameter. source: the parameter's name as the checkpoint would spell it fused;
    share: the intermediate rows this rank keeps (None: all of them)."""
    if pname not in ("gate_up_proj", "down_proj") or param.dim() != 3 or not hasattr(module, "down_proj"):
        return None
    experts = param.shape[0]
    share = share or ExpertShare.whole(module.down_proj.shape[2])
    a, b, size, n = share.start, share.stop, share.size, share.rows
    if source in checkpoint:  # saved fused
        if pname == "down_proj":
            return [(source, (slice(None), slice(None), slice(a, b)), None)]
        return [(source, (slice(None), slice(a, b), slice(None)), (slice(None), slice(0, n))),
                (source, (slice(None), slice(size + a, size + b), slice(None)), (slice(None), slice(n, 2 * n)))]
    stem = source[: -len(pname) - 1]  # ...layers.L.mlp.experts
    for ours, theirs, (gate, up, down) in PER_EXPERT_LAYOUTS:
        prefix = stem.replace(ours, theirs) if stem.endswith(ours) else None
        if prefix is None or f"{prefix}.0.{down}.weight" not in checkpoint:
            continue
        if pname == "down_proj":  # [H, I] per expert, its columns [a, b)
            return [(f"{prefix}.{e}.{down}.weight", (slice(None), slice(a, b)), (e,)) for e in range(experts)]
        rows = (slice(a, b), slice(None))
        return [read for e in range(experts) for read in
                ((f"{prefix}.{e}.{gate}.weight", rows, (e, slice(0, n))),
                 (f"{prefix}.{e}.{up}.weight", rows, (e, slice(n, 2 * n))))]
    raise ShareError(f"{source}: the checkpoint holds these experts neither fused nor one tensor per expert "
                     f"(looked for {source} and {stem}.0.down_proj.weight)")
