"""Plumbing of the lctk commands: one-line errors, rank-0 output, quiet libraries, streamed
tokens, the progress bar, input checks, atomic writes and the preset glue.

Kept apart from cli.py so the commands read as what they do, not how they print. torch is
imported inside functions: `lctk --help`, `plan` and `presets` start without it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import click

from .summarize import DocumentError, Progress, decode_text, read_document

HANDLED = (ValueError, OSError)  # bad input and missing files: one line, no traceback
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def is_main() -> bool:
    """Rank 0 writes; before the process group exists the launcher's RANK says who we are."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or "failed"


class LctkGroup(click.Group):
    """A group whose failures are one `Error: ...` line on rank 0's stderr (tracebacks with --debug)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("LCTK_DEBUG") == "1"
        previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            try:
                rv = super().main(argv, prog_name, complete_var, False, **extra)
            except Exception as err:  # a dead peer or a timed-out collective: name the rank, exit 1
                watchdog = sys.modules.get("toolkit.distributed.watchdog")  # loaded only by multi-rank runs
                if watchdog is not None:
                    watchdog.report_failure(err)
                raise
        except _NO_ARGS_IS_HELP as err:  # a bare `lctk`: the help, as click shows it
            err.show()
            sys.exit(err.exit_code)
        except click.ClickException as err:
            hint = ""
            if isinstance(err, click.UsageError) and err.ctx is not None:
                hint = f" (see '{err.ctx.command_path} --help')"
            _fail(one_line(err.format_message()) + hint, err.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except HANDLED as err:
            if debug:
                raise
            code = 2 if isinstance(err, DocumentError) else 1
            _fail(one_line(str(err) or type(err).__name__), code)
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        sys.exit(rv if isinstance(rv, int) else 0)


def _on_sigterm(signum, frame):
    """The launcher stops us (usually because a peer died): let the watchdog say who."""
    watchdog = sys.modules.get("toolkit.distributed.watchdog")
    if watchdog is not None:
        watchdog.raise_rank_stopped()
    raise SystemExit(143)


def _fail(message: str, code: int):
    if is_main():  # every rank hits the same bad input: one line, not one per rank
        click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def quiet_libraries():
    """transformers/deepspeed progress bars and notices stay off the terminal (errors still show)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


@contextlib.contextmanager
def command_output(debug: bool):
    """Yield where results go (rank 0's real stdout, else nowhere); stray prints go to stderr meanwhile."""
    if not debug:
        quiet_libraries()
    out = sys.stdout
    with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(sys.stderr):
        yield out if is_main() else devnull


def share_cpu_cores():
    """CPU ranks of one node share its cores: without a limit each rank starts one thread per core."""
    import torch

    from .distributed.topology import launcher_env

    local_world = launcher_env()["local_world"]
    if torch.cuda.is_available() or local_world <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


# ---- input and output ----------------------------------------------------------------------
def _stdin_bytes() -> bytes:
    stream = sys.stdin
    return getattr(stream, "buffer", stream).read() if stream is not None else b""


def read_input(path: str, suffixes, timeout_s: float) -> str:
    """A file, or `-` for stdin; stdin is read by rank 0 and sent to the others (they see no input)."""
    if path != "-":
        return read_document(path, suffixes)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return decode_text(_stdin_bytes(), "standard input")
    import torch.distributed as dist

    from .distributed.topology import init_process_group

    init_process_group(timeout_s)
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", decode_text(_stdin_bytes(), "standard input"))]
        except DocumentError as err:
            payload = [("error", str(err))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise DocumentError(value)
    return value


def check_output_path(path: str | None):
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise DocumentError(f"--output {path} is a folder; give a file name")
    if not target.absolute().parent.is_dir():
        raise DocumentError(f"--output {path}: folder {target.absolute().parent} does not exist")


def write_atomic(path: str, text: str):
    """Write through a temp file in the same folder and rename: readers never see half a file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- streaming and progress ------------------------------------------------------------------
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

    def finish(self, final_text: str):
        if final_text.startswith(self.shown):
            self.out.write(final_text[len(self.shown):])
        self.out.write("\n")
        self.out.flush()


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
        elif p.stage == "map":
            how = "read back from the section cache" if p.cached else f"done ({p.new_tokens} tokens)"
            self._write(f"lctk: level {p.level} section {p.section}/{p.sections} {how}")
