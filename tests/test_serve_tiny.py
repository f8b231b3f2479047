"""`lctk serve` on a tiny random model without a tokenizer (token-id prompts), ring=2 under
torchrun, one server for the module (API keys, a pool of 4 blocks): greedy tokens equal the
single-process model's, cold, with a reused prefix, and for requests arriving together at random
moments; questions sent at once about one document prefill it once; a client that leaves
mid-stream frees its blocks; each API key is a tenant that reuses only its own cached prefixes;
a pool too small for all preempts and still gives every answer; 1,000 mixed requests leave the
memory where 100 did; a rank that dies takes the whole server down with a non-zero exit (last)."""
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
KEY = "key-one"
BLOCKS = 4  # of 256 positions: room for a few requests at once, so some must wait or be preempted
CACHED_TOKENS = 2048  # the prefix cache's budget (--max-cached-tokens)
MIN_SP_TOKENS = 64  # elastic placement (on by default): shorter prompts on one rank, longer ones on both


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text("# one key a line\nkey-three\n\n")
    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16, "--served-model-name",
                           "tiny", "--api-key", KEY, "--api-key", "key-two", "--api-keys-file", keys_file,
                           "--kv-blocks", BLOCKS, "--max-cached-tokens", CACHED_TOKENS, "--min-sp-tokens", MIN_SP_TOKENS)
    yield started
    stop_all(started["proc"])


@pytest.fixture(scope="module")
def model():
    return tiny_models.build("llama")


def client(server, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=300)


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"{server['url']}/metrics") as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def token_ids(c, ids, new, **extra) -> list[int]:
    reply = c.completions.create(model="tiny", prompt=ids, max_tokens=new, temperature=0,
                                 extra_body={"return_token_ids": True, **extra})
    return reply.choices[0].token_ids


def random_ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))]


def at_once(calls) -> dict:
    """Run each call in a thread of its own, all at once -> {i: what call i returned}."""
    out = {}
    threads = [threading.Thread(target=lambda i=i, f=f: out.__setitem__(i, f())) for i, f in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def idle(server) -> bool:
    deadline = time.time() + 60
    while (metric(server, "lctk_requests_running") or metric(server, "lctk_kv_blocks_used")) and \
            time.time() < deadline:
        time.sleep(0.2)
    return metric(server, "lctk_requests_running") == 0 and metric(server, "lctk_kv_blocks_used") == 0 and \
        metric(server, "lctk_busy_sp_ranks") == 0


def test_token_prompts_cold_and_cached_equal_the_single_process_model(server, model):
    c = client(server)
    document = random_ids(70, 1)
    for question in ([5, 6, 7], [9, 10, 11, 12]):
        reply = c.completions.create(model="tiny", prompt=document + question, max_tokens=NEW, temperature=0,
                                     extra_body={"return_token_ids": True})
        assert reply.choices[0].token_ids == tiny_models.reference_generate(model, torch.tensor([document + question]),
                                                                            NEW)
    assert reply.usage.prompt_tokens_details.cached_tokens == len(document)  # the second question's
    assert reply.usage.model_extra["sp_degree"] == 2 and reply.usage.model_extra["sp_ranks"] == [0, 1]
    degrees, ranks = metric(server, "lctk_request_sp_degree_count"), metric(server, "lctk_request_sp_degree_sum")
    # arrivals at random moments, of random lengths (fixed seeds): each answer is its solo run's
    rng = random.Random(5)
    asks = [([rng.randrange(96) for _ in range(rng.randint(1, 60))], rng.randint(1, 12)) for _ in range(8)]
    delays = [rng.random() * 0.5 for _ in asks]

    def send(i):
        time.sleep(delays[i])
        return token_ids(c, *asks[i])

    answers = at_once([lambda i=i: send(i) for i in range(len(asks))])
    for i, (ids, new) in enumerate(asks):
        assert answers[i] == tiny_models.reference_generate(model, torch.tensor([ids]), new), f"request {i}"
    assert metric(server, "lctk_request_sp_degree_count") - degrees == len(asks)
    assert metric(server, "lctk_request_sp_degree_sum") - ranks == len(asks)  # one rank each: shorter than 64
    short = c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert short.usage.model_extra["sp_degree"] == 1 and len(short.usage.model_extra["sp_ranks"]) == 1


def test_questions_sent_at_once_about_one_document_prefill_it_once(server, model):
    """The first question's prompt is still prefilling when the others arrive: they wait for it and
    read the document by reference (each reads all of it), and every answer is its solo run's."""
    c = client(server)
    document = random_ids(300, 7)  # 19 chunks of 16: many steps of prefill
    questions = [[40 + i, 3, 4] for i in range(4)]
    hits, cached = metric(server, "lctk_prefix_cache_hits_total"), metric(server, "lctk_cached_tokens_total")
    answers = at_once([lambda q=q: token_ids(c, document + q, 4, cache_salt="doc") for q in questions])
    for i, q in enumerate(questions):
        assert answers[i] == tiny_models.reference_generate(model, torch.tensor([document + q]), 4), f"question {i}"
    assert metric(server, "lctk_prefix_cache_hits_total") - hits == len(questions) - 1
    assert metric(server, "lctk_cached_tokens_total") - cached == (len(questions) - 1) * len(document)


def test_answers_that_repeat_are_guessed_and_checked_and_equal_the_single_process_model(server, model):
    """The server speculates (--speculate auto): an answer that loops is guessed from its own tokens,
    checked in the decode step of the rank it was placed on, and is still the single-process model's
    greedy answer."""
    guessed, kept = metric(server, "lctk_guesses_checked_total"), metric(server, "lctk_guesses_kept_total")
    c = client(server)
    for seed in (3, 4):
        ids = random_ids(12, seed) * 3
        assert token_ids(c, ids, 32) == tiny_models.reference_generate(model, torch.tensor([ids]), 32), seed
    assert metric(server, "lctk_guesses_checked_total") > guessed and metric(server, "lctk_guesses_kept_total") > kept
    assert metric(server, "lctk_tokens_per_decode_step") > 1.0


def test_a_client_leaving_mid_stream_frees_its_blocks(server):
    stream = client(server).completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=400, temperature=0,
                                               stream=True)
    next(iter(stream))
    stream.close()
    assert idle(server)


