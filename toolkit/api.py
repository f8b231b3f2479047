"""The Python entry point: LongContextModel and parallelize().

Parallelism is applied after the HF model is built: attention is swapped through
transformers' AttentionInterface, weights may be sharded by DeepSpeed AutoTP; the model's
code and weights are otherwise untouched. What to run is one RunConfig (toolkit.config),
made before any weight is read.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .config import RunConfig, detect_hardware, make_run_config
from .distributed.dims import DEGREE_NAMES
from .distributed.launcher import init_process_group, launcher_env
from .distributed.timing import clock
from .distributed.topology import ParallelDims, Topology
from .engine import hf
from .engine.capturable import check_capturable, check_cuda_device, check_cuda_graph_run
from .engine.decode import Sampling
from .engine.engine import Engine
from .engine.settings import EngineSettings
from .engine.prefill import prefill as run_prefill
from .engine.request import GenerationResult, Request
from .engine.sequence_parallel import SequenceParallelAttention
from .loading.build import apply_parallelism, build_rank_model
from .loading.cpu_linear import use_cpu_linear
from .loading.draft import check_draft_config, load_draft
from .loading.preflight import check_memory, kv_pool_blocks, memory_peaks, parse_budget
from .models import ModelSource, load_config, load_tokenizer, resolve_source, weights_folder
from .options import DEFAULT_TIMEOUT_S, Speculation, check_max_new_tokens, parse_speculate
from .attention.kv_formats import cache_kind
from .planner.elastic import request_degrees
from .planner.rules import kv_heads_per_tp_rank
from .rope_scaling import scaled
from .sessions import DocumentSession, load_session
from .summarize.mapreduce import DEFAULT_REPETITION_PENALTY, summarize_text


def _head_counts(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def run_config_for(model_config, preset=None, context_tokens: int | None = None, **options) -> RunConfig:
    """make_run_config for the current process group (world and ranks per node from it)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return make_run_config(model_config.to_dict(), world, ranks_per_node=launcher_env()["local_world"],
                           context_tokens=context_tokens, preset=preset, **options)


