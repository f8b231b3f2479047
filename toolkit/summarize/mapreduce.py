"""Long-document summarisation: one pass when the document fits the model's context,
otherwise hierarchical map-reduce over sections cut where the document itself breaks (files,
chapters, headings, pages), then paragraphs.

Every rank runs the same steps (same tokenisation, same sections, same broadcast tokens),
so all the collectives inside generate() line up; only the caller decides who prints.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..distributed.timing import clock
from ..documents import DocumentError
from ..documents.structure import has_files, has_pages
from ..options import check_max_new_tokens, check_positive_int
from .sections import Section, split_sections, whole

DEFAULT_INSTRUCTION = ("Summarise the document above in a short paragraph: what it is about, "
                       "the main events, people and numbers, and any conclusions.")
_SECTION = "Summarise the text above in two or three sentences. Keep names, dates and numbers."
_MERGE = ("The text above lists, in order, summaries of consecutive parts of one document{places}. "
          "{instruction}")
DEFAULT_REPETITION_PENALTY = 1.15
MIN_SECTION_TOKENS = 64  # below this a section holds too little text to be worth summarising
MAX_LEVELS = 8


@dataclass
class Progress:
    """One step of a summarisation, for progress bars: a prefill chunk or a finished pass."""
    stage: str            # "single" | "map" | "reduce"
    level: int            # 0: the document; 1+: summaries of summaries
    section: int          # 1-based pass number within the stage
    sections: int
    chunk: int            # prefill chunks done in this pass (0: the pass starts)
    chunks: int
    stage_chunks: int     # prefill chunks of the whole stage, known when it starts
    done: bool = False
    new_tokens: int = 0
    text: str = ""
    cached: bool = False  # read back from the section cache (--resume), not recomputed


@dataclass
class SummaryResult:
    summary: str
    mode: str                          # "single" | "map-reduce"
    sections: list[Section]            # the first level's sections (the whole document when single)
    levels: int                        # map levels run before the final pass
    document_tokens: int
    prompt_tokens: int                 # all prompts prefilled, summed over passes
    new_tokens: int
    section_summaries: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    finish_reason: str = "stop"        # the final pass's: "length" when it was cut at max_new_tokens


def encode_prompt(tokenizer, text: str, instruction: str) -> list[int]:
    """The model's chat-template prompt (plain text for a base model without a template)."""
    content = f"{text.strip()}\n\n{instruction}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids)
    return list(tokenizer(content + "\n").input_ids)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def model_context(lcm, max_context: int | None) -> int:
    """The tokens one pass may hold: the model's positions, or fewer with max_context."""
    limit = getattr(lcm.config, "max_position_embeddings", None) or max_context
    if limit is None:
        raise ValueError("the model's config has no max_position_embeddings: give its context as max_context")
    return min(limit, max_context) if max_context else limit


def with_marker_note(instruction: str, text: str) -> str:
    """Tell the model what the page and file markers in the text are for."""
    notes = []
    if has_pages(text):
        notes.append("Lines such as [page 12] mark where each page starts: cite pages as (p. 12).")
    if has_files(text):
        notes.append("Lines such as [file docs/intro.md] start each file: name the files you draw on.")
    return " ".join([instruction, *notes])


