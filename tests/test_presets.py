"""Presets: shipped files load, bad files are rejected with file, line, key and
allowed values, and make_run_config turns a preset plus overrides into a run configuration."""
from pathlib import Path

import pytest

from toolkit.planner import PlanError, config_dir
from toolkit.config import make_run_config
from toolkit.planner.presets import Preset, PresetError, list_presets, load_preset


def resolve_layout(preset, model, world, gpus_per_node, context, overrides=None, hardware="cpu"):
    """The run configuration of a preset, as the dict `--json` reports."""
    return make_run_config(model, world, ranks_per_node=gpus_per_node, context_tokens=context, preset=preset,
                           hardware=hardware, **(overrides or {})).to_dict()


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_dir_is_the_repo_configs_folder():
    assert (config_dir() / "presets" / "auto.yaml").is_file()
    assert config_dir().name == "configs"


def test_shipped_presets_load_with_one_line_descriptions():
    presets = dict(list_presets())
    assert {"latency-tp", "long-ulysses", "million-ring", "hybrid-node", "auto"} <= set(presets)
    for name, description in presets.items():
        assert description and "\n" not in description
        preset = load_preset(name)
        assert isinstance(preset, Preset) and preset.name == name


def test_preset_is_frozen():
    preset = load_preset("auto")
    with pytest.raises(AttributeError):
        preset.tp = 2


def test_load_by_path(tmp_path: Path):
    path = write(tmp_path, "description: two-way TP\ntp: 2\nulysses: 1\nring: 1\npp: 1\n")
    preset = load_preset(str(path))
    assert (preset.name, preset.tp, preset.ring_mode) == ("mine", 2, "auto")
    assert preset.chunk_size is None


def test_bad_value_names_file_line_key_and_allowed_values(tmp_path: Path):
    path = write(tmp_path, "description: x\ntp: 2\nring_mode: pass_kv\n")
    with pytest.raises(PresetError) as info:
        load_preset(path)
    assert str(info.value) == (f"{path}, line 3: key 'ring_mode': 'pass_kv' is not allowed; "
                               "allowed values: pass-kv, pass-q, auto")