class LongContextModel:
    """A HF causal LM run with sequence (and tensor) parallelism over the launcher's ranks."""

    def __init__(self, model, tokenizer, topo: Topology, run: RunConfig, stage=None, *, weights_folder=None,
                 decode_mode: str = "eager"):
        """`weights_folder`: the checkpoint the weights came from (a saved session's fingerprint
        names it; None for a model built in memory). `decode_mode`: the step of a request decoding
        alone in the engine, one of toolkit.engine.decode.DECODE_MODES (from_pretrained(cuda_graph=True):
        cuda-graph); requests decoding together run the rows step."""
        self.model, self.tokenizer, self.topo, self.run = model, tokenizer, topo, run
        self.config = model.config
        self.stage = stage
        self.weights_folder, self.decode_mode = weights_folder, decode_mode
        self.load_s: float | None = None  # from_pretrained measures it
        self.last_state: SequenceParallelAttention | None = None
        self.engine_settings = EngineSettings()
        self.has_draft, self.draft_model = False, None  # from_pretrained(draft_model=...): rank 0 holds it
        self._engine: Engine | None = None
        self._engine_made_for: EngineSettings | None = None

    @property
    def chunk_size(self) -> int:
        return self.run.chunk_size

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, preset=None, context_tokens: int | None = None,
                        gguf_file=None, trust_remote_code: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                        memory_budget=None, preflight: bool = True, rope_scaling: str | None = None,
                        cuda_graph: bool = False, draft_model=None, **options):
        """Load and parallelize, each rank reading only its share of the weights.

        `options` are the run options of toolkit.options (tp, ulysses, ring, pp, chunk_size, dtype, kv_dtype:
        what the KV cache stores, auto / bf16 / fp16 / fp8 / int8 / int4, sequence_layout, ring_mode, workload);
        degrees not given come from `preset` (default: the `auto` preset, which asks
        the planner, sized for `context_tokens`, prompt and answer, or the model's context).
        Before any weight is read the memory pre-flight checks that the share, the KV cache and
        the activations fit `memory_budget` (a fraction of the device's memory or a size:
        "8GiB"; default: what is free); `preflight=False` skips it. `rope_scaling` ("yarn:4",
        "linear:2", "dynamic:2") runs the model past its trained length (toolkit.rope_scaling).
        `cuda_graph` captures the decode step of a request decoding alone once and replays it per
        token (CUDA devices; toolkit.engine.static_decode). `draft_model`: a small model with the same
        vocabulary whose guesses speculate="draft" checks (toolkit.engine.draft_model)."""
        t0 = clock()  # nothing is on a device yet
        if cuda_graph:  # what a captured decode step cannot do: one line, before anything touches a device
            check_cuda_device(torch.cuda.is_available())
        source = resolve_source(name_or_path, gguf_file)
        config = scaled(load_config(source, trust_remote_code), rope_scaling)  # fails before any weight is read
        if cuda_graph:
            check_capturable(config)
        init_process_group(timeout_s)
        run = run_config_for(config, preset, context_tokens, **options)
        if cuda_graph:
            check_cuda_graph_run(config, run)
        if draft_model is not None:
            check_draft_config(load_config(resolve_source(draft_model, None), trust_remote_code), config)
        topo = Topology.build(run.dims, timeout_s)
        if preflight:
            check_memory(config, run, topo, context_tokens, parse_budget(memory_budget))
        folder = _weights_folder(source, topo)
        if source.gguf_file:  # build from the converted folder's own config (no GGUF quantizer fields)
            config = scaled(load_config(ModelSource(str(folder)), trust_remote_code), rope_scaling)
        model, stage = build_rank_model(folder, config, run, topo, trust_remote_code)
        lcm = _wrap(model, load_tokenizer(folder, trust_remote_code), topo, run, stage, weights_folder=folder,
                    decode_mode="cuda-graph" if cuda_graph else "eager")
        lcm.has_draft = draft_model is not None  # rank 0 runs it (toolkit.engine.draft_model)
        lcm.draft_model = load_draft(draft_model, run.dtype, topo.device) if lcm.has_draft and topo.is_main else None
        lcm.load_s = clock(topo.device) - t0
        return lcm

    # ---- inference ----------------------------------------------------------------------
    def new_state(self, reserve_tokens: int = 0, topo=None) -> SequenceParallelAttention:  # topo: elastic's block
        heads, kv_heads = _head_counts(self.config)
        tp = self.topo.dims.tp
        state = SequenceParallelAttention(topo or self.topo, self.run.sequence_layout, self.run.ring_mode,
                                          heads // tp, kv_heads_per_tp_rank(kv_heads, tp), reserve_tokens,
                                          cache_kind(self.run.kv_dtype, self.run.dtype))
        self.last_state = state
        return state

    def _reserve(self, prompt_len: int, new_tokens: int, placement=None) -> int:
        """Positions one rank's cache reserves for a prompt and its answer: its share of the prompt,
        the padding a zigzag cut of each chunk may add to one rank's pieces, and every new token
        (the shortest shard takes each). Too little is never wrong, only a copy as the cache grows."""
        ring = self.topo.dims.ring if placement is None else placement.ring  # placement: elastic's block
        return prompt_len + new_tokens if ring == 1 else \
            -(-prompt_len // ring) + 2 * ring * -(-prompt_len // self.chunk_size) + new_tokens

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

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine every request of this model runs on (made once)."""
        wanted = self.engine_settings
        if self._engine is None or self._engine_made_for != wanted:
            settings = wanted if wanted.kv_blocks is not None else replace(
                wanted, kv_blocks=kv_pool_blocks(self.config, self.run, self.topo, wanted.block_tokens, wanted.max_running))
            degrees = request_degrees(self.config, self.run, settings, detect_hardware())  # elastic placement's
            self._engine, self._engine_made_for = Engine(self.model, self.stage, self.topo, self.new_state, self._reserve,
                                                         self.chunk_size, self.eos_token_ids(), settings, degrees), wanted
        self._engine.decode_mode = self.decode_mode  # read at each use: a caller may switch it
        self._engine.draft_model = self.draft_model
        return self._engine

    def generate(self, prompt, max_new_tokens: int = 64, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 chat: bool = False, on_token=None, on_chunk=None, on_result=None, speculate=None):
        """One prompt -> a GenerationResult. A list of prompts -> one result each, in order, the
        prompts run together as one continuous batch (each result equals its prompt's alone;
        on_token(i, token) then names the prompt, and on_result(i, result) is called as each
        ends). A prompt is text, token ids, or with chat=True a list of messages. speculate: auto,
        off, ngram[:K] (default: the run's --speculate; toolkit.engine.speculation). Collective:
        every rank calls it with the same prompts; the callbacks run on rank 0."""
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        speculation = self.speculation(speculate)
        many = isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], (int, dict))
        encoded = [self.encode(p, chat=chat)[0].tolist() for p in (prompt if many else [prompt])]
        chunk = self.chunk_size

        def requested(i, ids):
            emit = on_token if not many or on_token is None else (lambda t, i=i: on_token(i, t))
            chunks = None if on_chunk is None or many else (
                lambda done, total: on_chunk(-(-done // chunk), -(-total // chunk)))
            ended = None if on_result is None or not many else (
                lambda tokens, reason, i=i, n=len(ids): on_result(i, self._result(tokens, reason, n, {})))
            return Request(ids, max_new_tokens, sampling, on_token=emit, on_prefill=chunks, on_end=ended,
                           speculate=speculation)

        requests = [requested(i, ids) for i, ids in enumerate(encoded)]
        engine = self.engine
        engine.eos = self.eos_token_ids()  # read per call: a caller may change the generation config
        t0 = clock(self.topo.device)
        done = engine.run(requests)
        total_s = clock(self.topo.device) - t0
        results = []
        for request, (tokens, reason, timings) in zip(requests, done.values()):
            results.append(self._result(tokens, reason, len(request.prompt), {"total_s": total_s, **timings}))
        return results if many else results[0]

    def speculation(self, asked=None) -> Speculation:
        """What a request guesses (asked, else the run's --speculate). The fixed-shape decode step
        (static, CUDA graph) takes one token a step: auto is off there, and guesses asked for are refused."""
        speculation = parse_speculate(self.run.speculate if asked is None else asked)
        if speculation.mode == "draft" and not self.has_draft:
            raise ValueError("speculate=draft checks a draft model's guesses and none was loaded: give --draft-model "
                             "PATH (from_pretrained(draft_model=...)), or use --speculate auto or ngram")
        if speculation.on and self.decode_mode != "eager":
            if speculation.mode == "auto":
                return Speculation()
            raise ValueError(f"speculate={speculation.mode}: the {self.decode_mode} decode step takes one token a "
                             "step and cannot check guesses: drop one of the two (--speculate off, or no --cuda-graph)")
        return speculation

    def _result(self, tokens: list[int], reason: str, prompt_tokens: int, timings: dict) -> GenerationResult:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationResult(list(tokens), text, prompt_tokens, timings, reason)

    def summarize(self, text, max_new_tokens: int = 256, *, instruction: str | None = None,
                  on_progress=None, on_token=None, max_context: int | None = None, single_pass: bool = False,
                  repetition_penalty: float = DEFAULT_REPETITION_PENALTY, cache_dir=None, resume: bool = False):
        """Summarise a str or a toolkit.documents.Document (read_document reads PDF, HTML, DOCX, EPUB,
        folders): one pass if it fits the context, else map-reduce; see toolkit.summarize. All ranks call it.
        Finished sections are kept in cache_dir; resume=True reuses them after a crash."""
        return summarize_text(self, text, max_new_tokens, instruction=instruction, on_progress=on_progress,
                              on_token=on_token, max_context=max_context, single_pass=single_pass,
                              repetition_penalty=repetition_penalty, cache_dir=cache_dir, resume=resume)

    def prefill_document(self, document, chat: bool | None = None, on_chunk=None):
        """Prefill a document once -> DocumentSession; .ask(question) answers after it, .save(dir) keeps it.
        chat (default: True for text) puts document and question in one user turn; see toolkit.sessions."""
        return DocumentSession.prefill(self, document, chat, on_chunk)

    def load_document(self, path, document: str | None = None, verify: bool = True):
        """A DocumentSession from a cache saved on any layout; refused in one line if it does not fit
        this model (or, given its text, this document), or if a file's sha256 is not the one saved
        (verify=False skips that hash only: storage you vouch for)."""
        return load_session(self, path, document, verify)

    def eos_token_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    @property
    def layout(self) -> dict:
        return self.run.layout

    def memory_peaks(self) -> dict:
        """Peak host RSS and peak device memory so far, of the rank with the most (collective)."""
        return memory_peaks(self.topo)

def parallelize(model, tokenizer=None, *, config: RunConfig | None = None, dims: ParallelDims | None = None,
                preset=None, context_tokens: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                **options) -> LongContextModel:
    """Make an already built HF model parallel over the current process group (the one
    accelerate or the launcher created, or a new one from the launcher's environment).

    Give a RunConfig, or `dims` (ParallelDims), or RunConfig options (tp=2, ring=2, chunk_size=...),
    or a preset; what is not given comes from the `auto` preset."""
    init_process_group(timeout_s)
    if config is None:
        if dims is not None:
            options.update({k: getattr(dims, k) for k in DEGREE_NAMES})
        options.setdefault("dtype", str(model.dtype).replace("torch.", ""))
        config = run_config_for(model.config, preset, context_tokens, **options)
    topo = Topology.build(config.dims, timeout_s)
    model, stage, _ = apply_parallelism(model, topo)
    return _wrap(model.to(topo.device), tokenizer, topo, config, stage)


def _wrap(model, tokenizer, topo: Topology, run: RunConfig, stage, **facts) -> LongContextModel:
    hf.install(model.eval())  # our attention; the weights are untouched
    use_cpu_linear(model)  # CPU fp32: faster matmul kernels than F.linear (loading/cpu_linear.py)
    return LongContextModel(model, tokenizer, topo, run, stage, **facts)


def _weights_folder(source, topo: Topology):
    """A GGUF is converted once per node, by its local rank 0, while the other ranks wait."""
    if source.gguf_file and topo.world > 1:
        if topo.local_rank == 0:
            weights_folder(source)
        topo.comm.barrier(topo.world_group())
    return weights_folder(source)


__all__ = ["LongContextModel", "GenerationResult", "RunConfig", "parallelize", "run_config_for"]
