"""The HTTP side, on rank 0 only (FastAPI on uvicorn's event loop): checks a request, puts it
on the worker's queue, and turns the tokens the engine thread hands back into an OpenAI reply,
whole or streamed as server-sent events. Tokenising and detokenising happen here, on the
event loop's one thread; the engine thread only moves token ids."""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .protocol import ApiError, Reply, chat_ids, completion_ids, context_error, parse_params, usage
from .worker import Job


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


def make_app(worker, tokenizer, served: str, context: int, api_key: str | None, metrics):
    app = FastAPI(title="lctk", docs_url=None, redoc_url=None)
    started = int(time.time())

    def fail(err: ApiError, endpoint: str):
        metrics.requests.labels(endpoint, "error").inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):  # in constant time: no timing oracle
                err = ApiError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY'", None,
                               "invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

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

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def answer(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            body = await body_of(request)
            ids = chat_ids(tokenizer, body.get("messages")) if chat else completion_ids(tokenizer, body.get("prompt"))
            params = parse_params(body, served, max(1, min(context - len(ids), 4096)) if chat else 16, context)
            if len(ids) + params.max_tokens > context:
                raise context_error(context, len(ids), params.max_tokens, "messages" if chat else "prompt")
        except ApiError as err:
            return fail(err, endpoint)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        job = Job(ids, params.max_tokens, params.temperature, params.top_p, params.seed,
                  emit=lambda token, info: loop.call_soon_threadsafe(tokens.put_nowait, (token, info)))
        worker.jobs.put(job)
        reply, text = Reply(chat, served), Answer(tokenizer, params.stop)

        async def next_delta():
            token, info = await tokens.get()
            if token is None:
                return None, info
            delta = text.add(token)
            if text.stopped:
                job.stopped.set()
            return delta, None

        if not params.stream:
            try:
                while True:
                    delta, info = await next_delta()
                    if delta is None:
                        break
            finally:
                job.stopped.set()
            if "error" in info:
                metrics.requests.labels(endpoint, "error").inc()
                return JSONResponse(ApiError(500, info["error"], kind="server_error").body(), status_code=500)
            text.finish()
            metrics.requests.labels(endpoint, "ok").inc()
            finish = "stop" if text.stopped else info["finish_reason"]
            return reply.whole(text.text, finish, usage(info, len(text.ids)),
                               list(text.ids) if body.get("return_token_ids") else None)

        async def events():
            done = False
            try:
                if chat:
                    yield f"data: {json.dumps(reply.chunk(None, first=True))}\n\n"
                while True:
                    delta, info = await next_delta()
                    if delta is None:
                        break
                    if delta:
                        yield f"data: {json.dumps(reply.chunk(delta))}\n\n"
                if "error" in info:
                    yield f"data: {json.dumps(ApiError(500, info['error'], kind='server_error').body())}\n\n"
                else:
                    rest = text.finish()
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
