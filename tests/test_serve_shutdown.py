"""Work ends with its owner: a whole (non-streamed) answer stops generating when its client
leaves; on SIGTERM the waiting requests get a 503 with Retry-After at once, the running one
ends within --shutdown-timeout with what it has, and every rank stops. One tiny-model server
under torchrun for the module; the SIGTERM test runs last and ends it."""
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import start_server, stop_all

LONG = {"model": "tiny", "prompt": [1, 2, 3, 4, 5], "max_tokens": 4000, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_dirs):
    started = start_server("--model", tiny_dirs("llama"), "--ring", 2, "--chunk-size", 16, "--served-model-name",
                           "tiny", "--shutdown-timeout", 2, "--max-running", 1)  # one runs, the others wait
    yield started
    stop_all(started["proc"])


def post(url: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


def generated(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("lctk_generated_tokens_total"))


def test_a_whole_answer_stops_when_its_client_leaves(server):
    url, before = server["url"], generated(server["url"])
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.5)
    status, _, reply = post(url, {**LONG, "max_tokens": 2})  # runs after the first has ended
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert generated(url) - before - 2 < 3000, "the request kept generating after its client left"


def test_sigterm_refuses_the_waiting_with_503_and_ends_the_running_one(server):
    url, proc, results = server["url"], server["proc"], {}

    def ask(name, body):
        results[name] = post(url, body)

    running = threading.Thread(target=ask, args=("running", LONG))
    running.start()
    time.sleep(1.0)
    waiting = [threading.Thread(target=ask, args=(f"waiting{i}", {**LONG, "max_tokens": 5})) for i in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on; rank 0 stops the server
    for thread in [running, *waiting]:
        thread.join(60)
    for i in range(2):
        status, headers, reply = results[f"waiting{i}"]
        assert status == 503 and headers.get("retry-after") and reply["error"]["code"] == "shutting_down", reply
    status, _, reply = results["running"]
    assert status == 200 and 0 < reply["usage"]["completion_tokens"] < LONG["max_tokens"], reply
    _, err = proc.communicate(timeout=60)
    assert "lctk: server stopped" in err and time.time() - t0 < 30, err[-2000:]
