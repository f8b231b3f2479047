"""The HTTP side, on rank 0 only (FastAPI on uvicorn's event loop): checks a request, puts it
on the worker's queue, and turns the tokens the engine thread hands back into an OpenAI reply,
whole or streamed as server-sent events. Every use of the tokenizer (tokenising, chat templates,
detokenising) runs on one thread of its own, never on the event loop (a long prompt must not stop
/health) and never on two threads (HF fast tokenizers are not safe from two); the engine thread
only moves token ids."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .gate import Gate, salt_of
from .protocol import (ApiError, Reply, chat_messages, completion_prompt, context_error, encode_chat, encode_text,
                       max_prompt_chars, parse_body, parse_params, usage)
from .worker import SHUTTING_DOWN, Job


class Answer:
    """The text of the tokens so far, cut at the first stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops, self.ids, self.text, self.stopped = tokenizer, stops, [], "", False

    def add(self, token: int) -> str:
        """-> the new text to show (held back while it might still become a stop string or a whole character)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self._cut()
        hold = 0 if self.stopped else max([len(s) - 1 for s in self.stops] + [0])
        if full.endswith("\ufffd"):
            hold = max(hold, 1)
        ready = full[: max(len(self.text), len(full) - hold)]
        delta, self.text = ready[len(self.text):], ready
        return delta

    def _cut(self) -> str:
        """The text of all tokens, up to the first stop string (which marks the answer stopped)."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        for stop in self.stops:
            at = full.find(stop)
            if at >= 0:
                full, self.stopped = full[:at], True
        return full

    def finish(self) -> str:
        full = self._cut()
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return delta


