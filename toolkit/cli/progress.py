"""What rank 0 shows while it works: tokens as they stream, and a progress bar over prefill
chunks and summary sections (tqdm, on stderr)."""
from __future__ import annotations

import sys

import click

from ..summarize import Progress


class TokenPrinter:
    """Prints tokens as they arrive; decodes the whole answer each time so multi-byte characters
    split over tokens come out whole (a trailing U+FFFD means: wait for the next token)."""

    def __init__(self, tokenizer, out, strip: bool = False):
        self.tokenizer, self.out, self.strip, self.ids, self.shown = tokenizer, out, strip, [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = text.lstrip() if self.strip else text
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self, final_text: str, finish_reason: str | None = None, max_new_tokens: int | None = None):
        """The rest of the text and its line's end; then, on stderr, a line if it was cut short."""
        if final_text.startswith(self.shown):
            self.out.write(final_text[len(self.shown):])
        self.out.write("\n")
        self.out.flush()
        note = cut_note(finish_reason, max_new_tokens)
        if note:
            click.echo(note, err=True)


def cut_note(finish_reason: str | None, max_new_tokens: int | None) -> str | None:
    """What a user is told when an answer ended at its token limit, not where the model ended it."""
    if finish_reason != "length":
        return None
    return (f"lctk: the answer stopped at --max-new-tokens ({max_new_tokens}), not where the model ended it: "
            "raise --max-new-tokens for the rest")


class ProgressBar:
    """A tqdm bar over prefill chunks on rank 0's stderr (a terminal only) and one line per
    finished section, which also lands in logs. It closes before the answer starts to stream."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def _open(self):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="chunk", file=sys.stderr, disable=None, leave=False,
                            dynamic_ncols=True)
        return self.bar

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, line: str):
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

    def _stage(self, total: int, label: str):
        bar = self._open()
        bar.total += total
        bar.set_description(label)

    def chunk(self, done: int, total: int):
        """Callback for generate(on_chunk=...)."""
        if not self.enabled:
            return
        if done == 1:
            self._stage(total, "prefill")
        self._open().update(1)
        if done == total:
            self.close()

    def __call__(self, p: Progress):
        """Callback for summarize(on_progress=...)."""
        if not self.enabled:
            return
        label = f"level {p.level} section {p.section}/{p.sections}" if p.stage == "map" else p.stage
        if p.chunk == 0 and not p.done:  # a pass starts
            if p.section == 1:
                if p.stage == "map":
                    self._write(f"lctk: level {p.level}: {p.sections} sections to summarise "
                                f"({p.stage_chunks} prefill chunks)")
                self._stage(p.stage_chunks, label)
            else:
                self._open().set_description(label)
        elif not p.done:
            self._open().update(1)
            if p.stage != "map" and p.chunk == p.chunks:
                self.close()
        elif p.stage == "map":  # the map step's sections run as one batch: their chunks count as each ends
            how = "read back from the section cache" if p.cached else f"done ({p.new_tokens} tokens)"
            self._open().update(p.chunks)
            self._write(f"lctk: level {p.level} section {p.section}/{p.sections} {how}")
