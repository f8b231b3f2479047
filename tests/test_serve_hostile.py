"""`lctk serve` against hostile and careless clients, on a tiny random model with a tiny word-level
tokenizer and chat template (ring=2 under torchrun, no API key): a 50 MB body is refused without
being read while /health keeps answering; a prompt too long in characters is refused before it is
tokenised; every malformed body (random JSON included) is a 4xx in OpenAI's shape, never a 500;
Host and Content-Type guard a server without a key; cache_salt keeps prefixes apart. One server
for the module."""
import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import start_server, stop_all

WORDS = [f"w{i}" for i in range(95)]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
CONTEXT = 4096  # the tiny llama's
LIMIT = CONTEXT * 16 + (1 << 20)  # the default --max-request-bytes


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "tiny"
    shutil.copytree(tiny_dirs("llama"), folder)
    save_tokenizer(folder)
    started = start_server("--model", folder, "--ring", 2, "--chunk-size", 16, "--served-model-name", "tiny")
    try:
        yield started
    finally:
        stop_all(started["proc"])


def post(server, path, body, headers=None, timeout=120):
    """(status, the reply's JSON, or its text when it streamed) of a POST; body: bytes, or an object as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read()
            return reply.status, (text.decode() if text.startswith(b"data:") else json.loads(text))
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_openai_error(status, reply, code=400):
    assert status == code, (status, reply)
    assert set(reply) == {"error"} and isinstance(reply["error"]["message"], str)
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def health_s(server) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(server["url"] + "/health", timeout=30) as reply:
        assert reply.status == 200
    return time.perf_counter() - t0


def send_big_body(server, chunked: bool, outcome: dict, size=50 * 10**6):
    """POST `size` bytes of one JSON prompt string, 64 KiB at a time; record the answer (or the reset)."""
    conn = http.client.HTTPConnection(server["url"].split("//")[1], timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
        conn.endheaders()
        frame = (lambda data: b"%x\r\n%s\r\n" % (len(data), data)) if chunked else (lambda data: data)
        piece, sent = b"w1 " * (1 << 16), 0
        try:
            conn.send(frame(b'{"prompt": "'))
            while sent < size:
                conn.send(frame(piece))
                sent += len(piece)
        except OSError:
            pass  # the server answered and closed: the rest is never read
        outcome["sent"] = sent
        reply = conn.getresponse()
        raw = reply.read()
        outcome["status"], outcome["body"] = reply.status, json.loads(raw) if raw.startswith(b"{") else raw
    except OSError as err:
        outcome.setdefault("error", repr(err))
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_refused_unread_while_health_answers(server, chunked):
    outcome, latencies = {}, []
    sender = threading.Thread(target=send_big_body, args=(server, chunked, outcome))
    sender.start()
    while sender.is_alive() and len(latencies) < 40:
        latencies.append(health_s(server))
        time.sleep(0.05)
    sender.join(timeout=120)
    latencies.append(health_s(server))
    assert max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s during the refusal"
    if "status" in outcome:  # else the server closed before the client read its answer: refused either way
        assert_openai_error(outcome["status"], outcome["body"], 413)
        assert "--max-request-bytes" in outcome["body"]["error"]["message"] and str(LIMIT) in \
            outcome["body"]["error"]["message"]
    assert "status" in outcome or "error" in outcome
    assert outcome.get("sent", 0) < 50 * 10**6  # the connection was closed long before the body was all sent


def test_a_body_just_under_the_limit_is_read(server):
    ids = [1] * 200
    pad = " " * (LIMIT - len(json.dumps({"prompt": ids, "max_tokens": 2})) - 10)
    status, reply = post(server, "/v1/completions", ("{" + pad + json.dumps({"prompt": ids, "max_tokens": 2})[1:])
                         .encode())
    assert status == 200 and reply["usage"]["prompt_tokens"] == 200


def test_a_prompt_too_long_in_characters_is_refused_before_tokenising(server):
    status, reply = post(server, "/v1/completions", {"prompt": "w1 " * 10000, "max_tokens": 2})
    assert_openai_error(status, reply)
    assert reply["error"]["code"] == "context_length_exceeded" and "characters" in reply["error"]["message"]
    assert "--rope-scaling" in reply["error"]["message"]
    status, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w2 " * 10000}]})
    assert_openai_error(status, reply)
    assert reply["error"]["code"] == "context_length_exceeded"


def test_text_and_chat_prompts_are_answered(server):
    status, reply = post(server, "/v1/completions", {"prompt": "w1 w2 w3", "max_tokens": 3, "temperature": 0})
    assert status == 200 and reply["usage"]["prompt_tokens"] == 3
    status, reply = post(server, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "w4 w5"}]}], "max_tokens": 2, "stream": False})
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


MALFORMED = {
    "surrogate": b'{"prompt": "w1 \\ud800 w2", "max_tokens": 2}',
    "surrogate in a key": b'{"\\udfff": 1, "prompt": [1, 2]}',
    "deep nesting": b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "nesting under the parser's limit": b'{"stop": ' + b"[" * 200 + b"]" * 200 + b"}",
    "not JSON": b"{prompt: w1}",
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
    "a list": b"[1, 2, 3]",
    "a string": b'"w1 w2"',
    "null": b"null",
    "empty": b"",
    "NaN": b'{"prompt": [1], "temperature": NaN}',
    "a huge integer": b'{"prompt": [1], "seed": ' + b"9" * 5000 + b"}",
    "a text part that is a number": json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}).encode(),
    "a part without text": json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}]}).encode(),
    "token id past the vocabulary": b'{"prompt": [1, 2, 96]}',
    "negative token id": b'{"prompt": [-1, 2]}',
    "a token id of 2**70": b'{"prompt": [1180591620717411303424]}',
    "stream as a string": b'{"prompt": [1], "stream": "false"}',
    "stream_options a string": b'{"prompt": [1], "stream_options": "x"}',
    "model a number": b'{"prompt": [1], "model": 7}',
    "cache_salt a number": b'{"prompt": [1], "cache_salt": 7}',
    "return_token_ids a string": b'{"prompt": [1], "return_token_ids": "yes"}',
    "messages a dict": b'{"messages": {"role": "user", "content": "w1"}}',
    "content an object": b'{"messages": [{"role": "user", "content": {"text": "w1"}}]}',
    "max_tokens a float": b'{"prompt": [1], "max_tokens": 2.5}',
    "stop a number": b'{"prompt": [1], "stop": 5}',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_every_malformed_body_is_a_400_in_openai_shape(server, name):
    path = "/v1/chat/completions" if b"messages" in MALFORMED[name] else "/v1/completions"
    status, reply = post(server, path, MALFORMED[name])
    assert_openai_error(status, reply)


def test_host_and_content_type_guard_a_server_without_a_key(server):
    ok = {"prompt": [1, 2], "max_tokens": 1}
    status, reply = post(server, "/v1/completions", ok, {"Host": f"attacker.example:{server['url'].split(':')[-1]}"})
    assert_openai_error(status, reply, 403)
    assert "--api-key" in reply["error"]["message"]
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, reply = post(server, "/v1/completions", ok, {"Content-Type": kind})
        assert_openai_error(status, reply, 415)
    port = server["url"].split(":")[-1]
    status, reply = post(server, "/v1/completions", ok, {"Host": f"localhost:{port}"})
    assert status == 200


def test_cache_salt_keeps_prefixes_apart(server):
    document = [50] + [(i * 7) % 95 + 1 for i in range(60)]  # no other test's prompt starts with 50

    def cached(salt, question):
        body = {"prompt": document + question, "max_tokens": 1, **({"cache_salt": salt} if salt else {})}
        status, reply = post(server, "/v1/completions", body)
        assert status == 200, reply
        return reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("alice", [3, 4]) == 0
    assert cached("bob", [3, 5]) == 0            # another salt: nothing shared
    assert cached(None, [3, 6]) == 0             # no salt: nothing shared with the salted ones
    assert cached("alice", [3, 7]) == len(document) + 1
    assert cached(None, [3, 8]) == len(document) + 1


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)
FIELDS = st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                          "stream_options", "n", "model", "cache_salt", "return_token_ids"])
BODIES = JSON | st.dictionaries(FIELDS, JSON, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, chat=st.booleans())
def test_random_json_is_never_a_500(server, body, chat):
    limit = body.get("max_tokens") if isinstance(body, dict) else None
    if isinstance(body, dict) and (limit is None or isinstance(limit, int) and limit > 2):
        body["max_tokens"] = 1  # keep any valid example short (a chat's default is the rest of the context)
    status, reply = post(server, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert status < 500, (status, reply)
    if status >= 400:
        assert_openai_error(status, reply, status)


def test_the_server_still_answers_afterwards(server):
    assert health_s(server) < 1.0
    status, reply = post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
