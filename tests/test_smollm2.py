"""The real demo model (SmolLM2-135M-Instruct: 9 heads, 3 KV heads) on a 1K+ token prompt."""
import pytest
import torch

import bodies


@pytest.fixture(scope="module")
def smollm2():
    """(converted folder, tokenizer, prompt ids [1, N], HF greedy reference of 32 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models import _converted_gguf_folder, resolve_source
    from toolkit.summarize.synthetic import station_logbook

    folder = str(_converted_gguf_folder(resolve_source("smollm2-135m")))
    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": station_logbook(days=40, seed=1) + "\n\nSummarise the logbook."}]
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)])
    assert ids.shape[1] > 1024
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    return folder, ids, want


def test_smollm2_ulysses_3_greedy_equals_hf(pools, smollm2):
    folder, ids, want = smollm2
    got = pools(3).run(bodies.generate_real, folder, ids, 32, dict(ulysses=3, chunk_size=512), timeout=600)
    for rank, tokens in enumerate(got):
        assert tokens == want[: len(tokens)] and (len(tokens) == 32 or tokens[-1] == 2), f"rank {rank}"


def test_smollm2_ring_2_greedy_equals_hf(pools, smollm2):
    folder, ids, want = smollm2
    got = pools(2).run(bodies.generate_real, folder, ids, 32, dict(ring=2, chunk_size=384), timeout=600)
    for rank, tokens in enumerate(got):
        assert tokens == want[: len(tokens)] and (len(tokens) == 32 or tokens[-1] == 2), f"rank {rank}"


def test_smollm2_tp_3_greedy_equals_hf(pools, smollm2):
    """DeepSpeed AutoTP over 9 heads / 3 KV heads with tied embeddings."""
    folder, ids, want = smollm2
    got = pools(3).run(bodies.generate_real, folder, ids, 32, dict(tp=3, chunk_size=512), timeout=600)
    for rank, tokens in enumerate(got):
        assert tokens == want[: len(tokens)] and (len(tokens) == 32 or tokens[-1] == 2), f"rank {rank}"
