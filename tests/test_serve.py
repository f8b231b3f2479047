"""`lctk serve` started as users start it (`torchrun --nproc_per_node 2`, ring=2 for the demo
model's 9 heads), driven by the real `openai` client: streamed text equals the whole reply
equals transformers' greedy tokens; chat; prefix reuse with the cold answer; OpenAI-style
errors; the API key; 16 concurrent clients; a client leaving mid-stream; SIGTERM stops every
rank (memory over 1,000 requests: test_serve_tiny.py). One server for the module."""
import json
import signal
import threading
import time
import urllib.request

import psutil
import pytest
import torch

from helpers import PROMPT, demo_folder, hf_greedy, start_server, stop_all

KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    started = start_server("--model", demo_folder(), "--served-model-name", "demo", "--api-key", KEY,
                           "--max-cached-tokens", 4096)
    yield started
    stop_all(started["proc"])


def client(server, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_folder())


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"{server['url']}/metrics") as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["demo"]
    with urllib.request.urlopen(f"{server['url']}/health") as reply:
        assert json.loads(reply.read())["status"] == "ok"


def test_streamed_equals_whole_equals_greedy_generate(server, tokenizer):
    c = client(server)
    whole = c.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in
                       c.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    expected = tokenizer.decode(list(hf_greedy(PROMPT, 12)), skip_special_tokens=True)
    assert whole.choices[0].text == streamed == expected
    assert whole.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids) and whole.usage.completion_tokens == 12


def test_chat_streamed_equals_whole(server, tokenizer):
    c = client(server)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = c.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == streamed
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].choices == []


def _cold(ids: list[int], new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_folder(), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_a_shared_prefix_is_reused_and_the_answer_is_the_cold_one(server, tokenizer):
    from toolkit.summarize.synthetic import station_logbook

    c = client(server)
    document = station_logbook(days=12)
    asks = [[{"role": "user", "content": f"{document}\n\n{q}"}] for q in ("Who repaired the generator?",
                                                                         "How late was the supply ship?")]
    first = c.chat.completions.create(model="demo", messages=asks[0], max_tokens=10, temperature=0)
    second = c.chat.completions.create(model="demo", messages=asks[1], max_tokens=10, temperature=0)
    ids = tokenizer.apply_chat_template(asks[1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert second.usage.prompt_tokens_details.cached_tokens > 0.9 * len(tokenizer(document).input_ids)
    assert first.usage.prompt_tokens_details.cached_tokens < 50
    assert second.choices[0].message.content == tokenizer.decode(_cold(list(ids), 10), skip_special_tokens=True)


def test_errors_are_openai_shaped(server):
    import openai

    c = client(server)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192 tokens. However, you "
                                                     "requested"):
        c.completions.create(model="demo", prompt="word " * 9000, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    for bad in (dict(temperature=3), dict(top_p=0), dict(n=2), dict(max_tokens=0), dict(stop=[""])):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="demo", prompt="x", **{"max_tokens": 4, **bad})
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            client(server, key=key or "none").models.list()
    request = urllib.request.Request(f"{server['url']}/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 401 and "error" in json.loads(err.value.read())
    assert c.completions.create(model="demo", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_stop_strings_cut_the_answer(server, tokenizer):
    c = client(server)
    full = c.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full.strip().split()[1]
    cut = c.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_16_concurrent_clients_are_all_answered_right(server):
    c = client(server)
    prompts = [f"Count from {i}: {i}, {i + 1}," for i in range(16)]
    alone = [c.completions.create(model="demo", prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts[:3]]
    got = [None] * 16

    def one(i):
        got[i] = client(server).completions.create(model="demo", prompt=prompts[i], max_tokens=4,
                                                   temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(g is not None for g in got) and got[:3] == alone


def test_a_client_leaving_mid_stream_stops_the_generation(server):
    before = metric(server, "lctk_generated_tokens_total")
    stream = client(server).completions.create(model="demo", prompt=PROMPT, max_tokens=400, temperature=0,
                                               stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    time.sleep(3)
    answer = client(server).completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    assert answer.choices[0].text
    assert metric(server, "lctk_generated_tokens_total") - before < 100  # not the 400 asked for
    assert metric(server, "lctk_requests_total") > 0


def test_sigterm_stops_every_rank_cleanly(server):
    """torchrun passes SIGTERM to the ranks: rank 0 stops the HTTP server and tells the others, and
    all leave their loop together (torchrun itself then exits non-zero, as it does for any signal)."""
    proc = server["proc"]
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "run.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "lctk: server stopped" in err, err[-3000:]
    assert "Traceback" not in err.split("lctk: serving")[-1].split("lctk: server stopped")[0]  # ranks: no errors
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
