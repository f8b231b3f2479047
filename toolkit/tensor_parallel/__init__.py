"""Tensor parallelism: DeepSpeed AutoTP over the topology's TP groups, and what it leaves undone
(KV heads fewer than TP ranks, fused 3-D experts)."""
