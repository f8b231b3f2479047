"""The Python entry point: LongContextModel and parallelize().

Parallelism is applied after the HF model is built: attention is swapped through
transformers' AttentionInterface, weights may be sharded by DeepSpeed AutoTP; the model's
code and weights are otherwise untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .attention import hf
from .attention.ulysses import check_ulysses_degree
from .distributed.topology import ParallelDims, Topology, init_process_group, launcher_env
from .engine.decode import Sampling, generate_tokens
from .engine.prefill import prefill as run_prefill
from .engine.sequence_parallel import SequenceParallelAttention
from .models import clear_quantizer_flags, load_config, load_model, resolve_source

DEFAULT_CHUNK_SIZE = 4096


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    timings: dict = field(default_factory=dict)


def _head_counts(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def valid_layouts(heads: int, kv_heads: int, world: int, most: int = 6) -> list[str]:
    """A few tp x ulysses x ring layouts of `world` ranks that the heads allow (pp=1)."""
    found = []
    for tp in (d for d in range(1, world + 1) if world % d == 0 and heads % d == 0 and kv_heads % d == 0):
        for ulysses in (u for u in range(1, world // tp + 1) if (world // tp) % u == 0):
            h, g = heads // tp, kv_heads // tp
            if h % ulysses == 0 and (g % ulysses == 0 or ulysses % g == 0):
                found.append(f"tp={tp} ulysses={ulysses} ring={world // (tp * ulysses)}")
    return found[:most]


def resolve_dims(config, world: int, tp=None, ulysses=None, ring=None, pp=None) -> ParallelDims:
    """Fill unspecified degrees so they multiply to the world size, then check the heads.

    With nothing given: all Ulysses when the heads allow it, else all ring.
    """
    heads, kv_heads = _head_counts(config)
    tp, pp = tp or 1, pp or 1
    if world % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} does not divide the world of {world} ranks")
    rest = world // (tp * pp)
    if ulysses is None and ring is None:
        fits = heads % tp == 0 and kv_heads % tp == 0
        try:
            check_ulysses_degree(rest, heads // tp, max(kv_heads // tp, 1))
            ulysses, ring = (rest, 1) if fits else (1, rest)
        except ValueError:
            ulysses, ring = 1, rest
    elif ulysses is None:
        ulysses = rest // ring if rest % ring == 0 else 0
    elif ring is None:
        ring = rest // ulysses if rest % ulysses == 0 else 0
    dims_product = tp * (ulysses or 0) * (ring or 0) * pp
    if dims_product != world:
        raise ValueError(
            f"degrees tp={tp} x ulysses={ulysses} x ring={ring} x pp={pp} must multiply to the world size {world}; "
            f"layouts that fit these heads: {', '.join(valid_layouts(heads, kv_heads, world))}"
        )
    if heads % tp or kv_heads % tp:
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise ValueError(f"tensor parallel size {tp} does not divide {heads} heads and {kv_heads} KV heads; "
                         f"valid sizes: {', '.join(map(str, valid))}")
    check_ulysses_degree(ulysses, heads // tp, kv_heads // tp)
    return ParallelDims(tp=tp, ulysses=ulysses, ring=ring, pp=pp)


def detect_hardware() -> str:
    """Planner hardware entry for this machine's accelerator."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key, entry in (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100-80gb"), ("l40s", "l40s")):
        if key in name:
            return entry
    return "h100-80gb"


