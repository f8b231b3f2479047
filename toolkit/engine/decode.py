"""Decode: one token per step against the sharded cache; sampling by transformers' processors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..options import check_max_new_tokens
from .hf import STATE_KWARG, rope_for_length
from .prefill import share_last_stage_logits
from .sequence_parallel import SequenceParallelAttention
from .static_decode import CudaGraphStep, StaticDecodeAttention

# eager: the cache grows a position a step; static: fixed shapes (the CUDA graph's twin, runs anywhere);
# cuda-graph: the static step captured once per generation and replayed
DECODE_MODES = ("eager", "static", "cuda-graph")


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use greedy decoding for temperature 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


def choose_token(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """scores [1, V] after the processors -> the token [1]: drawn with the seeded generator, or argmax."""
    if sampling.do_sample:
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).to(scores.device).view(1)
    return scores.argmax(dim=-1).view(1)


@torch.no_grad()
def decode_step(model, token: int, position: int, state: SequenceParallelAttention, stage=None) -> torch.Tensor:
    """Every rank runs the same token; attention reads this rank's cache shard. -> logits [V] fp32.
    With a pipeline the token goes through the stages in turn and the last one shares the logits."""
    device = state.topo.device
    state.begin_decode(position)
    rope_for_length(model, position + 1)
    ids, pos = torch.tensor([token], device=device), torch.tensor([position], device=device)
    if stage is None:
        out = model(input_ids=ids[None], position_ids=pos[None], use_cache=False, logits_to_keep=1, **{STATE_KWARG: state})
        state.end_step()
        return out.logits[0, -1].float()
    logits = stage.forward(ids, pos, None, state, logits_to_keep=1)
    state.end_step()
    return share_last_stage_logits(logits, stage, 0, model.config.vocab_size, device)


def decoder(model, state: SequenceParallelAttention, stage=None, mode: str = "eager",
            room: int = 0) -> Callable[[int, int], torch.Tensor]:
    """-> step(token, position) -> logits [V] fp32, in the decode mode asked for; room: tokens it may add."""
    if mode == "eager":
        return lambda token, position: decode_step(model, token, position, state, stage)
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r} is not one of {', '.join(DECODE_MODES)}")
    static = StaticDecodeAttention(state, room)
    if mode == "static":
        return lambda token, position: decode_step(model, token, position, static, stage)
    if stage is not None:
        raise ValueError("a CUDA graph captures one whole forward: it does not run with pipeline stages (pp > 1)")
    return CudaGraphStep(model, static)


def generate_tokens(model, input_ids: torch.Tensor, first_logits: torch.Tensor, state: SequenceParallelAttention,
                    max_new_tokens: int, sampling: Sampling, eos_token_ids: set[int],
                    on_token: Callable[[int], None] | None = None, stage=None,
                    should_stop: Callable[[], bool] | None = None, decode_mode: str = "eager") -> list[int]:
    """The decode loop after prefill. The chosen token is broadcast from rank 0 so that
    sampling can never diverge across ranks. should_stop (given on every rank or on none; only
    rank 0's answer counts) ends the loop after the current token, on every rank at once: it
    travels with the token (a server's client went away, or a stop string was seen)."""
    check_max_new_tokens(max_new_tokens)
    next_logits = decoder(model, state, stage, decode_mode, max_new_tokens)
    processors = sampling.processors()
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
    topo = state.topo
    ids = input_ids.to(first_logits.device)
    logits, new_tokens = first_logits, []
    for step in range(max_new_tokens):
        token = choose_token(processors(ids, logits[None]), sampling, generator)  # [1]
        stop = False
        if should_stop is None:
            token = topo.comm.broadcast(token, 0, topo.world_group(), tag="token")
        else:
            flag = int(topo.rank == 0 and should_stop())
            pair = torch.cat([token.view(1), token.new_tensor([flag])])  # [2]: token, stop
            pair = topo.comm.broadcast(pair, 0, topo.world_group(), tag="token")
            token, stop = pair[:1], bool(pair[1].item())
        tok = int(token.item())
        new_tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if stop or tok in eos_token_ids or step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        logits = next_logits(tok, ids.shape[1] - 1)
    return new_tokens