class _Summariser:
    """State of one summarisation; every pass goes through lcm.generate on all ranks."""

    def __init__(self, lcm, max_new_tokens, instruction, on_progress, on_token, max_context, single_pass,
                 repetition_penalty, cache=None):
        self.lcm, self.tok, self.repetition_penalty = lcm, lcm.tokenizer, repetition_penalty
        self.cache = cache
        self.max_new, self.instruction = max_new_tokens, instruction
        self.on_progress, self.on_token, self.single_pass = on_progress, on_token, single_pass
        self.context = model_context(lcm, max_context)
        self.prompt_tokens = self.new_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.speculation: dict = {}
        self.finish_reason = "stop"

    def _emit(self, **kw):
        if self.on_progress is not None:
            self.on_progress(Progress(**kw))

    def _run(self, ids, stage, level, section, sections, stage_chunks, stream=False) -> str:
        chunks = self._chunks(ids)
        common = dict(stage=stage, level=level, section=section, sections=sections, chunks=chunks,
                      stage_chunks=stage_chunks)
        self._emit(chunk=0, **common)
        result = self.lcm.generate(ids, self.max_new, repetition_penalty=self.repetition_penalty,
                                   on_token=self.on_token if stream else None,
                                   on_chunk=lambda done, _total: self._emit(chunk=done, **common))
        self._count(ids, result)
        self.prefill_s += result.timings.get("prefill_s", 0.0)
        self.decode_s += result.timings.get("decode_s", 0.0)
        text = result.text.strip()
        self._emit(chunk=chunks, done=True, new_tokens=len(result.token_ids), text=text, **common)
        return text

    def _count(self, ids, result) -> None:
        self.prompt_tokens += len(ids)
        self.new_tokens += len(result.token_ids)
        self.finish_reason = result.finish_reason
        self.speculation.update(Counter(self.speculation) + Counter(result.timings.get("speculation", {})))

    def _chunks(self, ids) -> int:
        """Prefill chunks of a prompt, as the engine cuts them (toolkit.attention.layout.chunk_spans)."""
        return -(-len(ids) // self.lcm.chunk_size)

    def _fits(self, ids) -> bool:
        return len(ids) + self.max_new <= self.context

    def run(self, text: str) -> SummaryResult:
        t0 = clock(self.lcm.topo.device)
        document_tokens = _count(self.tok, text)
        final = with_marker_note(self.instruction, text)
        level, first_sections, first_summaries = 0, [whole(self.tok, text)], []
        while True:
            ids = encode_prompt(self.tok, text, final)
            if self._fits(ids):
                stage = "single" if level == 0 else "reduce"
                summary = self._run(ids, stage, level, 1, 1, self._chunks(ids), stream=True)
                break
            if self.single_pass:
                raise ValueError(f"the prompt is {len(ids)} tokens; with {self.max_new} new tokens it exceeds the "
                                 f"context of {self.context} tokens and map-reduce is off (drop --single-pass)")
            if level >= MAX_LEVELS:
                raise ValueError(f"map-reduce did not converge after {MAX_LEVELS} levels; lower --max-new-tokens")
            sections, summaries = self._map(text, level)
            if level == 0:
                first_sections, first_summaries = sections, summaries
            places = [s.place() for s in sections]
            merged = "\n".join(f"- ({place}) {summary}" if place else f"- {summary}"
                                for place, summary in zip(places, summaries))
            if _count(self.tok, merged) >= _count(self.tok, text):
                raise ValueError("section summaries are not shorter than their sections; lower --max-new-tokens "
                                 "or raise --max-context")
            text, level = merged, level + 1
            final = _MERGE.format(instruction=self.instruction,
                                  places=", each after the pages or files it covers" if any(places) else "")
        return SummaryResult(
            summary=summary, mode="single" if level == 0 else "map-reduce", sections=first_sections, levels=level,
            document_tokens=document_tokens, prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens,
            section_summaries=first_summaries,
            timings={"total_s": clock(self.lcm.topo.device) - t0, "prefill_s": self.prefill_s,
                     "decode_s": self.decode_s, "speculation": self.speculation}, finish_reason=self.finish_reason)

    def _map(self, text: str, level: int) -> tuple[list[Section], list[str]]:
        """Summarise each section of text; sections leave room for the template and the answer."""
        instruction = with_marker_note(_SECTION, text)
        overhead = len(encode_prompt(self.tok, "", instruction))
        budget = self.context - self.max_new - overhead - 8  # 8: tokens that merge differently at the joins
        if budget < MIN_SECTION_TOKENS:
            raise ValueError(f"--max-new-tokens {self.max_new} leaves only {max(budget, 0)} tokens of the "
                             f"{self.context}-token context for each section; lower --max-new-tokens")
        while True:  # joins can tokenise a little longer than their parts: shrink until every prompt fits
            sections = split_sections(self.tok, text, budget)
            prompts = [encode_prompt(self.tok, s.text, instruction) for s in sections]
            if all(self._fits(p) for p in prompts) or budget <= MIN_SECTION_TOKENS:
                break
            budget = max(MIN_SECTION_TOKENS, int(budget * 0.9))
        stage_chunks = sum(self._chunks(p) for p in prompts)
        return sections, self._sections(prompts, level, stage_chunks)

    def _sections(self, prompts, level, stage_chunks) -> list[str]:
        """The map step: every section not finished by an earlier (crashed) run goes to the engine
        in one call, so their prefills and answers share steps. Each is kept in the section cache
        as soon as it ends; progress reports the sections in order, each starting as the one
        before it is reported done."""
        n, texts, todo = len(prompts), [None] * len(prompts), []
        for index, prompt in enumerate(prompts, 1):
            key = self.cache.key(prompt) if self.cache is not None else None
            cached = self.cache.lookup(key) if key is not None else None
            if cached is not None:
                texts[index - 1] = cached
            todo.append((index, prompt, key, cached))
        common = dict(stage="map", level=level, sections=n, stage_chunks=stage_chunks)
        shown, ended = [0], {}

        def report():  # sections in order: each done as soon as it and every one before it are
            while shown[0] < n and shown[0] + 1 in ended:
                index, prompt, _, cached = todo[shown[0]]
                new, text = ended.pop(index)
                chunks = 0 if cached is not None else self._chunks(prompt)
                self._emit(section=index, chunks=chunks, chunk=chunks, done=True, new_tokens=new, text=text,
                           cached=cached is not None, **common)
                shown[0] += 1
                if shown[0] < n:
                    self._start(todo[shown[0]], common)

        def finished(i, result):  # rank 0, as each section ends: kept at once, reported in order
            index, _, key, _ = run[i]
            text = result.text.strip()
            if key is not None:
                self.cache.store(key, text)
            ended[index] = (len(result.token_ids), text)
            report()

        run = [t for t in todo if t[3] is None]
        for index, _, _, cached in todo:
            if cached is not None:
                ended[index] = (0, cached)
        self._start(todo[0], common)
        report()
        if run:
            t0 = clock(self.lcm.topo.device)
            results = self.lcm.generate([p for _, p, _, _ in run], self.max_new,
                                        repetition_penalty=self.repetition_penalty, on_result=finished)
            first = max(r.timings.get("ttft_s", 0.0) for r in results)
            self.prefill_s += first
            self.decode_s += clock(self.lcm.topo.device) - t0 - first
            for (index, prompt, _, _), result in zip(run, results):
                self._count(prompt, result)
                texts[index - 1] = result.text.strip()
        return texts

    def _start(self, item, common) -> None:
        index, prompt, _, cached = item
        self._emit(section=index, chunks=0 if cached is not None else self._chunks(prompt), chunk=0,
                   cached=cached is not None, **common)

def summarize_text(lcm, text, max_new_tokens: int = 256, *, instruction: str | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   on_token: Callable[[int], None] | None = None, max_context: int | None = None,
                   single_pass: bool = False, repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
                   cache_dir=None, resume: bool = False) -> SummaryResult:
    """Summarise text with a LongContextModel; call on every rank. on_token streams the final pass only.

    Decoding is greedy with a mild repetition penalty: small models otherwise loop on a phrase,
    and a looping section summary wastes the whole reduce step. 1.0 gives plain greedy."""
    text = getattr(text, "text", text)  # a toolkit.documents.Document or a str
    check_max_new_tokens(max_new_tokens)
    if max_context is not None:
        check_positive_int("max_context", max_context)
    if not text.strip():
        raise DocumentError("the document is empty: give a text document to summarise")
    if lcm.tokenizer is None:
        raise ValueError("summarising needs a tokenizer: load a model folder that has one")
    from .section_cache import SectionCache, default_cache_dir

    instruction = instruction or DEFAULT_INSTRUCTION
    cache = SectionCache(cache_dir or default_cache_dir(), resume, lcm.config.to_json_string(),
                         dict(max_new=max_new_tokens, penalty=repetition_penalty, instruction=instruction))
    summariser = _Summariser(lcm, max_new_tokens, instruction, on_progress, on_token,
                             max_context, single_pass, repetition_penalty, cache)
    return summariser.run(text)


def summarize_in_session(lcm, text, max_new_tokens: int = 256, *, instruction: str | None = None,
                         on_token=None, on_chunk=None, max_context: int | None = None,
                         repetition_penalty: float = DEFAULT_REPETITION_PENALTY):
    """A single-pass summary through a DocumentSession -> (SummaryResult, session): the document is
    prefilled once and kept, to be saved and questioned next; the instruction is its first question."""
    from ..sessions.session import document_ids, question_ids

    text = getattr(text, "text", text).strip()
    if not text:
        raise DocumentError("the document is empty: give a text document to summarise")
    instruction = with_marker_note(instruction or DEFAULT_INSTRUCTION, text)
    context = model_context(lcm, max_context)
    needed = len(document_ids(lcm.tokenizer, text, True)) + len(question_ids(lcm.tokenizer, instruction, True))
    if needed + max_new_tokens > context:
        raise ValueError(f"--save-cache keeps a document read in one pass, and this one needs map-reduce "
                         f"({needed} + {max_new_tokens} tokens > the context of {context}); drop --save-cache")
    t0 = clock(lcm.topo.device)
    session = lcm.prefill_document(text, on_chunk=on_chunk)
    answer = session.ask(instruction, max_new_tokens, repetition_penalty=repetition_penalty, on_token=on_token)
    result = SummaryResult(
        summary=answer.text.strip(), mode="single", sections=[whole(lcm.tokenizer, text)], levels=0,
        document_tokens=_count(lcm.tokenizer, text), prompt_tokens=answer.prompt_tokens,
        new_tokens=len(answer.token_ids),
        timings={**answer.timings, "total_s": clock(lcm.topo.device) - t0,
                 "prefill_s": session.prefill_s + answer.timings["prefill_s"]}, finish_reason=answer.finish_reason)
    return result, session
