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
@click.option("--api-key", metavar="KEY", envvar="LCTK_API_KEY", help="Require 'Authorization: Bearer KEY' "
                                                                     "on /v1 (also $LCTK_API_KEY).")
@click.option("--max-cached-tokens", type=click.IntRange(min=0), default=262144, show_default=True, metavar="N",
              help="Prompt tokens whose KV caches are kept for prefix reuse (least recently used go first).")
@model_options
def serve(host, port, served_model_name, api_key, max_cached_tokens, **opts):
    """Serve the model through the OpenAI API (completions, chat completions, streaming).

    Requests queue and run one at a time over all ranks (no continuous batching): rank 0
    receives each one, every rank prefills and decodes it together. A prompt that starts like
    a recent one prefills only the rest (usage.prompt_tokens_details.cached_tokens).
    """
    from ..distributed.launcher import is_main
    from ..models import load_config, resolve_source
    from ..rope_scaling import scaled

    check_preset(opts)
    if is_main():
        check_port(host, port)
    config = scaled(load_config(resolve_source(opts["model"], opts["gguf_file"]), opts["trust_remote_code"]),
                    opts["rope_scaling"])
    context = getattr(config, "max_position_embeddings", None) or 4096
    with command_output(opts["debug"]):
        lcm = open_model(opts, context)
        run_server(lcm, host, port, served_model_name or opts["model"], api_key, max_cached_tokens, context)


def run_server(lcm, host, port, served, api_key, max_cached_tokens, context):
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

    metrics = Metrics(lambda: worker.queued)
    worker.metrics = metrics
    app = make_app(worker, lcm.tokenizer, served, context, api_key, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    http = threading.Thread(target=server.run, name="lctk-http", daemon=True)

    def stop(*_):
        worker.stopping.set()
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    click.echo(f"lctk: serving {served} at http://{host}:{port}/v1 on {lcm.topo.world} rank(s) "
               "(OpenAI API: /v1/models, /v1/completions, /v1/chat/completions; /health, /metrics)", err=True)
    try:
        worker.run()
    finally:
        worker.thread_ok = False
        server.should_exit = True
        http.join(timeout=10)
    click.echo("lctk: server stopped", err=True)
