"""Each option is declared once (toolkit.options) and every surface derives it: a flag of each
model command and of `lctk plan` with the declared choices, default and help; a preset key (a
preset is a partial run config); a keyword of make_run_config and from_pretrained. A bad value
is refused in the declaration's words on each. Every test walks the declarations, so a new one
is held to all of this without a line added here."""
import inspect

import pytest
import yaml
from click.testing import CliRunner

from toolkit.cli import cli
from toolkit.cli.ask import ask
from toolkit.cli.generate import generate
from toolkit.cli.plan import plan_command
from toolkit.cli.serve import serve
from toolkit.cli.summarize import summarize
from toolkit.config import CARRIED, RunConfig, make_run_config
from toolkit.distributed.dims import DEGREE_NAMES, ParallelDims
from toolkit.options import (BY_NAME, DEFAULT_CHUNK_TOKENS_PER_RANK, LOAD_OPTIONS, RUN_OPTIONS, OptionError,
                             check_max_new_tokens, chunk_tokens)
from toolkit.planner.presets import Preset, PresetError, load_preset

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 4096}
MODEL_COMMANDS = [generate, summarize, ask, serve]
MODEL_OPTIONS = {**RUN_OPTIONS, **LOAD_OPTIONS}


def sample(option):
    """A value the option allows that is not its default (a degree: 1, the world here)."""
    if option.choices:
        return next(c for c in reversed(option.choices) if c != option.default)
    if option.values is not None:  # a string with its own form (--speculate)
        return "ngram:3"
    return 1 if option.name in DEGREE_NAMES else 16


def bad(option):
    return "nope" if option.choices or option.values is not None else 0


def params(command) -> dict:
    return {p.name: p for p in command.params}


def assert_flag(param, option, default):
    assert option.cli_flag.split("/")[0] in param.opts and set(option.aliases) <= set(param.opts)
    assert param.help == option.help
    assert param.to_info_dict()["default"] == default, option.name  # (click's own "no default" reads None there)
    if option.choices:
        assert param.type.values() == option.choices + (("auto",) if option.auto else ())


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c.name)
def test_every_model_command_has_every_run_and_load_option(command):
    found = params(command)
    for name, option in MODEL_OPTIONS.items():
        assert name in found, f"{command.name} has no {option.cli_flag}"
        # a run option not given is None: the preset's value stands; a load option's default is its own
        assert_flag(found[name], option, None if name in RUN_OPTIONS else option.default)


def test_lctk_plan_has_every_run_option_and_the_preset():
    found = params(plan_command)
    for name, option in {**RUN_OPTIONS, "preset": BY_NAME["preset"], "ffn_dtype": BY_NAME["ffn_dtype"]}.items():
        assert_flag(found[name], option, None)


def test_a_preset_is_a_partial_run_config(tmp_path):
    assert [f for f in Preset.__dataclass_fields__] == ["name", "description", "path", *RUN_OPTIONS]
    empty = load_preset(_write(tmp_path, {})).to_dict()
    assert empty == {"name": "p", "description": "x", "path": str(tmp_path / "p.yaml"),
                     **{n: o.default for n, o in RUN_OPTIONS.items()}}
    for name, option in RUN_OPTIONS.items():
        assert getattr(load_preset(_write(tmp_path, {name: sample(option)})), name) == sample(option)


def test_every_run_option_is_a_keyword_of_make_run_config_and_reaches_the_run_config():
    assert set(CARRIED) | set(DEGREE_NAMES) | {"workload"} == set(RUN_OPTIONS)
    assert set(CARRIED) < set(RunConfig.__dataclass_fields__)
    for name, option in RUN_OPTIONS.items():
        run = make_run_config(TINY, 1, hardware="cpu", context_tokens=1000, **{name: sample(option)})
        if name in CARRIED:
            assert getattr(run, name) == sample(option), name
    with pytest.raises(TypeError, match="unknown run option"):
        make_run_config(TINY, 1, hardware="cpu", ringmode="auto")