@pytest.mark.parametrize("line, key, allowed", [
    ("tp: 0", "'tp'", "a positive integer or auto"),
    ("ulysses: two", "'ulysses'", "a positive integer or auto"),
    ("chunk_size: -5", "'chunk_size'", "a positive integer"),
    ("sequence_layout: spiral", "'sequence_layout'", "zigzag, contiguous"),
    ("dtype: fp64", "'dtype'", "float32, bfloat16, float16, auto"),
    ("workload: training", "'workload'", "prefill, decode, auto"),
    ("kv_dtype: int2", "'kv_dtype'", "auto, bf16, fp16, int8, int4, fp8"),
])
def test_each_key_is_checked(tmp_path: Path, line, key, allowed):
    path = write(tmp_path, f"description: x\n{line}\n")
    with pytest.raises(PresetError) as info:
        load_preset(path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and key in message
    assert message.endswith("allowed values: " + allowed)


def test_unknown_key_lists_known_keys(tmp_path: Path):
    path = write(tmp_path, "description: x\nringmode: auto\n")
    with pytest.raises(PresetError, match=r"line 2: unknown key 'ringmode'; known keys: "
                                          r"description, tp, ulysses, ring, pp, chunk_size"):
        load_preset(path)


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    path = write(tmp_path, "description: x\ntp: [1, 2\nring: 1\n")
    with pytest.raises(PresetError, match=rf"{path}, line \d: invalid YAML"):
        load_preset(path)


def test_missing_description_and_non_mapping(tmp_path: Path):
    with pytest.raises(PresetError, match="missing key 'description'"):
        load_preset(write(tmp_path, "tp: 2\n"))
    with pytest.raises(PresetError, match="must be a mapping"):
        load_preset(write(tmp_path, "- tp\n- 2\n", "list.yaml"))


def test_only_safe_yaml_is_loaded(tmp_path: Path):
    path = write(tmp_path, "description: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(PresetError, match="invalid YAML"):
        load_preset(path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(PresetError, match="unknown preset 'fastest'; known presets: auto"):
        load_preset("fastest")


def test_resolve_auto_fills_degrees_and_defaults():
    layout = resolve_layout("auto", "smollm2-135m", 4, None, 1000)
    assert set(layout) == {"tp", "ulysses", "ring", "pp", "chunk_size", "ring_mode",
                           "sequence_layout", "dtype", "why", "kv_dtype", "speculate"}
    assert (layout["tp"], layout["ulysses"], layout["ring"], layout["pp"]) == (1, 1, 4, 1)
    assert layout["dtype"] == "float32"  # the cpu entry's default dtype
    assert layout["chunk_size"] == 1000 and layout["ring_mode"] == "auto" and layout["kv_dtype"] == "auto"


def test_resolve_overrides_win():
    tiny = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    layout = resolve_layout("auto", tiny, 4, None, 100,
                            {"tp": 2, "ring": None, "chunk_size": 16, "dtype": "bfloat16"})
    assert layout["tp"] == 2 and layout["tp"] * layout["ulysses"] * layout["ring"] == 4
    assert (layout["chunk_size"], layout["dtype"]) == (16, "bfloat16")
    fixed = resolve_layout("cpu-fp32", tiny, 4, None, 100, {"tp": 1, "ulysses": 2, "ring": 2})
    assert (fixed["tp"], fixed["ulysses"], fixed["ring"], fixed["pp"]) == (1, 2, 2, 1)


def test_resolve_rejects_bad_overrides_and_layouts():
    with pytest.raises(PresetError, match="key 'ring_mode'"):
        resolve_layout("auto", "smollm2-135m", 2, None, 100, {"ring_mode": "sideways"})
    with pytest.raises(PlanError, match="must multiply to the world size"):
        resolve_layout("auto", "smollm2-135m", 4, None, 100,
                       {"tp": 1, "ulysses": 1, "ring": 2, "pp": 1})
    with pytest.raises(PlanError, match=r"preset 'long-ulysses'.*valid Ulysses degrees: 1, 3, 9"):
        resolve_layout("long-ulysses", "smollm2-135m", 4, None, 100)


def test_resolve_latency_tp_on_gpus():
    layout = resolve_layout("latency-tp", "llama-3.1-70b", 16, 8, 2000, hardware="h100-80gb")
    assert (layout["tp"], layout["ulysses"], layout["ring"], layout["pp"]) == (8, 1, 2, 1)
    assert layout["dtype"] == "bfloat16"


def test_pipeline_preset_splits_405b_across_two_nodes():
    layout = resolve_layout("pipeline-nodes", "llama-3.1-405b", 16, 8, 32768, hardware="h100-80gb")
    assert (layout["tp"], layout["ulysses"], layout["ring"], layout["pp"]) == (8, 1, 1, 2)
    assert layout["dtype"] == "bfloat16"
    # the CLI's --pp override fixes the degree the preset left to the planner
    with pytest.raises(PlanError, match="no layout with ulysses=1, ring=1, pp=1 is valid"):
        resolve_layout("pipeline-nodes", "llama-3.1-405b", 16, 8, 32768, {"pp": 1}, hardware="h100-80gb")


def test_default_dtype_is_float32_on_cpu_and_the_checkpoints_own_on_gpus():
    from transformers import LlamaConfig

    fp16 = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, hidden_size=64, dtype="float16").to_dict()
    unknown = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, hidden_size=64).to_dict()
    assert make_run_config(fp16, 8, hardware="h100-80gb", tp=8).dtype == "float16"  # explicit degrees too
    assert make_run_config(fp16, 8, hardware="h100-80gb").dtype == "float16"        # the auto preset
    assert make_run_config(fp16, 8, hardware="cpu").dtype == "float32"
    assert make_run_config(fp16, 8, hardware="h100-80gb", preset="cpu-fp32").dtype == "float32"  # a preset's
    assert make_run_config(fp16, 8, hardware="h100-80gb", dtype="bfloat16").dtype == "bfloat16"  # the flag's
    assert make_run_config(unknown, 8, hardware="h100-80gb", tp=8).dtype == "bfloat16"  # no torch_dtype: hardware's


def test_a_preset_can_store_the_kv_cache_quantised(tmp_path: Path):
    """kv_dtype in a preset reaches the run configuration, and the planner sizes the cache by it."""
    from toolkit.config import make_run_config

    path = write(tmp_path, "description: int8 cache\nkv_dtype: int8\n")
    tiny = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    assert make_run_config(tiny, 2, preset=str(path), context_tokens=1000).kv_dtype == "int8"
    assert make_run_config(tiny, 2, preset=str(path), context_tokens=1000, kv_dtype="int4").kv_dtype == "int4"
    assert make_run_config(tiny, 2, ring=2).kv_dtype == "auto"
