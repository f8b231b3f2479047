"""`lctk serve`: the OpenAI API over every rank the launcher started. Rank 0 runs the HTTP
server in a thread; every rank's main thread runs the model step (toolkit.serve.worker)."""
from __future__ import annotations

import signal
import socket
import threading

import click

from .support import check_preset, command_output, model_options, open_model


def check_port(host: str, port: int):
    """A port someone else holds is refused before the model loads."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise click.UsageError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") \
                from None


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--served-model-name", metavar="NAME", help="The model's name in the API. [default: --model]")
@click.option("--api-key", "api_keys", metavar="KEY", multiple=True, envvar="LCTK_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (also $LCTK_API_KEY, keys apart by spaces). "
                   "Repeatable: each key is a tenant of its own, and no key's requests reuse another's cached "
                   "prefixes.")
@click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="More API keys, one a line (blank lines and # comments skipped); each a tenant of its own.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), metavar="BYTES",
              help="Largest request body taken (refused from its Content-Length, or as soon as more arrives). "
                   "[default: the context x 16 bytes + 1 MiB]")
@click.option("--max-cached-tokens", type=click.IntRange(min=0), default=262144, show_default=True, metavar="N",
              help="Prompt tokens whose KV caches are kept for prefix reuse (least recently used go first).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM: waiting requests get a 503 with Retry-After at once; running ones may finish "
                   "for this long, then they are cut at their next token.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), metavar="N",
              help="Tokens of one engine step: a token of each running request, then prefill chunks of the others. "
                   "[default: the planner's for this hardware and dtype: a step of prefill takes about 4 decode "
                   "steps' time (lctk plan prints it)]")
@click.option("--max-running", type=click.IntRange(min=1), default=32, show_default=True, metavar="N",
              help="Requests in the running batch at once; more wait for a place.")
@click.option("--kv-blocks", type=click.IntRange(min=1), metavar="N",
              help="Blocks of 256 positions in the KV cache's pool. [default: what 80% of the memory free after "
                   "loading holds]")
@click.option("--max-itl-ms", type=click.FloatRange(min=0, min_open=True), metavar="MS",
              help="A goal for the time between two tokens of a running request: prefill gets a smaller share of "
                   "each step to keep it. [default: none]")
@click.option("--elastic/--no-elastic", default=None,
              help="Run each request on as many sequence-parallel ranks as its length needs (the planner's cost "
                   "model: a short chat on one rank, the others serving other requests; a long prompt on what "
                   "makes it fast), not on all of them. [default: on when the layout has ulysses x ring > 1 "
                   "and pp = 1]")
@click.option("--min-sp-tokens", type=click.IntRange(min=1), metavar="N",
              help="With --elastic: prompts shorter than N tokens run on one sequence-parallel rank, longer ones "
                   "on all, instead of the planner's choice.")
@model_options
def serve(host, port, served_model_name, api_keys, api_keys_file, max_request_bytes, max_cached_tokens,
          shutdown_timeout, max_batch_tokens, max_running, kv_blocks, max_itl_ms, elastic, min_sp_tokens, **opts):
    """Serve the model through the OpenAI API (completions, chat completions, streaming).

    Requests are batched continuously over all ranks: each engine step runs one token of every
    running request and prefill chunks of new ones within --max-batch-tokens, so a long prompt
    never stalls the answers being made beside it. A prompt that starts like a recent one reads
    that one's cached keys by reference and prefills only the rest
    (usage.prompt_tokens_details.cached_tokens). When the KV pool runs out, the newest request is
    preempted and recomputed later; one that can never fit is refused with a 400. With --elastic
    (the default where there are several sequence-parallel ranks) each request runs on as many of
    them as its length needs, and requests on different ranks run side by side (usage.sp_degree).
    """
    from ..config import detect_hardware
    from ..distributed.launcher import is_main
    from ..planner import load_hardware, step_token_budget
    from ..models import load_config, resolve_source
    from ..engine.settings import EngineSettings
    from ..rope_scaling import scaled
    from ..serve.gate import read_keys

    check_preset(opts)
    if elastic and (opts.get("pp") or 1) > 1:
        _no_elastic_with_pp(opts["pp"])
    try:
        keys = read_keys(api_keys, api_keys_file)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise click.UsageError(f"--api-key/--api-keys-file: {err}") from None
    if is_main():
        check_port(host, port)
    config = scaled(load_config(resolve_source(opts["model"], opts["gguf_file"]), opts["trust_remote_code"]),
                    opts["rope_scaling"])
    context = getattr(config, "max_position_embeddings", None) or 4096
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    with command_output(opts["debug"]):
        lcm = open_model(opts, context)
        budget = max_batch_tokens or step_token_budget(load_hardware(detect_hardware()), lcm.run.dtype)
        dims = lcm.run.dims
        if elastic and dims.pp > 1:  # the planner chose pipeline stages
            _no_elastic_with_pp(dims.pp)
        lcm.engine_settings = EngineSettings(max_batch_tokens=budget, max_running=max_running, kv_blocks=kv_blocks,
                                             max_itl_ms=max_itl_ms, prefill_chunk=budget, min_sp_tokens=min_sp_tokens,
                                             elastic=dims.sp > 1 and dims.pp == 1 if elastic is None else elastic)
        run_server(lcm, host, port, served_model_name or opts["model"], keys, max_request_bytes, max_cached_tokens,
                   context, vocab, shutdown_timeout)


def _no_elastic_with_pp(pp: int):
    raise click.UsageError(f"--elastic splits the sequence-parallel ranks of one pipeline stage; this layout has "
                           f"pp={pp}: serve it with --no-elastic, or with pp=1")


def run_server(lcm, host, port, served, keys, max_request_bytes, max_cached_tokens, context, vocab,
               shutdown_timeout: float = 30.0):
    from ..serve.gate import Gate, default_max_request_bytes
    from ..serve.metrics import Metrics
    from ..serve.worker import Worker

    worker = Worker(lcm, max_cached_tokens)
    if not lcm.topo.is_main:
        for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 says when to stop, so every rank stops together
            signal.signal(sig, signal.SIG_IGN)
        worker.run()
        return
    import uvicorn

    from ..serve.app import make_app

    metrics = Metrics(lambda: worker.queued, worker.engine)
    worker.metrics = metrics
    gate = Gate(keys, host, port, max_request_bytes or default_max_request_bytes(context))
    app = make_app(worker, lcm.tokenizer, served, context, gate, metrics, vocab)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    http = threading.Thread(target=server.run, name="lctk-http", daemon=True)

    def stop(*_):  # the HTTP side keeps answering (503s, the running request) until the worker is done
        worker.stop(shutdown_timeout)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    click.echo(f"lctk: serving {served} at http://{host}:{port}/v1 on {lcm.topo.world} rank(s) "
               "(OpenAI API: /v1/models, /v1/completions, /v1/chat/completions; /health, /metrics)", err=True)
    if gate.open:
        click.echo(f"lctk: warning: no --api-key: anyone who can reach port {port} on {host} can use this server "
                   "(only requests naming localhost or the bound address as Host, with a JSON body, are answered)",
                   err=True)
    try:
        worker.run()
    finally:
        worker.thread_ok = False
        worker.refuse_waiting()  # any request queued after the last look: a 503, not silence
        server.should_exit = True
        http.join(timeout=10)
    click.echo("lctk: server stopped", err=True)
