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


LAYOUTS = [(3, dict(ulysses=3, chunk_size=512)), (2, dict(ring=2, chunk_size=384)),
           (3, dict(tp=3, chunk_size=512))]  # tp=3: DeepSpeed AutoTP over 9 heads / 3 KV heads, tied embeddings


@pytest.mark.parametrize("world,layout", LAYOUTS, ids=["ulysses3", "ring2", "tp3"])
def test_smollm2_greedy_equals_hf(pools, smollm2, world, layout):
    folder, ids, want = smollm2
    got = pools(world).run(bodies.generate_real, folder, ids, 32, layout, timeout=600)
    for rank, tokens in enumerate(got):
        assert tokens == want[: len(tokens)] and (len(tokens) == 32 or tokens[-1] == 2), f"rank {rank}"