def test_each_api_key_is_a_tenant_that_sees_only_its_own_cached_prefixes(server):
    import openai

    def cached(key, question, **extra):
        reply = client(server, key).completions.create(model="tiny", prompt=document + question, max_tokens=2,
                                                       temperature=0, extra_body=extra or None)
        return reply.usage.prompt_tokens_details.cached_tokens

    document = random_ids(50, 2)
    assert cached(KEY, [5, 6]) == 0
    assert cached(KEY, [5, 7]) == len(document) + 1             # its own prefix
    assert cached("key-two", [5, 8]) == 0                       # the same document, another tenant
    assert cached("key-three", [5, 9]) == 0                     # a key from the file: a tenant too
    assert cached("key-two", [5, 10], cache_salt="s") == 0      # a salt within a tenant: apart again
    assert cached("key-two", [5, 11]) == len(document) + 1
    with pytest.raises(openai.AuthenticationError):
        cached("key-four", [5, 12])


def test_a_pool_too_small_for_all_preempts_and_every_answer_is_still_its_own(server, model):
    """Five requests of ~240 tokens at once, whose answers cross into a second block, need 10 of the
    4 blocks: the newest are preempted and recomputed, and every answer equals the single-process
    model's. One that can never fit is a 400 with the numbers."""
    import openai

    c = client(server)
    rng = random.Random(11)
    asks = [[rng.randrange(96) for _ in range(rng.randint(236, 250))] for _ in range(5)]
    preempted = metric(server, "lctk_preemptions")
    answers = at_once([lambda ids=ids: token_ids(c, ids, 24) for ids in asks])
    for i, ids in enumerate(asks):
        assert answers[i] == tiny_models.reference_generate(model, torch.tensor([ids]), 24), f"request {i}"
    assert metric(server, "lctk_preemptions") > preempted
    with pytest.raises(openai.BadRequestError, match=f"holds {BLOCKS * 256}"):
        c.completions.create(model="tiny", prompt=[1] * 1000, max_tokens=100, temperature=0)


def ranks(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server["proc"].pid).children(recursive=True) if "run.py" in " ".join(p.cmdline())]


def test_1000_mixed_requests_leave_the_memory_where_100_did(server, model):
    """Mixed as a server sees them: prompts of 1 to 120 tokens, a third of them questions about one of
    three documents, streamed or not, some clients leaving mid-stream, some salted; eight clients
    at once. The ranks' RSS after the last is within 5% of after the 100th, and every KV block is
    free (what stays is the prefix cache, bounded by --max-cached-tokens)."""
    c = client(server)
    documents = [random_ids(80, 20 + d) for d in range(3)]

    def one(i: int) -> None:
        rng = random.Random(1000 + i)
        ids = [rng.randrange(96) for _ in range(rng.randint(1, 40))]
        if i % 3 == 0:
            ids = documents[i % 9 // 3] + ids
        extra = {"cache_salt": f"s{i % 4}"} if i % 5 == 0 else {}
        if i % 7 == 0:  # a client that leaves after its first token
            stream = c.completions.create(model="tiny", prompt=ids, max_tokens=50, temperature=0, stream=True,
                                          extra_body=extra or None)
            next(iter(stream))
            stream.close()
        else:
            c.completions.create(model="tiny", prompt=ids, max_tokens=rng.randint(1, 6), temperature=0,
                                 stream=i % 2 == 0, extra_body=extra or None)

    def batch(start: int, stop: int) -> None:
        lanes = at_once([lambda lane=lane: [one(i) for i in range(start + lane, stop, 8)] for lane in range(8)])
        assert len(lanes) == 8

    batch(0, 100)
    assert idle(server)
    at_100 = sum(p.memory_info().rss for p in ranks(server))
    batch(100, 1000)
    assert idle(server)
    at_1000 = sum(p.memory_info().rss for p in ranks(server))
    assert at_1000 <= 1.05 * at_100, f"{at_100 / 2**20:.0f} MiB after 100, {at_1000 / 2**20:.0f} MiB after 1000"
    cfg = model.config  # idle: the KV bytes left are the prefix cache's, within its 2048 positions (x2: room)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    position_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, fp32
    held = metric(server, "lctk_kv_bytes")
    assert 0 < held <= 2 * CACHED_TOKENS * position_bytes, f"{held} bytes of KV held while idle"


def test_a_rank_that_dies_takes_the_server_down(server):
    proc = server["proc"]
    ranks(server)[-1].send_signal(signal.SIGKILL)  # the server must not stay up half-alive
    t0 = time.time()
    proc.wait(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 120
