"""--rope-scaling / rope_scaling=: yarn, linear and dynamic, each exact against the
single-process model built with the same scaled config, in a sequence-parallel layout; the
context grows by the factor; bad specs are refused in one line."""
import pytest
import torch
from click.testing import CliRunner

import session_bodies
import tiny_models
from helpers import LOGITS_ATOL, one_error_line
from helpers import ids as _ids
from toolkit.rope_scaling import scaled

NEW = 8
CASES = [(2, "yarn:4", dict(ring=2)), (2, "linear:2", dict(ulysses=2)), (2, "dynamic:3", dict(ring=2)),
         (1, "yarn:2", {})]


def reference(folder, spec):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = scaled(AutoConfig.from_pretrained(folder), spec)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@pytest.mark.parametrize("world,spec,layout", CASES, ids=[f"{s}-{l or 'world1'}" for _, s, l in CASES])
def test_scaled_rope_is_exact_in_every_layout(pools, tiny_dirs, world, spec, layout):
    folder = tiny_dirs("llama")
    ids = _ids(45, seed=2)
    model = reference(folder, spec)
    want_logits, want_tokens = tiny_models.reference_logits(model, ids), tiny_models.reference_generate(model, ids, NEW)
    plain = tiny_models.reference_logits(reference(folder, None), ids)
    assert (plain - want_logits).abs().max() > 10 * LOGITS_ATOL  # the scaling changes the answer
    for rank, got in enumerate(pools(world).run(session_bodies.rope_scaled, folder, dict(layout, chunk_size=16),
                                                ids, spec, NEW)):
        assert (got["logits"] - want_logits).abs().max() <= LOGITS_ATOL, f"rank {rank}"
        assert got["tokens"] == want_tokens, f"rank {rank}"
        assert got["max_positions"] == int(4096 * float(spec.split(":")[1]))


def test_dynamic_is_transformers_dynamic_ntk_fixed_at_the_scaled_length(tiny_dirs):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(tiny_dirs("llama"))
    ours = scaled(config, "dynamic:3")
    theirs = AutoConfig.from_pretrained(tiny_dirs("llama"))
    theirs.rope_parameters = {**theirs.rope_parameters, "rope_type": "dynamic", "factor": 3.0}
    hf_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](theirs, "cpu", seq_len=3 * 4096)
    dim = 64 // 4  # the tiny llama's head dim
    base = ours.rope_parameters["rope_theta"]
    our_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)  # default RoPE with our base
    assert ours.rope_parameters["rope_type"] == "default" and ours.max_position_embeddings == 3 * 4096
    assert torch.allclose(hf_freq, our_freq, rtol=1e-6)


@pytest.mark.parametrize("spec, words", [("yarn", "TYPE:FACTOR"), ("ntk:2", "TYPE:FACTOR"), ("linear:0.5", "above 1")])
def test_bad_specs_are_one_line(spec, words):
    from toolkit.cli import cli

    result = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--rope-scaling", spec])
    assert result.exit_code == 2 and words in one_error_line(result)
