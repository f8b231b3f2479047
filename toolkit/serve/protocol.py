"""Requests and replies shaped as the OpenAI API shapes them: parameter checks that answer
400 with an OpenAI-style error object, and the JSON of completions, chat completions and
their streamed chunks."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {what} between {lo:g} and {hi:g}; got {value!r}", name,
                       "invalid_value")
    return value


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    """A JSON boolean (absent or null: false); "false" as a string is refused, not taken as true."""
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ApiError(400, f"'{where or name}' must be true or false; got {value!r}", where or name, "invalid_type")


def parse_params(body: dict, served: str, default_max_tokens: int, context: int) -> Params:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served}`", "model",
                       "model_not_found")
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "only n=1 is supported: requests run one at a time over all ranks", "n", "invalid_value")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": limit}, "max_tokens", default_max_tokens, 1, context, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"'stream_options' must be an object; got {options!r}", "stream_options", "invalid_type")
    return Params(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                  top_p=float(_number(body, "top_p", 1.0, 1e-6, 1)),
                  seed=int(_number(body, "seed", 0, -2**63, 2**63 - 1, integer=True)), stop=stop,
                  stream=_flag(body, "stream"), include_usage=_flag(options, "include_usage", "stream_options.include_usage"))


def completion_ids(tokenizer, prompt) -> list[int]:
    """A completion prompt: a string, a list of one string, token ids, or a list of one list of ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        return list(tokenizer(prompt).input_ids)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def chat_ids(tokenizer, messages) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a 'role' and a 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, "a message's 'content' must be text", "messages")
        clean.append({"role": m["role"], "content": content})
    return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=False))


def context_error(context: int, prompt: int, completion: int, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt + completion} tokens ({prompt} in the {param}, {completion} in the completion). "
                         f"Please reduce the length of the {param} or completion.", param, "context_length_exceeded")


def usage(info: dict, completion_tokens: int) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": completion_tokens,
            "total_tokens": info["prompt_tokens"] + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}


class Reply:
    """The JSON objects of one answer, completion or chat, whole or as chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, use: dict, token_ids: list[int] | None = None) -> dict:
        """token_ids (asked for with "return_token_ids": true, as vLLM does) ride along in the choice."""
        extra = {"token_ids": token_ids} if token_ids is not None else {}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None, **extra}
            return {**self._head("chat.completion"), "choices": [choice], "usage": use}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, **extra}
        return {**self._head("text_completion"), "choices": [choice], "usage": use}

    def chunk(self, delta: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            part = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": part, "finish_reason": finish, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": use}
