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
