"""The server's cost, demo model, one rank (`lctk serve` in a process of its own, driven by
the openai client), with the same threads as the in-process baseline:

- serve_overhead: a completion's wall time through the server over the same generate()
  in this process (same prompt ids, same greedy tokens), medians of interleaved runs;
- serve_cached_ttft_vs_cold: time to the first streamed token when a long prefix (a
  document) is in the prefix cache, over a cold request of the same length;
- doc8_kv_vs_one: 8 questions about one ~4K-token document sent at once, the KV bytes the server
  holds at their peak (lctk_kv_bytes, sampled) over those of one such question alone;
- doc8_vs_sequential: the wall time of those 8 at once over the same 8 one after another (the
  first prefills the document, the others read it from the prefix cache), each set under its own
  cache_salt so neither reads the other's; every answer equal in both.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 512, 32
DOC8_QUESTIONS, DOC8_NEW = 8, 64


def _start(folder: str, port: int, threads: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = Path(__file__).resolve().parents[1] / "launch" / "run.py"
    proc = subprocess.Popen([sys.executable, str(run), "serve", "--model", folder, "--port", str(port),
                             "--served-model-name", "bench", "--speculate", "off"], env=env, stdout=subprocess.DEVNULL,
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
    lcm = LongContextModel.from_pretrained(folder, preflight=False, speculate="off")
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
        doc8 = _doc8(client, f"http://127.0.0.1:{port}", lcm.tokenizer, document_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    metrics = {"serve_overhead": median(served) / median(local),
               "serve_cached_ttft_vs_cold": median(cached) / median(cold),
               "doc8_kv_vs_one": doc8["kv_peak_8"] / doc8["kv_peak_1"],
               "doc8_vs_sequential": doc8["together_s"] / doc8["sequential_s"]}
    return metrics, [{"bench": "serve", "model": "SmolLM2-135M-Instruct", "prompt_tokens": PROMPT_TOKENS,
                      "new_tokens": NEW_TOKENS, "served_s": served, "in_process_s": local,
                      "document_tokens": document_tokens, "cold_ttft_s": cold, "cached_ttft_s": cached, **doc8,
                      **metrics}]


def _kv_bytes(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        return next(float(line.split()[-1]) for line in reply.read().decode().splitlines()
                    if line.startswith("lctk_kv_bytes "))


class _PeakKV:
    """lctk_kv_bytes sampled every 20 ms while a block runs: its peak over what was held before."""

    def __init__(self, url: str):
        self.url, self.peak, self.stop = url, 0.0, threading.Event()

    def __enter__(self):
        self.before = _kv_bytes(self.url)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _kv_bytes(self.url) - self.before)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _doc8(client, url: str, tokenizer, document_tokens: int) -> dict:
    """8 questions about one document: at once, one after another, and one alone (module docstring)."""
    document = _ids(tokenizer, document_tokens, 100)
    questions = [document + tokenizer(f"\nQuestion {i + 1}: which ship came on day {3 * i + 2}, and what did it "
                                      "carry? Answer:").input_ids for i in range(DOC8_QUESTIONS)]

    def ask(ids, salt) -> str:
        reply = client.completions.create(model="bench", prompt=ids, max_tokens=DOC8_NEW, temperature=0,
                                          extra_body={"cache_salt": salt})
        return reply.choices[0].text

    with _PeakKV(url) as one:
        ask(questions[0], "alone")
    time.sleep(1.0)
    t0 = time.perf_counter()
    sequential = [ask(q, "sequential") for q in questions]
    sequential_s = time.perf_counter() - t0
    time.sleep(1.0)
    with _PeakKV(url) as eight, ThreadPoolExecutor(DOC8_QUESTIONS) as pool:
        t0 = time.perf_counter()
        together = list(pool.map(lambda q: ask(q, "together"), questions))
        together_s = time.perf_counter() - t0
    if together != sequential:
        raise AssertionError("the 8 questions asked at once were not answered as when asked one after another")
    return {"doc8_new_tokens": DOC8_NEW, "kv_peak_1": one.peak, "kv_peak_8": eight.peak,
            "sequential_s": sequential_s, "together_s": together_s}