def make_app(worker, tokenizer, served: str, context: int, gate: Gate, metrics, vocab: int | None = None):
    app = FastAPI(title="lctk", docs_url=None, redoc_url=None)
    started = int(time.time())
    words = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lctk-tokenizer")  # the tokenizer's one thread
    max_chars = max_prompt_chars(tokenizer, context)

    def fail(err: ApiError, endpoint: str):
        metrics.requests.labels(endpoint, "error").inc()
        return refuse(err)

    def refuse(err: ApiError):
        # a body refused unread: close the connection rather than read the rest of it
        closing = {"Connection": "close"} if err.status == 413 else None
        return JSONResponse(err.body(), status_code=err.status, headers=closing)

    @app.middleware("http")
    async def gatekeeper(request: Request, call_next):
        err = gate.refusal(request.method, request.url.path, request.headers, request.scope.get("server"))
        return refuse(err) if err is not None else await call_next(request)

    @app.get("/health")
    async def health():
        ok = worker.alive()
        return JSONResponse({"status": "ok" if ok else "failed", "queue": worker.queued},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": started, "owned_by": "lctk",
                                            "max_model_len": context}]}

    def shutting_down(endpoint: str):
        metrics.requests.labels(endpoint, "refused").inc()
        return JSONResponse(ApiError(503, SHUTTING_DOWN, kind="server_error", code="shutting_down").body(),
                            status_code=503, headers={"Retry-After": "30"})

    async def in_words(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(words, fn, *args)

    async def answer(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            body = parse_body(await gate.read_body(request))
            parse_params(body, served, 1, context)  # every field's type before any tokenising
            if chat:
                ids = await in_words(encode_chat, tokenizer, chat_messages(tokenizer, body.get("messages"), max_chars,
                                                                           context))
            else:
                prompt = completion_prompt(tokenizer, body.get("prompt"), vocab, max_chars, context)
                ids = prompt if isinstance(prompt, list) else await in_words(encode_text, tokenizer, prompt)
            params = parse_params(body, served, max(1, min(context - len(ids), 4096)) if chat else 16, context)
            if len(ids) + params.max_tokens > context:
                raise context_error(context, len(ids), params.max_tokens, "messages" if chat else "prompt")
        except ApiError as err:
            return fail(err, endpoint)
        if worker.stopping.is_set():
            return shutting_down(endpoint)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        salt = salt_of(gate.tenant(request.headers.get("authorization", "")) or "", params.cache_salt)
        job = Job(ids, params.max_tokens, params.temperature, params.top_p, params.seed, salt=salt,
                  emit=lambda token, info: loop.call_soon_threadsafe(tokens.put_nowait, (token, info)))
        worker.jobs.put(job)
        reply, text = Reply(chat, served), Answer(tokenizer, params.stop)

        async def next_delta():
            token, info = await tokens.get()
            if token is None:
                return None, info
            delta = await in_words(text.add, token)
            if text.stopped:
                job.stopped.set()
            return delta, None

        if not params.stream:
            gone = threading.Event()

            async def whole():
                try:
                    while True:
                        delta, info = await next_delta()
                        if delta is None:
                            break
                finally:
                    job.stopped.set()
                if info.get("status") == 503:
                    return shutting_down(endpoint)
                if info.get("status") == 400:
                    return fail(ApiError(400, info["error"], code="context_length_exceeded"), endpoint)
                if "error" in info:
                    metrics.requests.labels(endpoint, "error").inc()
                    return JSONResponse(ApiError(500, info["error"], kind="server_error").body(), status_code=500)
                await in_words(text.finish)
                metrics.requests.labels(endpoint, "cancelled" if gone.is_set() else "ok").inc()
                finish = "stop" if text.stopped else info["finish_reason"]
                return JSONResponse(reply.whole(text.text, finish, usage(info, len(text.ids)),
                                                list(text.ids) if params.token_ids else None))

            return WholeAnswer(whole, job, gone)

        first = await next_delta()  # headers wait for the first token: a request refused meanwhile gets a 503
        if first[0] is None and first[1].get("status") == 503:
            return shutting_down(endpoint)
        if first[0] is None and first[1].get("status") == 400:
            return fail(ApiError(400, first[1]["error"], code="context_length_exceeded"), endpoint)

        async def events():
            done, pending = False, [first]
            try:
                if chat:
                    yield f"data: {json.dumps(reply.chunk(None, first=True))}\n\n"
                while True:
                    delta, info = pending.pop() if pending else await next_delta()
                    if delta is None:
                        break
                    if delta:
                        yield f"data: {json.dumps(reply.chunk(delta))}\n\n"
                if "error" in info:
                    yield f"data: {json.dumps(ApiError(500, info['error'], kind='server_error').body())}\n\n"
                else:
                    rest = await in_words(text.finish)
                    if rest:
                        yield f"data: {json.dumps(reply.chunk(rest))}\n\n"
                    finish = "stop" if text.stopped else info["finish_reason"]
                    yield f"data: {json.dumps(reply.chunk(None, finish))}\n\n"
                    if params.include_usage:
                        yield f"data: {json.dumps(reply.usage_chunk(usage(info, len(text.ids))))}\n\n"
                yield "data: [DONE]\n\n"
                done = True
                metrics.requests.labels(endpoint, "ok").inc()
            finally:
                job.stopped.set()  # a client that went away stops the ranks at the next token
                if not done:
                    metrics.requests.labels(endpoint, "cancelled").inc()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


class WholeAnswer(Response):
    """A whole (non-streamed) answer whose client still counts while it is made: a disconnect,
    read off the ASGI channel as a streamed answer's is, stops the ranks at the next token,
    since nobody is left to read it. Its status is the made answer's (200, or a 503/500)."""

    def __init__(self, make, job, gone: threading.Event):
        super().__init__()
        self.make, self.job, self.gone = make, job, gone

    async def __call__(self, scope, receive, send):
        async def listen():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.gone.set()
            self.job.stopped.set()

        listener = asyncio.ensure_future(listen())
        try:
            answer = await self.make()
        finally:
            listener.cancel()
        await answer(scope, receive, send)
