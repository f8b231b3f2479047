"""No buffer grows with N^2 or N x vocab: watch every tensor the prefill creates."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny_models
from helpers import ids as _ids
from toolkit import parallelize


class LargestTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_prefill_never_builds_n_by_n_or_n_by_vocab():
    n, chunk = 1024, 64
    model = tiny_models.build("llama")
    vocab = model.config.vocab_size
    lcm = parallelize(model, chunk_size=chunk)
    ids = _ids(n, seed=1)
    with LargestTensors() as seen:
        lcm.prefill(ids)
    biggest = max(seen.shapes, key=lambda s: torch.Size(s).numel())
    assert torch.Size(biggest).numel() < n * n // 8, f"a buffer of shape {biggest} grows like N^2"
    hidden = model.config.hidden_size
    vocab_rows = [s for s in seen.shapes if s and s[-1] == vocab and torch.Size(s).numel() != hidden * vocab]
    assert vocab_rows and all(torch.Size(s).numel() == vocab for s in vocab_rows), \
        f"logits for more than one position: {sorted(set(vocab_rows))}"  # (hidden, vocab) is the head's weight


def test_auto_preset_uses_the_real_world_size_and_prompt_length(pools, tiny_dirs):
    import bodies

    short, long = pools(2).run(bodies.auto_layout_at_runtime, tiny_dirs("llama_long"), [512, 200_000])[0]
    assert short == dict(tp=2, ulysses=1, ring=1), "a short prompt gets TP"
    assert long["tp"] == 1 and long["ulysses"] * long["ring"] == 2, "a long prompt gets SP"
    odd = pools(4).run(bodies.auto_layout_at_runtime, tiny_dirs("llama9"), [200_000])[0][0]
    assert odd == dict(tp=1, ulysses=1, ring=4), "6 heads / 3 KV heads on 4 ranks: only ring fits"
