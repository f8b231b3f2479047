"""Each rank reads only its share of the checkpoint: the same parameters, to the bit, as the
whole-model path (HF from_pretrained, then AutoTP and pipeline trimming), nothing left on the
meta device, and the single-process model's greedy tokens."""
import pytest
import torch

import bodies
import tiny_models
from helpers import ids as _ids

NEW_TOKENS = 12

# world, model, layout: uneven AutoTP splits (tp=3: 112 MLP rows in 64-grains -> 64, 0, 48),
# GQA, q/k/v biases, a tied head, pipeline stages with and without TP, a dtype conversion
CASES = [
    (2, "qwen2", dict(tp=2)),
    (2, "llama_tied", dict(pp=2)),
    (2, "llama_tied", dict(tp=2)),
    (2, "llama", dict(tp=2, dtype="bfloat16")),
    (3, "llama9", dict(tp=3)),
    (4, "llama_tied", dict(tp=2, pp=2)),
    (4, "llama", dict(tp=2, ring=2)),
    # the families' own shares: experts cut along the intermediate dim (per-expert checkpoint
    # tensors), fused projections per sub-parameter, KV heads replicated over TP ranks
    (2, "mixtral", dict(tp=2)),
    (4, "qwen3_moe", dict(tp=2, ring=2)),
    (2, "phi3", dict(tp=2)),
    (4, "qwen2_kv2", dict(tp=4)),
]


def planned_shares_of(folder, tp, pp):
    """What `lctk info` predicts each rank holds, from a meta model in this process."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.tensor_parallel.autotp import planned_shares

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return planned_shares(model, tp, pp)


@pytest.fixture(scope="module")
def sharded_dirs(tmp_path_factory):
    """Checkpoints written as several safetensors files and an index, as large models are."""
    root = tmp_path_factory.mktemp("sharded")
    return {name: tiny_models.save(name, root / name, max_shard_size="20KB")
            for name in {name for _, name, _ in CASES}}


@pytest.mark.parametrize("world,name,layout", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in c.items())}"
                                                          for _, n, c in CASES])
def test_share_reads_equal_the_whole_model_path(pools, sharded_dirs, world, name, layout):
    folder = sharded_dirs[name]
    assert len(list(__import__("pathlib").Path(folder).glob("*.safetensors"))) > 1
    ids = _ids(45, seed=world)
    results = pools(world).run(bodies.loaded_both_ways, folder, dict(layout, chunk_size=16), ids, NEW_TOKENS)
    for rank, got in enumerate(results):
        assert got["differ"] == [], f"rank {rank}: differs from the whole-model path: {got['differ']}"
        assert got["on_meta"] == [], f"rank {rank}: left on the meta device: {got['on_meta']}"
        assert got["tensors"] > 0
    planned = planned_shares_of(folder, layout.get("tp", 1), layout.get("pp", 1))
    for rank, got in enumerate(results):
        assert got["held_params"] == planned[got["coords"]["pp"]][got["coords"]["tp"]], f"rank {rank}"
    if layout.get("dtype", "float32") == "float32":
        want = tiny_models.reference_generate(tiny_models.build(name), ids, NEW_TOKENS)
        assert all(got["tokens"] == want for got in results)


def test_info_shows_the_checkpoint_and_each_ranks_share(sharded_dirs):
    import json

    from click.testing import CliRunner

    from toolkit.cli import cli
    from toolkit.loading.checkpoint import Checkpoint

    folder = sharded_dirs["llama_tied"]
    result = CliRunner().invoke(cli, ["info", "--model", folder, "--tp", "2", "--pp", "2", "--json"])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    with Checkpoint(folder) as checkpoint:
        assert model["checkpoint_bytes"] == sum(t.numel() * t.element_size()
                                                for t in (checkpoint.read(n) for n in checkpoint.entries))
        assert model["files"] > 1
    assert model["rank_bytes"] == [[4 * n for n in stage] for stage in planned_shares_of(folder, 2, 2)]
    table = CliRunner().invoke(cli, ["info", "--model", folder, "--tp", "2", "--pp", "2"])
    assert table.exit_code == 0 and table.stdout.count("rank share") == 4, table.output
    refused = CliRunner().invoke(cli, ["info", "--model", folder, "--tp", "3"])
    assert refused.exit_code == 2 and "does not divide" in refused.output


@pytest.mark.parametrize("block", [16, 1 << 20])  # staging blocks smaller than a row, and larger
def test_slice_reads_equal_safetensors_own(tmp_path, monkeypatch, block):
    """pread slice reads, straight or through a staging block (dtype conversion), against
    the tensors safetensors itself wrote: whole, row slices, column slices, empty, scalar."""
    from safetensors.torch import save_file

    import toolkit.loading.checkpoint as checkpoint_module
    from toolkit.loading.checkpoint import Checkpoint

    monkeypatch.setattr(checkpoint_module, "BLOCK_BYTES", block)
    tensors = {"a": torch.randn(7, 5, 3), "b": torch.randn(11).to(torch.bfloat16), "c": torch.tensor(3.0),
               "d": torch.arange(24, dtype=torch.int64).view(4, 6)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        for index in [None, (slice(2, 5),), (slice(None), slice(1, 4)), (slice(None), slice(None), slice(0, 2))]:
            assert torch.equal(ckpt.read("a", index), tensors["a"][index] if index else tensors["a"]), index
        out = torch.empty(7, 2, 3, dtype=torch.bfloat16)
        ckpt.read_into("a", (slice(None), slice(3, 5)), out)
        assert torch.equal(out, tensors["a"][:, 3:5].bfloat16())
        assert torch.equal(ckpt.read("b"), tensors["b"]) and ckpt.read("b", (slice(3, 3),)).numel() == 0
        assert torch.equal(ckpt.read("c"), tensors["c"]) and torch.equal(ckpt.read("d", (slice(None), slice(5, 6))),
                                                                         tensors["d"][:, 5:6])
        with pytest.raises(ValueError, match="at most one"):
            ckpt.read("a", (slice(1, 2), slice(1, 2)))
