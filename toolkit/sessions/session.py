"""A document prefilled once and questioned many times: the sharded KV cache is kept, and
each question is prefilled after it and answered, then the cache is rolled back to the
document (shard lengths restored, nothing copied).

With chat=True the document and the question share one user turn. The chat template is
rendered once with a marker where the document goes, followed by a blank line and the
question; the text before the marker plus the document is tokenised as the document's ids,
and the text after the marker (blank line, question, end of turn, generation prompt) as the
question's ids. So the document's ids are a true prefix of every question's prompt, and an
answer equals a fresh generate() of document ids + question ids.
"""
from __future__ import annotations

import torch

from ..distributed.timing import clock
from ..engine.decode import Sampling, generate_tokens
from ..engine.prefill import prefill as run_prefill
from ..engine.request import GenerationResult, finish_reason_of
from ..options import check_max_new_tokens, check_positive_int
from ..engine.batch_decode import BatchDecodeAttention, generate_batch
from ..engine.hf import long_rope_switch
from .store import save_session

SEPARATOR = "\n\n"
_MARKER = "\u2063lctk-document\u2063"  # invisible separators: no document or template contains it
QUESTION_ROOM = 1024  # tokens reserved past the document for a question and its answer


def chat_halves(tokenizer) -> tuple[str, str]:
    """(text before the document, text after the question) of the model's chat template."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"{_MARKER}{SEPARATOR}{_MARKER}"}],
                                             add_generation_prompt=True, tokenize=False)
    head, middle, tail = rendered.split(_MARKER)
    if middle != SEPARATOR:
        raise ValueError("the model's chat template changes the user's text; pass chat=False")
    return head, tail


def document_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Surrounding whitespace is dropped: the same document read twice gives the same ids."""
    text = text.strip()
    if not chat:
        return list(tokenizer(text).input_ids)
    head, _ = chat_halves(tokenizer)
    return list(tokenizer(head + text, add_special_tokens=False).input_ids)


def question_ids(tokenizer, question: str, chat: bool) -> list[int]:
    if not question.strip():
        raise ValueError("the question is empty")
    if not chat:
        return list(tokenizer(SEPARATOR + question, add_special_tokens=False).input_ids)
    _, tail = chat_halves(tokenizer)
    return list(tokenizer(SEPARATOR + question + tail, add_special_tokens=False).input_ids)


