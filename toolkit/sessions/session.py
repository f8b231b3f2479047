"""A document prefilled once and questioned many times: the sharded KV cache is kept and
shared with the engine (toolkit.engine.engine.Engine.share); each question is a request that
reads the document's keys by reference and stores only its own, so many questions run
together over one copy of the document.

With chat=True the document and the question share one user turn. The chat template is
rendered once with a marker where the document goes, followed by a blank line and the
question; the text before the marker plus the document is tokenised as the document's ids,
and the text after the marker (blank line, question, end of turn, generation prompt) as the
question's ids. So the document's ids are a true prefix of every question's prompt, and an
answer equals a fresh generate() of document ids + question ids.
"""
from __future__ import annotations

import weakref

import torch

from ..distributed.timing import clock
from ..engine.decode import Sampling
from ..engine.prefill import prefill as run_prefill
from ..engine.request import GenerationResult, Request
from ..options import check_max_new_tokens, check_positive_int
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
        engine = lcm.engine
        self.prefix = engine.prefixes.share(state)  # questions read the document's keys by reference
        weakref.finalize(self, engine.prefixes.unshare, self.prefix)

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
            on_chunk=None, speculate=None):
        """Answer one question after the document -> GenerationResult (timings: ttft_s, decode_s).
        The document's cache is read by reference; on_token(token) is called on rank 0. speculate:
        auto, off, ngram[:K] (default: the run's; toolkit.engine.speculation)."""
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        q = self.question_ids(question)
        self._check_room(q, max_new_tokens)
        return self._answer([self._request(q, max_new_tokens, sampling, on_token, on_chunk, speculate)])[0]

    def ask_many(self, questions, max_new_tokens: int = 128, *, batch: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, on_token=None, on_chunk=None, speculate=None) -> list:
        """Answer several questions, decoded together -> a GenerationResult per question, in order.

        Up to `batch` questions (default: all) run together on the engine: each step reads the
        weights once for all of them, and every question reads the one document cache by
        reference. Every answer equals `ask(question)` with the same settings. on_token(i, token)
        gets question i's tokens on rank 0 as they come (the rows interleave)."""
        check_max_new_tokens(max_new_tokens)
        if batch is not None:
            check_positive_int("batch", batch)
        sampling = Sampling(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        asked = [self.question_ids(q) for q in questions]
        if not asked:
            raise ValueError("give at least one question")
        for q in asked:
            self._check_room(q, max_new_tokens)
        size, results = batch or len(asked), []
        for first in range(0, len(asked), size):
            group = asked[first : first + size]
            emit = [None if on_token is None else (lambda t, i=first + j: on_token(i, t)) for j in range(len(group))]
            answers = self._answer([self._request(q, max_new_tokens, sampling, e, on_chunk, speculate)
                                    for q, e in zip(group, emit)])
            for answer in answers:
                answer.timings["batch"] = len(group)
            results.extend(answers)
        return results

    def _request(self, q: list[int], max_new_tokens: int, sampling: Sampling, on_token=None, on_chunk=None,
                 speculate=None) -> Request:
        chunk = self.lcm.chunk_size
        progress = None if on_chunk is None else (lambda done, total: on_chunk(-(-done // chunk), -(-total // chunk)))
        return Request(self.ids + q, max_new_tokens, sampling, on_token=on_token, on_prefill=progress,
                       prefix=self.prefix, shared=self.tokens, speculate=self.lcm.speculation(speculate))

    def _answer(self, requests: list[Request]) -> list[GenerationResult]:
        """Run the requests on the engine, together -> their results, in order (on every rank)."""
        lcm = self.lcm
        engine = lcm.engine
        engine.eos = lcm.eos_token_ids()
        done = engine.run(requests)
        results = []
        for request, (tokens, reason, timings) in zip(requests, done.values()):
            text = lcm.tokenizer.decode(tokens, skip_special_tokens=True) if lcm.tokenizer is not None else ""
            results.append(GenerationResult(tokens, text, len(request.prompt), dict(timings), reason))
        return results

    def _check_room(self, q: list[int], max_new_tokens: int):
        limit = getattr(self.lcm.config, "max_position_embeddings", None)
        if limit and self.tokens + len(q) + max_new_tokens > limit:
            raise ValueError(f"document ({self.tokens}) + question ({len(q)}) + {max_new_tokens} new tokens "
                             f"exceed the model's context of {limit} tokens")

    def save(self, path) -> dict:
        """Write the cache to directory `path` (atomically; all ranks call it) -> the manifest."""
        return save_session(self, path)
