"""The draft model of --speculate draft (toolkit.engine.draft_model): checked against the model's
config before any weight is read, loaded whole on rank 0."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from ..models import resolve_source, weights_folder
from .cpu_linear import use_cpu_linear


def check_draft_config(draft, config) -> None:
    """Refuse, before any weight is read, a draft model whose tokens are not the model's."""
    if draft.vocab_size != config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.vocab_size} tokens and the model's {config.vocab_size}: "
                         "a draft model must share the model's tokenizer (a smaller model of the same family)")


def load_draft(path: str, dtype: str, device):
    """The draft model, whole, on `device`, in the run's dtype."""
    folder = weights_folder(resolve_source(path, None))  # a GGUF converted once, as the model's is
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    use_cpu_linear(model)
    return model