def plan_run(config, preset, context_tokens: int | None, options: dict) -> dict:
    """Degrees, chunk size, dtype and ring settings for this world, before weights load.

    Explicit degrees with no preset: use them (unspecified ones fill the world). Otherwise
    the preset (default `auto`) decides with the planner; explicit options win over it.
    """
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    degrees = {k: options.get(k) for k in ("tp", "ulysses", "ring", "pp")}
    if preset is None and any(v is not None for v in degrees.values()):
        dims = resolve_dims(config, world, degrees["tp"], degrees["ulysses"], degrees["ring"], degrees["pp"])
        return dict(dims=dims, chunk_size=options.get("chunk_size") or DEFAULT_CHUNK_SIZE,
                    dtype=options.get("dtype") or "float32",
                    sequence_layout=options.get("sequence_layout") or "zigzag",
                    ring_mode=options.get("ring_mode") or "auto")
    from .presets import resolve_layout

    model_context = getattr(config, "max_position_embeddings", None) or 8192
    context = min(context_tokens or model_context, model_context)  # longer prompts go by map-reduce
    ranks_per_node = min(launcher_env()["local_world"], world)
    chosen = resolve_layout(preset or "auto", config.to_dict(), world, ranks_per_node, context,
                            overrides={k: v for k, v in options.items() if v is not None},
                            hardware=detect_hardware())
    dims = resolve_dims(config, world, chosen["tp"], chosen["ulysses"], chosen["ring"], chosen["pp"])
    return dict(dims=dims, chunk_size=chosen["chunk_size"], dtype=chosen["dtype"], why=chosen["why"],
                sequence_layout=chosen["sequence_layout"], ring_mode=chosen["ring_mode"])


