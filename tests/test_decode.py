"""Decode paths against the single-process model, in every layout: the static-shape step (what
a CUDA graph captures) gives the eager step's logits and greedy tokens; questions decoded as one
batch over a shared document give the tokens of separate asks (greedy, sampled, rows ending
early); the static step reads no tensor value on the host inside the model."""
import pytest
import torch

import decode_bodies
import tiny_models
from helpers import DOC, LOGITS_ATOL, MORE
from helpers import SESSION_LAYOUTS as LAYOUTS
from helpers import ids as _ids

NEW = 8
PROMPT = _ids(37, seed=11).tolist()[0]  # 37 tokens: three chunks of 16, the last one short
NAMES = [f"{n}-" + ("-".join(f"{k}{v}" for k, v in c.items()) or "world1") for _, n, c in LAYOUTS]


@pytest.fixture(scope="module")
def truth():
    """name -> (greedy tokens, logits after the prompt and each token) of the single-process HF model."""
    return lambda name: tiny_models.decode_truth(name, tuple(PROMPT), NEW)


@pytest.mark.parametrize("world,name,layout", LAYOUTS, ids=NAMES)
def test_static_decode_equals_eager_and_the_single_process_model(pools, tiny_dirs, truth, world, name, layout):
    tokens, logits = truth(name)
    results = pools(world).run(decode_bodies.decode_paths, tiny_dirs(name), dict(layout, chunk_size=16), PROMPT, tokens)
    for rank, got in enumerate(results):
        for mode in ("eager", "static"):
            diff = (got[mode] - logits).abs().max().item()
            assert diff <= LOGITS_ATOL, f"rank {rank} {mode}: decode logits differ by {diff}"
        assert got["tokens"] == tokens, f"rank {rank}: static greedy tokens"


@pytest.mark.parametrize("world,name,layout", LAYOUTS, ids=NAMES)
def test_questions_decoded_together_equal_separate_asks(pools, tiny_dirs, world, name, layout):
    results = pools(world).run(decode_bodies.asked_together, tiny_dirs(name), dict(layout, chunk_size=16),
                               DOC, MORE, NEW)
    for rank, got in enumerate(results):
        alone = got["alone"]
        assert len({len(a) for a in alone}) > 1, "EOS must stop some rows before the others"
        assert got["together"] == alone, f"rank {rank}: one batch"
        assert got["pairs"] == alone, f"rank {rank}: batches of two"
        assert got["together_sampled"] == got["alone_sampled"], f"rank {rank}: sampled"
        assert got["streamed"] == (alone if rank == 0 else [[] for _ in alone]), f"rank {rank}: on_token (rank 0 streams)"
        assert got["batch_sizes"] == [2, 2, 1]
        assert got["doc_tokens"] == len(DOC), f"rank {rank}: the document's cache was not rolled back"


@pytest.mark.parametrize("world,layout", [(1, {}), (2, dict(ring=2)), (2, dict(ulysses=2))], ids=["world1", "ring2", "ulysses2"])
def test_static_step_reads_no_tensor_value_on_the_host(pools, tiny_dirs, world, layout):
    """The one host read left is transformers' packed-sequence check in its mask code, which it
    skips while a CUDA stream is being captured (its is_tracing() covers capture)."""
    results = pools(world).run(decode_bodies.host_syncs_in_static_step, tiny_dirs("llama"), layout, PROMPT)
    for rank, seen in enumerate(results):
        ours = [s for s in seen if "find_packed_sequence_indices" not in s]
        assert not ours, f"rank {rank}: host syncs in the static decode step: {ours}"
        assert len(seen) <= 1


def test_cuda_graph_is_refused_without_a_cuda_device(tiny_dirs):
    from toolkit import LongContextModel

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: benchmarks/gpu_check.sh runs the graph")
    with pytest.raises(ValueError, match="CUDA device"):
        LongContextModel.from_pretrained(tiny_dirs("llama"), cuda_graph=True)


@pytest.mark.parametrize("model_type,fields,positional", [
    ("llama", {}, False),
    ("phi3", dict(sliding_window=2047, max_position_embeddings=4096), True),  # Phi-3-mini-4k
    ("phi3", dict(sliding_window=262144, max_position_embeddings=131072), False),  # Phi-3.5-mini: never reached
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4096), True),
    ("qwen3_moe", {}, False),
    ("mistral", dict(sliding_window=4096), True),
    ("gemma2", {}, True)])
def test_which_configs_attend_by_position(model_type, fields, positional):
    """Every config whose window transformers would apply (any model type) keeps --cuda-graph off."""
    from transformers import AutoConfig

    from toolkit.engine.hf import uses_positional_attention

    assert uses_positional_attention(AutoConfig.for_model(model_type, **fields)) is positional


def test_the_static_step_stops_where_a_window_starts_to_apply(tiny_dirs):
    """A CUDA graph replays without calling attention, so the step checks the window itself each token."""
    from toolkit import LongContextModel
    from toolkit.engine.decode import decoder

    lcm = LongContextModel.from_pretrained(tiny_dirs("mistral_swa"))  # window 8
    logits = lcm.prefill(torch.tensor([PROMPT[:5]]), reserve_new_tokens=6)
    step = decoder(lcm.model, lcm.last_state, lcm.stage, "static", 6)
    token = int(logits.argmax())
    for position in range(5, 8):
        token = int(step(token, position).argmax())
    with pytest.raises(ValueError, match="reached position 8, past this model's sliding window of 8"):
        step(token, 8)


def test_ask_many_refuses_bad_input(tiny_dirs):
    from toolkit import LongContextModel

    lcm = LongContextModel.from_pretrained(tiny_dirs("llama"))
    session = lcm.prefill_document(DOC)
    with pytest.raises(ValueError, match="at least one question"):
        session.ask_many([])
    with pytest.raises(ValueError, match="batch"):
        session.ask_many(MORE, batch=0)
    with pytest.raises(ValueError, match="context"):
        session.ask_many(MORE, max_new_tokens=5000)