def test_from_pretrained_takes_every_load_option_with_its_default():
    from toolkit.api import LongContextModel

    signature = inspect.signature(LongContextModel.from_pretrained).parameters
    assert any(p.kind is p.VAR_KEYWORD for p in signature.values())  # the run options, checked by make_run_config
    for name, option in LOAD_OPTIONS.items():
        if name != "model":  # the first argument, name_or_path
            assert signature[name].default == option.default, name


@pytest.mark.parametrize("name", list(RUN_OPTIONS))
def test_a_bad_value_is_refused_in_the_same_words_by_the_cli_a_preset_and_the_api(tmp_path, name):
    option = RUN_OPTIONS[name]
    words = option.problem(bad(option))
    assert words and "\n" not in words
    for command in (["generate", "--prompt", "x", "--model", str(tmp_path / "no-model")],
                    ["plan", "--model", "llama-3.1-8b", "--gpus", "8", "--context", "8K"]):
        result = CliRunner().invoke(cli, command + [option.cli_flag, str(bad(option))])
        assert result.exit_code == 2 and words in result.stderr, result.stderr
    with pytest.raises(PresetError) as preset:
        load_preset(_write(tmp_path, {name: bad(option)}))
    with pytest.raises(ValueError) as api:
        make_run_config(TINY, 1, hardware="cpu", **{name: bad(option)})
    assert words in str(preset.value) and words in str(api.value)


def test_auto_stands_in_where_declared():
    assert [n for n, o in RUN_OPTIONS.items() if o.problem("auto") is None] == [
        *DEGREE_NAMES, "dtype", "kv_dtype", "ring_mode", "speculate", "workload"]  # speculate's auto: a mode
    run = make_run_config(TINY, 1, hardware="cpu", tp="auto", dtype="auto", context_tokens=100)
    assert run.layout == {"tp": 1, "ulysses": 1, "ring": 1, "pp": 1} and run.dtype == "float32"
    with pytest.raises(OptionError, match="dtype: 'auto' is not allowed; allowed values: float32, bfloat16, float16$"):
        RunConfig(dtype="auto")  # a run config is decided


def test_one_chunk_rule_on_every_path():
    """DEFAULT_CHUNK_TOKENS_PER_RANK per SP rank, at most the context: degrees given, a preset or
    the planner, a RunConfig made by hand."""
    per_rank = DEFAULT_CHUNK_TOKENS_PER_RANK
    assert make_run_config(TINY, 2, hardware="cpu", ring=2).chunk_size == 4096  # the model's context
    assert make_run_config(TINY, 2, hardware="cpu", ring=2, context_tokens=300).chunk_size == 300
    assert make_run_config(TINY, 2, hardware="cpu", context_tokens=300).chunk_size == 300
    assert make_run_config(TINY, 2, hardware="cpu", ring=2, chunk_size=64, context_tokens=300).chunk_size == 64
    assert RunConfig(ParallelDims(ring=2)).chunk_size == 2 * per_rank
    assert chunk_tokens(4, 10**6) == 4 * per_rank and chunk_tokens(4, 100) == 100 and chunk_tokens(1, 50, 64) == 50


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "8"])
def test_max_new_tokens_has_one_check(value):
    with pytest.raises(OptionError, match=r"^max_new_tokens: .* is not allowed; allowed values: a positive integer$"):
        check_max_new_tokens(value)
    assert check_max_new_tokens(3) == 3


def test_the_answer_options_keep_each_commands_default():
    for command, length in ((generate, 64), (summarize, 256), (ask, 256)):
        found = params(command)
        assert found["max_new_tokens"].default == length
        assert found["max_new_tokens"].help == BY_NAME["max_new_tokens"].help
        assert found["repetition_penalty"].help == BY_NAME["repetition_penalty"].help
    result = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--max-new-tokens", "0"])
    assert result.exit_code == 2 and BY_NAME["max_new_tokens"].problem(0) in result.stderr


def _write(tmp_path, keys: dict):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"description": "x", **keys}))
    return path