class DocumentSession:
    """All ranks hold one; every call is collective, like LongContextModel.generate."""

    def __init__(self, lcm, ids: list[int], state, chat: bool, prefill_s: float, loaded_from=None):
        self.lcm, self.ids, self.state, self.chat = lcm, list(ids), state, chat
        self.prefill_s, self.loaded_from = prefill_s, loaded_from
        self.load_s = 0.0  # reading a saved cache (load_document), instead of prefill_s
        self._mark = state.cache.mark()

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @classmethod
    def prefill(cls, lcm, document, chat: bool | None = None, on_chunk=None) -> "DocumentSession":
        if isinstance(document, str):
            if lcm.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass the document as token ids")
            chat = True if chat is None else chat
            ids = document_ids(lcm.tokenizer, document, chat)
        else:
            if chat:
                raise ValueError("chat=True needs the document as text (the template goes around it)")
            chat, ids = False, lcm.encode(document)[0].tolist()
        if not ids:
            raise ValueError("the document is empty")
        t0 = clock(lcm.topo.device)
        state = lcm.new_state(lcm._reserve(len(ids), QUESTION_ROOM))
        run_prefill(lcm.model, torch.tensor([ids]), state, lcm.chunk_size, on_chunk, lcm.stage)
        return cls(lcm, ids, state, chat, clock(lcm.topo.device) - t0)

    def question_ids(self, question) -> list[int]:
        if isinstance(question, str):
            if self.lcm.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass the question as token ids")
            return question_ids(self.lcm.tokenizer, question, self.chat)
        ids = list(question.flatten().tolist() if isinstance(question, torch.Tensor) else question)
        if not ids:
            raise ValueError("the question is empty")
        return ids

    def _prefill_question(self, q: list[int], on_chunk=None) -> torch.Tensor:
        self.state.cache.rollback(self._mark)
        return run_prefill(self.lcm.model, torch.tensor([q]), self.state, self.lcm.chunk_size, on_chunk,
                           self.lcm.stage, offset=self.tokens)

    def logits(self, question) -> torch.Tensor:
        """Last-position logits [V] (fp32) after document + question: for scoring; the cache is rolled back."""
        try:
            return self._prefill_question(self.question_ids(question))
        finally:
            self.state.cache.rollback(self._mark)

    def ask(self, question, max_new_tokens: int = 128, *, do_sample: bool = False, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, on_token=None,
            on_chunk=None):
        """Answer one question after the document -> GenerationResult (timings: ttft_s, decode_s)."""
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        q = self.question_ids(question)
        self._check_room(q, max_new_tokens)
        lcm, state, device = self.lcm, self.state, self.lcm.topo.device
        t0 = clock(device)
        try:
            logits = self._prefill_question(q, on_chunk)
            t1 = clock(device)
            full = torch.tensor([self.ids + q])
            tokens = generate_tokens(lcm.model, full, logits, state, max_new_tokens, sampling, lcm.eos_token_ids(),
                                     on_token, lcm.stage, decode_mode=lcm.decode_mode)
        finally:
            state.cache.rollback(self._mark)
        t2 = clock(device)
        text = lcm.tokenizer.decode(tokens, skip_special_tokens=True) if lcm.tokenizer is not None else ""
        return GenerationResult(tokens, text, self.tokens + len(q),
                                {"ttft_s": t1 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1,
                                 "tokens_per_s": len(tokens) / (t2 - t1) if t2 > t1 else 0.0},
                                finish_reason_of(tokens, max_new_tokens, lcm.eos_token_ids()))

    def ask_many(self, questions, max_new_tokens: int = 128, *, batch: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, on_token=None, on_chunk=None) -> list:
        """Answer several questions, decoded together -> a GenerationResult per question, in order.

        Up to `batch` questions (default: all) decode as rows of one forward: the weights and the
        document's K/V are read once per step for all of them. Each question is prefilled on its
        own first. Every answer equals `ask(question)` with the same settings. on_token(i, token)
        gets question i's tokens as they come (the rows interleave)."""
        check_max_new_tokens(max_new_tokens)
        if batch is not None:
            check_positive_int("batch", batch)
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        asked = [self.question_ids(q) for q in questions]
        if not asked:
            raise ValueError("give at least one question")
        for q in asked:
            self._check_room(q, max_new_tokens)
        lcm, size = self.lcm, batch or len(asked)
        results = []
        for first, group in self._batches(asked, size, max_new_tokens):
            t0 = clock(lcm.topo.device)
            suffixes, shards, positions, logits = [], [], [], []
            try:
                for q in group:  # each question after the document, copied out, then rolled back
                    logits.append(self._prefill_question(q, on_chunk))
                    added, per_shard, mine = self.state.cache.since(self._mark, self.state.r_rank)
                    suffixes.append(added)
                    shards.append(per_shard)
                    positions.append(mine)
            finally:
                self.state.cache.rollback(self._mark)
            rows = BatchDecodeAttention(self.state, suffixes, shards, positions, max_new_tokens, lcm.model.dtype)
            t1 = clock(lcm.topo.device)
            emit = None if on_token is None else (lambda row, tok, at=first: on_token(at + row, tok))
            tokens = generate_batch(lcm.model, [self.ids + q for q in group], torch.stack(logits), rows,
                                    max_new_tokens, sampling, lcm.eos_token_ids(), emit, lcm.stage)
            t2 = clock(lcm.topo.device)
            for q, new in zip(group, tokens):
                text = lcm.tokenizer.decode(new, skip_special_tokens=True) if lcm.tokenizer is not None else ""
                results.append(GenerationResult(new, text, self.tokens + len(q), {
                    "ttft_s": t1 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1, "batch": len(group),
                    "tokens_per_s": len(new) / (t2 - t1) if t2 > t1 else 0.0},
                    finish_reason_of(new, max_new_tokens, lcm.eos_token_ids())))
        return results

    def _batches(self, asked: list[list[int]], size: int, max_new_tokens: int):
        """(index of the first, questions) of each batch, in order. With LongRoPE every row of a
        step shares one rotary table: questions whose answers stay below the switch to the long
        factors batch together, those past it together, and one that crosses it decodes alone."""
        switch = long_rope_switch(self.lcm.model)

        def side(q):  # the lengths a question's forwards see: document + question .. + max_new_tokens - 1
            first, last = self.tokens + len(q), self.tokens + len(q) + max_new_tokens - 1
            if switch is None or last <= switch:
                return "short"
            return "long" if first > switch else f"alone {id(q)}"

        group, start = [], 0
        for i, q in enumerate(asked):
            if group and (len(group) == size or side(q) != side(group[0])):
                yield start, group
                group, start = [], i
            group.append(q)
        if group:
            yield start, group

    def _check_room(self, q: list[int], max_new_tokens: int):
        limit = getattr(self.lcm.config, "max_position_embeddings", None)
        if limit and self.tokens + len(q) + max_new_tokens > limit:
            raise ValueError(f"document ({self.tokens}) + question ({len(q)}) + {max_new_tokens} new tokens "
                             f"exceed the model's context of {limit} tokens")

    def save(self, path) -> dict:
        """Write the cache to directory `path` (atomically; all ranks call it) -> the manifest."""
        return save_session(self, path)
