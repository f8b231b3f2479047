"""What the lctk commands share: one-line errors, rank-0 output, quiet libraries, input
checks, the model options and the model they open.

Kept apart from the command modules so they read as what they do, not how they print. torch is
imported inside functions: `lctk --help`, `plan` and `presets` start without it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import click

from ..distributed import watchdog
from ..distributed.launcher import is_main, launcher_env
from ..settings import debug_enabled
from ..documents import DocumentError
from ..options import BY_NAME, LOAD, RUN
from .flags import click_option

HANDLED = (ValueError, OSError)  # bad input and missing files: one line, no traceback
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or "failed"


def _debug_flag(ctx, param, value):
    """Every --debug lands on the group, which decides how a failure is shown."""
    if value:
        ctx.find_root().command.debug = True
    return value


debug_option = click.option("--debug", is_flag=True, callback=_debug_flag,
                            help="Show full tracebacks and library logs on errors.")


class LctkGroup(click.Group):
    """A group whose failures are one `Error: ...` line on rank 0's stderr (tracebacks with --debug)."""

    debug = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        self.debug = debug_enabled()
        previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            try:
                rv = super().main(args, prog_name, complete_var, False, **extra)
            except Exception as err:  # a dead peer or a timed-out collective: name the rank, exit 1
                watchdog.report_failure(err)  # returns unless a multi-rank job's peer failed
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
            if self.debug:
                raise
            code = 2 if isinstance(err, DocumentError) else 1
            _fail(one_line(str(err) or type(err).__name__), code)
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        sys.exit(rv if isinstance(rv, int) else 0)


def _on_sigterm(signum, frame):
    """The launcher stops us (usually because a peer died): let the watchdog say who."""
    if watchdog.heartbeat_running():
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
def _stdout_onto_stderr():
    """Point stdout at stderr, at the file-descriptor level where there is one (libraries that
    bound a handler to stdout at import, and C code, print there too); yield the real stdout."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (click's test runner): Python level only
        real = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield real
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    real = open(saved, "w", encoding="utf-8", closefd=True)
    try:
        yield real
    finally:
        real.flush()
        sys.stdout.flush()
        os.dup2(saved, fd)
        real.close()


@contextlib.contextmanager
def command_output(debug: bool):
    """Yield where results go (rank 0's real stdout, else nowhere); anything else printed to
    stdout meanwhile (DeepSpeed's first-run notices, AutoTP) goes to stderr, so `--json` is one object."""
    if not debug:
        quiet_libraries()
    with _stdout_onto_stderr() as real, open(os.devnull, "w", encoding="utf-8") as devnull:
        yield real if is_main() else devnull


def share_cpu_cores():
    """CPU ranks of one node share its cores: without a limit each rank starts one thread per core."""
    import torch

    local_world = launcher_env()["local_world"]
    if torch.cuda.is_available() or local_world <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


# ---- the model options ---------------------------------------------------------------------
def _rope_scaling(ctx, param, value):
    if value:
        from ..rope_scaling import parse

        try:
            parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err).split(": ", 1)[1], param_hint="--rope-scaling") from None
    return value


MODEL_OPTIONS = tuple(name for name, option in BY_NAME.items() if option.part in (RUN, LOAD))


def model_options(command):
    """Options shared by the commands that load a model: every run and load option declared in
    toolkit.options (a --rope-scaling value is checked by its parser before the model loads)."""
    command = debug_option(command)
    for name in reversed(MODEL_OPTIONS):
        checked = {"callback": _rope_scaling} if name == "rope_scaling" else {}
        command = click_option(BY_NAME[name], **checked)(command)
    return command


def open_model(opts: dict, context_tokens: int):
    """The LongContextModel of the options; a bad preset, model or layout fails before weights load."""
    from ..api import LongContextModel

    share_cpu_cores()
    lcm = LongContextModel.from_pretrained(opts["model"], context_tokens=context_tokens,
                                           **{name: opts[name] for name in MODEL_OPTIONS if name != "model"})
    if lcm.topo.is_main:
        d = lcm.layout
        click.echo(f"lctk: {opts['model']} on {lcm.topo.world} rank(s): tp={d['tp']} x ulysses={d['ulysses']} x "
                   f"ring={d['ring']} x pp={d['pp']}, prefill chunks of {lcm.chunk_size} tokens, {lcm.run.dtype}",
                   err=True)
    return lcm


def check_preset(opts: dict):
    """A bad preset fails in a second, before the model's config (a GGUF parse: seconds) is read."""
    if opts["preset"]:
        from ..planner.presets import load_preset

        load_preset(opts["preset"])


def document_context(opts: dict, chars: int, max_context: int | None) -> int:
    """Tokens the planner sizes one pass for: the document (~4 characters a token), at most the
    model's context (or --max-context), since map-reduce never prefills more than that at once.
    Only a long document pays for reading the config here (a GGUF config takes seconds)."""
    tokens = min(chars // 4 + 1, max_context or chars)
    if tokens <= 32 * 1024:  # within any model's context worth planning for: no need to look
        return max(1, tokens)
    from ..models import load_config, resolve_source

    config = load_config(resolve_source(opts["model"], opts["gguf_file"]), opts["trust_remote_code"])
    return max(1, min(tokens, getattr(config, "max_position_embeddings", None) or tokens))


def run_report(lcm) -> dict:
    """What every --json of a model command adds: the layout with its dtype, load time and the
    largest rank's memory peaks. Collective: every rank calls it."""
    return {"layout": {**lcm.layout, "dtype": lcm.run.dtype}, "load_s": lcm.load_s, **lcm.memory_peaks()}