class LongContextModel:
    """A HF causal LM run with sequence (and tensor) parallelism over the launcher's ranks."""

    def __init__(self, model, tokenizer, topo: Topology, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 sequence_layout: str = "zigzag", ring_mode: str = "auto", stage=None):
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be a positive number of tokens, got {chunk_size}")
        self.model, self.tokenizer, self.topo = model, tokenizer, topo
        self.chunk_size, self.sequence_layout, self.ring_mode = chunk_size, sequence_layout, ring_mode
        self.config = model.config
        self.stage = stage
        self.last_state: SequenceParallelAttention | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, preset=None, context_tokens: int | None = None,
                        tp=None, ulysses=None, ring=None, pp=None, gguf_file=None, chunk_size: int | None = None,
                        dtype: str | None = None, sequence_layout: str | None = None, ring_mode: str | None = None,
                        trust_remote_code: bool = False, timeout_s: float = 1800.0):
        """Load and parallelize. Degrees not given come from `preset` (default: the `auto`
        preset, which asks the planner, sized for `context_tokens` or the model's context)."""
        source = resolve_source(name_or_path, gguf_file)
        config = load_config(source, trust_remote_code)  # fails before any weight is read
        init_process_group(timeout_s)
        run = plan_run(config, preset, context_tokens, dict(
            tp=tp, ulysses=ulysses, ring=ring, pp=pp, chunk_size=chunk_size, dtype=dtype,
            sequence_layout=sequence_layout, ring_mode=ring_mode))
        model, tokenizer = load_model(source, run["dtype"], trust_remote_code)
        return parallelize(model, tokenizer, dims=run["dims"], chunk_size=run["chunk_size"],
                           sequence_layout=run["sequence_layout"], ring_mode=run["ring_mode"], timeout_s=timeout_s)

    # ---- inference ----------------------------------------------------------------------
    def new_state(self, reserve_tokens: int = 0) -> SequenceParallelAttention:
        heads, kv_heads = _head_counts(self.config)
        tp = self.topo.dims.tp
        state = SequenceParallelAttention(self.topo, self.sequence_layout, self.ring_mode,
                                          heads // tp, kv_heads // tp, reserve_tokens)
        self.last_state = state
        return state

    def _reserve(self, prompt_len: int, new_tokens: int) -> int:
        ring = self.topo.dims.ring
        return -(-(prompt_len + self.chunk_size) // ring) + new_tokens

    def encode(self, prompt, chat: bool = False) -> torch.Tensor:
        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt[None]
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
            return torch.tensor([list(prompt)])
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: pass token ids, or a folder with tokenizer files")
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            return torch.tensor([list(ids)])
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def prefill(self, input_ids, on_chunk=None, reserve_new_tokens: int = 0) -> torch.Tensor:
        """Last-position logits [V] (fp32) on every rank; the cache stays in self.last_state."""
        ids = self.encode(input_ids)
        state = self.new_state(self._reserve(ids.shape[1], reserve_new_tokens))
        return run_prefill(self.model, ids, state, self.chunk_size, on_chunk, self.stage)

    def generate(self, prompt, max_new_tokens: int = 64, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 chat: bool = False, on_token=None, on_chunk=None) -> GenerationResult:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive number, got {max_new_tokens}")
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        ids = self.encode(prompt, chat=chat)
        t0 = time.perf_counter()
        logits = self.prefill(ids, on_chunk=on_chunk, reserve_new_tokens=max_new_tokens)
        t1 = time.perf_counter()
        tokens = generate_tokens(self.model, ids, logits, self.last_state, max_new_tokens, sampling,
                                 self.eos_token_ids(), on_token, self.stage)
        t2 = time.perf_counter()
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        timings = {"prefill_s": t1 - t0, "decode_s": t2 - t1,
                   "tokens_per_s": len(tokens) / (t2 - t1) if t2 > t1 else 0.0}
        return GenerationResult(tokens, text, ids.shape[1], timings)

    def summarize(self, text: str, max_new_tokens: int = 256, *, instruction: str | None = None,
                  on_progress=None, on_token=None, max_context: int | None = None, single_pass: bool = False,
                  repetition_penalty: float = 1.15, cache_dir=None, resume: bool = False):
        """One pass if the document fits the context, else map-reduce; see toolkit.summarize. All ranks call it.
        Finished sections are kept in cache_dir; resume=True reuses them after a crash."""
        from .summarize import summarize_text

        return summarize_text(self, text, max_new_tokens, instruction=instruction, on_progress=on_progress,
                              on_token=on_token, max_context=max_context, single_pass=single_pass,
                              repetition_penalty=repetition_penalty, cache_dir=cache_dir, resume=resume)

    def eos_token_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    @property
    def layout(self) -> dict:
        d = self.topo.dims
        return {"tp": d.tp, "ulysses": d.ulysses, "ring": d.ring, "pp": d.pp}


def parallelize(model, tokenizer=None, *, dims: ParallelDims | None = None, tp=None, ulysses=None, ring=None,
                pp=None, preset=None, context_tokens: int | None = None, chunk_size: int | None = None,
                sequence_layout: str | None = None, ring_mode: str | None = None,
                timeout_s: float = 1800.0) -> LongContextModel:
    """Make an already built HF model parallel over the current process group (the one
    accelerate or the launcher created, or a new one from the launcher's environment)."""
    init_process_group(timeout_s)
    if dims is None:
        run = plan_run(model.config, preset, context_tokens, dict(
            tp=tp, ulysses=ulysses, ring=ring, pp=pp, chunk_size=chunk_size, sequence_layout=sequence_layout,
            ring_mode=ring_mode, dtype=str(model.dtype).replace("torch.", "")))
        dims, chunk_size = run["dims"], run["chunk_size"]
        sequence_layout, ring_mode = run["sequence_layout"], run["ring_mode"]
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    sequence_layout, ring_mode = sequence_layout or "zigzag", ring_mode or "auto"
    topo = Topology.build(dims, timeout_s)
    stage = None
    if dims.pp > 1:  # trim to this stage's layers first, so TP shards only what stays
        from .engine.pipeline import PipelineStage

        stage = PipelineStage(model, topo)
    if dims.tp > 1:
        from .engine.tp import shard_with_deepspeed

        clear_quantizer_flags(model)  # a GGUF-loaded model's markers make DeepSpeed's dtype cast raise
        model = shard_with_deepspeed(model, topo)
    model = model.to(topo.device).eval()
    hf.install(model)
    return LongContextModel(model, tokenizer, topo, chunk_size, sequence_layout, ring_mode, stage)


__all__ = ["LongContextModel", "GenerationResult", "parallelize", "resolve_dims", "launcher_env"]
