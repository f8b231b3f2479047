"""`lctk serve` on a tiny random model without a tokenizer (token-id prompts), ring=2 under
torchrun: greedy tokens equal the single-process model's, cold, with a reused prefix, and for
requests arriving together at random moments; a client that leaves mid-stream frees its blocks; a
rank that dies takes the whole server down with a non-zero exit; each API key is a tenant that
reuses only its own cached prefixes."""
import random
import signal
import threading
import time
import urllib.request

import psutil
import pytest
import torch

import tiny_models
from helpers import start_server, stop_all

NEW = 8


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"{server['url']}/metrics") as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_token_prompts_cold_and_cached_equal_the_single_process_model(tiny_dirs):
    from openai import OpenAI

    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16, "--served-model-name",
                           "tiny")
    proc = started["proc"]
    try:
        c = OpenAI(base_url=f"{started['url']}/v1", api_key="none", max_retries=0, timeout=120)
        model = tiny_models.build("llama")
        document = [int(t) for t in torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(1))]
        for question in ([5, 6, 7], [9, 10, 11, 12]):
            ids = document + question
            reply = c.completions.create(model="tiny", prompt=ids, max_tokens=NEW, temperature=0,
                                         extra_body={"return_token_ids": True})
            expected = tiny_models.reference_generate(model, torch.tensor([ids]), NEW)
            assert reply.choices[0].token_ids == expected
        assert reply.usage.prompt_tokens_details.cached_tokens == len(document)  # the second question's
        # arrivals at random moments, of random lengths (fixed seeds): each answer is its solo run's
        rng = random.Random(5)
        asks = [([rng.randrange(96) for _ in range(rng.randint(1, 60))], rng.randint(1, 12)) for _ in range(8)]
        answers = {}

        def send(i, ids, new):
            time.sleep(rng_delays[i])
            reply = c.completions.create(model="tiny", prompt=ids, max_tokens=new, temperature=0,
                                         extra_body={"return_token_ids": True})
            answers[i] = reply.choices[0].token_ids

        rng_delays = [rng.random() * 0.5 for _ in asks]
        threads = [threading.Thread(target=send, args=(i, ids, new)) for i, (ids, new) in enumerate(asks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, (ids, new) in enumerate(asks):
            assert answers[i] == tiny_models.reference_generate(model, torch.tensor([ids]), new), f"request {i}"
        # a client that leaves mid-stream: its request ends and its blocks go back
        stream = c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4000, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.time() + 60
        while (metric(started, "lctk_requests_running") or metric(started, "lctk_kv_blocks_used")) and \
                time.time() < deadline:
            time.sleep(0.2)
        assert metric(started, "lctk_requests_running") == 0 and metric(started, "lctk_kv_blocks_used") == 0
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "run.py" in " ".join(p.cmdline())]
        ranks[-1].send_signal(signal.SIGKILL)  # a rank dies: the server must not stay up half-alive
        t0 = time.time()
        proc.wait(timeout=120)
        assert proc.returncode != 0 and time.time() - t0 < 120
    finally:
        stop_all(proc)


def test_each_api_key_is_a_tenant_that_sees_only_its_own_cached_prefixes(tiny_dirs, tmp_path):
    import openai
    from openai import OpenAI

    keys_file = tmp_path / "keys"
    keys_file.write_text("# one key a line\nkey-three\n\n")
    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16, "--served-model-name",
                           "tiny", "--api-key", "key-one", "--api-key", "key-two", "--api-keys-file", keys_file)
    try:
        def cached(key, question, **extra):
            c = OpenAI(base_url=f"{started['url']}/v1", api_key=key, max_retries=0, timeout=120)
            reply = c.completions.create(model="tiny", prompt=document + question, max_tokens=2, temperature=0,
                                         extra_body=extra or None)
            return reply.usage.prompt_tokens_details.cached_tokens

        document = [int(t) for t in torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(2))]
        assert cached("key-one", [5, 6]) == 0
        assert cached("key-one", [5, 7]) == len(document) + 1       # its own prefix
        assert cached("key-two", [5, 8]) == 0                       # the same document, another tenant
        assert cached("key-three", [5, 9]) == 0                     # a key from the file: a tenant too
        assert cached("key-two", [5, 10], cache_salt="s") == 0      # a salt within a tenant: apart again
        assert cached("key-two", [5, 11]) == len(document) + 1
        with pytest.raises(openai.AuthenticationError):
            cached("key-four", [5, 12])
    finally:
        stop_all(started["proc"])


def test_a_pool_too_small_for_all_preempts_and_every_answer_is_still_its_own(tiny_dirs):
    """--kv-blocks 2 (512 positions): five requests of ~240 tokens at once, whose answers cross
    into a second block, cannot all hold their caches; the newest are preempted and recomputed,
    and every answer equals the single-process model's. One that can never fit is a 400 with
    the numbers."""
    import openai
    from openai import OpenAI

    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16, "--served-model-name",
                           "tiny", "--kv-blocks", 2)
    try:
        c = OpenAI(base_url=f"{started['url']}/v1", api_key="none", max_retries=0, timeout=300)
        model = tiny_models.build("llama")
        rng = random.Random(11)
        asks = [[rng.randrange(96) for _ in range(rng.randint(236, 250))] for _ in range(5)]
        answers = {}

        def send(i):
            reply = c.completions.create(model="tiny", prompt=asks[i], max_tokens=24, temperature=0,
                                         extra_body={"return_token_ids": True})
            answers[i] = reply.choices[0].token_ids

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, ids in enumerate(asks):
            assert answers[i] == tiny_models.reference_generate(model, torch.tensor([ids]), 24), f"request {i}"
        assert metric(started, "lctk_preemptions") > 0
        with pytest.raises(openai.BadRequestError, match="holds 512"):
            c.completions.create(model="tiny", prompt=[1] * 500, max_tokens=100, temperature=0)
    finally:
        stop_all(started["proc"])
