"""`lctk serve` on a tiny random model without a tokenizer (token-id prompts), ring=2 under
torchrun: greedy tokens equal the single-process model's, cold and with a reused prefix; a
rank that dies takes the whole server down with a non-zero exit."""
import signal
import time

import psutil
import torch

import tiny_models
from helpers import start_server, stop_all

NEW = 8


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
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "run.py" in " ".join(p.cmdline())]
        ranks[-1].send_signal(signal.SIGKILL)  # a rank dies: the server must not stay up half-alive
        t0 = time.time()
        proc.wait(timeout=120)
        assert proc.returncode != 0 and time.time() - t0 < 120
    finally:
        stop_all(proc)
