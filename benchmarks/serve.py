"""The server's cost, demo model, one rank (`lctk serve` in a process of its own, driven by
the openai client), with the same threads as the in-process baseline:

- serve_overhead: a completion's wall time through the server over the same generate()
  in this process (same prompt ids, same greedy tokens), medians of interleaved runs;
- serve_cached_ttft_vs_cold: time to the first streamed token when a long prefix (a
  document) is in the prefix cache, over a cold request of the same length.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 512, 32


def _start(folder: str, port: int, threads: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = Path(__file__).resolve().parents[1] / "launch" / "run.py"
    proc = subprocess.Popen([sys.executable, str(run), "serve", "--model", folder, "--port", str(port),
                             "--served-model-name", "bench"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("the server did not come up in 300 s")


def _ids(tokenizer, tokens: int, seed: int) -> list[int]:
    from toolkit.summarize.synthetic import station_logbook

    ids = tokenizer(station_logbook(days=tokens // 40 + 5, seed=seed)).input_ids
    return list(ids[:tokens])


def serve_figures(folder: str, threads: int, repeats: int, document_tokens: int) -> tuple[dict, list]:
    import torch
    from openai import OpenAI

    from toolkit import LongContextModel
    from .rank_group import free_port

    from .measure import median

    torch.set_num_threads(threads)
    lcm = LongContextModel.from_pretrained(folder, preflight=False)
    port = int(free_port())
    proc = _start(folder, port, threads)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        prompt = _ids(lcm.tokenizer, PROMPT_TOKENS, 0)
        served, local = [], []
        def timed(fn) -> float:
            time.sleep(1.0)  # the other process's threads stop spinning before this one starts
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def through_server():
            client.completions.create(model="bench", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)

        def in_process():
            lcm.generate(prompt, max_new_tokens=NEW_TOKENS)

        for i in range(repeats + 1):  # the first pair warms both up and is not counted; the order alternates
            pair = (timed(through_server), timed(in_process)) if i % 2 else tuple(reversed(
                (timed(in_process), timed(through_server))))
            if i:
                served.append(pair[0])
                local.append(pair[1])

        def ttft(ids) -> float:
            t0 = time.perf_counter()
            for _ in client.completions.create(model="bench", prompt=ids, max_tokens=1, temperature=0, stream=True):
                break
            return time.perf_counter() - t0

        cold, cached = [], []
        for seed in range(1, repeats + 1):
            document = _ids(lcm.tokenizer, document_tokens, seed)
            cold.append(ttft(document + [28, 29, 30]))     # a document never seen: all of it prefilled
            cached.append(ttft(document + [31, 32, 33]))   # the same document, another question
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    metrics = {"serve_overhead": median(served) / median(local),
               "serve_cached_ttft_vs_cold": median(cached) / median(cold)}
    return metrics, [{"bench": "serve", "model": "SmolLM2-135M-Instruct", "prompt_tokens": PROMPT_TOKENS,
                      "new_tokens": NEW_TOKENS, "served_s": served, "in_process_s": local,
                      "document_tokens": document_tokens, "cold_ttft_s": cold, "cached_ttft_s": cached, **metrics}]
