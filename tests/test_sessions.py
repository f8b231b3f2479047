"""Document sessions: prefill once, ask many. Every answer equals the single-process model's
greedy tokens on document + question (logits within LOGITS_ATOL) in every layout, whatever
was asked before; a cache saved on one layout loads on another with the same answers; bad
caches are refused in one line; a failed save leaves the old cache."""
import json
from pathlib import Path

import pytest
import torch

import session_bodies
import tiny_models
from helpers import DOC, LOGITS_ATOL, QUESTIONS
from helpers import SESSION_LAYOUTS as LAYOUTS

NEW = 8


@pytest.fixture(scope="module")
def truth():
    """name -> (greedy tokens, last logits) per question, from the single-process HF model."""
    cache = {}

    def get(name):
        if name not in cache:
            model = tiny_models.build(name)
            rows = []
            for q in QUESTIONS:
                ids = torch.tensor([DOC + q])
                rows.append((tiny_models.reference_generate(model, ids, NEW), tiny_models.reference_logits(model, ids)))
            cache[name] = rows
        return cache[name]

    return get


def check(got: dict, expected, where: str):
    for i, (tokens, logits) in enumerate(expected):
        assert got["tokens"][i] == tokens, f"{where}: question {i}"
        diff = (got["logits"][i] - logits).abs().max().item()
        assert diff <= LOGITS_ATOL, f"{where}: question {i} logits differ by {diff}"




@pytest.mark.parametrize("world,name,layout", LAYOUTS,
                         ids=[f"{n}-" + ("-".join(f"{k}{v}" for k, v in c.items()) or "world1") for _, n, c in LAYOUTS])
def test_every_answer_equals_a_fresh_single_process_generate(pools, tiny_dirs, truth, world, name, layout):
    results = pools(world).run(session_bodies.ask_after_prefill, tiny_dirs(name), dict(layout, chunk_size=16),
                               DOC, QUESTIONS, NEW)
    for rank, got in enumerate(results):
        check(got, truth(name), f"rank {rank}")
        assert got["again_tokens"] == got["tokens"], f"rank {rank}: an earlier question changed an answer"
        assert sum(got["shard_lengths"]) == len(DOC)  # rolled back to the document


# saved on the first layout, loaded on the second: positions and heads re-cut on load
PAIRS = [
    ((4, dict(ring=4)), (2, dict(ring=2))),
    ((4, dict(ulysses=2, ring=2)), (2, dict(ulysses=2))),
    ((4, dict(tp=2, ring=2)), (1, {})),
    ((1, {}), (4, dict(tp=2, ulysses=2))),
    ((2, dict(pp=2)), (2, dict(ring=2, ring_mode="pass-q"))),
]


@pytest.fixture(scope="module")
def saved(pools, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for (world, layout), _ in PAIRS:
        key = json.dumps(layout, sort_keys=True)
        if key not in out:
            path = root / (key.strip("{}").replace('"', "").replace(": ", "").replace(", ", "-") or "world1")
            got = pools(world).run(session_bodies.ask_after_prefill, tiny_dirs("llama4l"),
                                   dict(layout, chunk_size=16), DOC, QUESTIONS[:1], NEW, str(path))
            out[key] = (path, got)
    return out


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s[1] or 'world1'}->{t[1] or 'world1'}" for s, t in PAIRS])
def test_a_cache_saved_on_one_layout_answers_the_same_on_another(pools, tiny_dirs, truth, saved, source, target):
    path, _ = saved[json.dumps(source[1], sort_keys=True)]
    world, layout = target
    results = pools(world).run(session_bodies.ask_after_load, tiny_dirs("llama4l"), dict(layout, chunk_size=8),
                               str(path), QUESTIONS, NEW)
    for rank, got in enumerate(results):
        assert got["loaded_tokens"] == len(DOC)
        ring = layout.get("ring", 1)  # every rank knows every shard's length: an even share of the document
        assert got["shard_lengths"] == [len(DOC) // ring + (r < len(DOC) % ring) for r in range(ring)], f"rank {rank}"
        check(got, truth("llama4l"), f"rank {rank}")


def test_the_saved_directory_is_a_manifest_and_one_safetensors_file_per_rank(saved):
    path, results = saved[json.dumps(dict(ulysses=2, ring=2), sort_keys=True)]
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["lctk-marker.json", "manifest.json", "tokens.safetensors"] + [f"rank-{r:05d}.safetensors" for r in range(4)])
    assert manifest["tokens"] == len(DOC) and manifest["layout"] == {"tp": 1, "ulysses": 2, "ring": 2, "pp": 1}
    assert manifest["dtype"] == "float32" and manifest["model"]["weights"] and manifest["chunk_size"] == 16
    covered = sorted(p for r in manifest["ranks"] if r["coords"]["ulysses"] == 0
                     for s, n in r["positions"] for p in range(s, s + n))
    assert covered == list(range(len(DOC)))  # the ring ranks' positions: every one, once
    # K and V of 4 layers x 2 KV heads x 45 positions x 16 dims in fp32: each stored once over the 4 ranks
    assert manifest["kv_bytes"] == 2 * 4 * 2 * len(DOC) * 16 * 4
    assert not list(path.parent.glob(".*partial")) and not list(path.parent.glob(".*old"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def one_cache(saved):
    return saved[json.dumps({}, sort_keys=True)][0]


@pytest.mark.parametrize("damage, words", [
    ("truncate", "is truncated"),
    ("garbage", "is truncated"),  # same size checked first; a different size says truncated
    ("header", "is corrupted"),
    ("tokens", "token ids do not match"),
    ("manifest", "manifest.json is corrupted"),
    ("missing", "manifest.json is missing"),
    ("other-model", "saved from another model"),
    ("other-weights", "same configuration but other weights"),
    ("dtype", "holds float32 keys and values; this model runs in bfloat16"),
])
def test_bad_caches_are_refused_in_one_line(pools, tiny_dirs, one_cache, tmp_path, damage, words):
    path = _copy(one_cache, tmp_path / "cache")
    model, case = tiny_dirs("llama4l"), {}
    rank0 = path / "rank-00000.safetensors"
    if damage == "truncate":
        rank0.write_bytes(rank0.read_bytes()[:-100])
    elif damage == "garbage":
        rank0.write_bytes(b"\x00" * 10)
    elif damage == "header":
        data = bytearray(rank0.read_bytes())
        data[8:16] = b"notjson!"
        rank0.write_bytes(bytes(data))
    elif damage == "tokens":
        from safetensors.torch import save_file

        save_file({"ids": torch.tensor(DOC[:-1] + [DOC[-1] ^ 1])}, str(path / "tokens.safetensors"))
    elif damage == "manifest":
        (path / "manifest.json").write_text("{not json")
    elif damage == "missing":
        (path / "manifest.json").unlink()
    elif damage == "other-model":
        model = tiny_dirs("llama")
    elif damage == "other-weights":
        model = tiny_models.save("llama4l", tmp_path / "reseeded", seed=7)
    elif damage == "dtype":
        case = dict(dtype="bfloat16")
    message = pools(1).run(session_bodies.load_refusal, model, case, str(path))[0]
    assert words in message and "\n" not in message, message


def test_a_failed_save_leaves_the_old_cache_and_no_partial_directory(pools, tiny_dirs, one_cache, tmp_path):
    path = _copy(one_cache, tmp_path / "cache")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    got = pools(2).run(session_bodies.save_interrupted, tiny_dirs("llama4l"), dict(ring=2), DOC, str(path), 1)
    for message in got:  # every rank hears of rank 1's failure
        assert "rank 1" in message and "nothing was replaced" in message, message
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
