"""Requests and replies shaped as the OpenAI API shapes them: parameter checks that answer
400 with an OpenAI-style error object, and the JSON of completions, chat completions and
their streamed chunks."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

MAX_DEPTH = 32  # how deep a request's JSON may nest (OpenAI's own bodies nest 5 deep)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def shown(value, width: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short (a refused 1 MB string is not echoed)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object whose strings are all valid text, nested at most MAX_DEPTH deep."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # not JSON, not UTF-8, NaN, or an integer of thousands of digits
        raise ApiError(400, f"the request body is not JSON: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    stack = [(body, 1, None)]
    while stack:  # no recursion: a deep body must not reach the interpreter's limit here either
        value, depth, field = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", field)
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None:
                    stack.append((key, depth, field))
                stack.append((item, depth + 1, field or key))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "a string in the request holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                    "escapes must come in pairs)", field, "invalid_value") from None
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    token_ids: bool = False
    cache_salt: str | None = None


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {what} between {lo:g} and {hi:g}; got {shown(value)}", name,
                       "invalid_value")
    return value


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    """A JSON boolean (absent or null: false); "false" as a string is refused, not taken as true."""
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ApiError(400, f"'{where or name}' must be true or false; got {shown(value)}", where or name,
                   "invalid_type")


def parse_params(body: dict, served: str, default_max_tokens: int, context: int) -> Params:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string; got {shown(model)}", "model", "invalid_type")
    if model is not None and model != served:
        raise ApiError(404, f"The model `{shown(model)[1:-1]}` does not exist; this server serves `{served}`",
                       "model", "model_not_found")
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
        raise ApiError(400, f"'stream_options' must be an object; got {shown(options)}", "stream_options",
                       "invalid_type")
    salt = body.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ApiError(400, f"'cache_salt' must be a non-empty string; got {shown(salt)}", "cache_salt",
                       "invalid_type")
    return Params(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                  top_p=float(_number(body, "top_p", 1.0, 1e-6, 1)),
                  seed=int(_number(body, "seed", 0, -2**63, 2**63 - 1, integer=True)), stop=stop,
                  stream=_flag(body, "stream"),
                  include_usage=_flag(options, "include_usage", "stream_options.include_usage"),
                  token_ids=_flag(body, "return_token_ids"), cache_salt=salt)


def completion_prompt(tokenizer, prompt, vocab: int | None, max_chars: int, context: int) -> str | list[int]:
    """A completion prompt, checked before any tokenising: a string (at most max_chars characters), a list of
    one string, token ids inside the vocabulary, or a list of one list of ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        if len(prompt) > max_chars:
            raise chars_error(context, len(prompt), max_chars, "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        wrong = next((t for t in prompt if vocab is not None and not 0 <= t < vocab), None)
        if wrong is not None:
            raise ApiError(400, f"token id {shown(wrong)} is outside the vocabulary (0 to {vocab - 1})", "prompt",
                           "invalid_value")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def chat_messages(tokenizer, messages, max_chars: int, context: int) -> list[dict]:
    """The messages as the chat template takes them, checked before any templating."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    clean, chars = [], 0
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a 'role' and a 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # parts: keep the text ones
            parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p.get("text"), str) for p in parts):
                raise ApiError(400, "a message's content parts must be {\"type\": \"text\", \"text\": STRING}",
                               "messages", "invalid_type")
            content = "".join(p["text"] for p in parts)
        if not isinstance(content, str):
            raise ApiError(400, "a message's 'content' must be text", "messages", "invalid_type")
        chars += len(content) + len(m["role"])
        if chars > max_chars:
            raise chars_error(context, chars, max_chars, "messages")
        clean.append({"role": m["role"], "content": content})
    return clean


def encode_chat(tokenizer, clean: list[dict]) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    except Exception as err:  # noqa: BLE001 - the template's own refusal (a role it does not know, say)
        raise ApiError(400, f"the chat template refused the messages: {str(err).splitlines()[0][:200]}",
                       "messages") from None


def chars_error(context: int, chars: int, max_chars: int, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {context} tokens. However, your {param} has "
                         f"{chars} characters, more than {context} tokens can hold ({max_chars}: the context times "
                         f"the longest token's characters; --rope-scaling raises the context). Please reduce the "
                         f"length of the {param}.", param, "context_length_exceeded")


def max_prompt_chars(tokenizer, context: int) -> int:
    """The most characters a prompt of `context` tokens can hold: no token stands for more characters than its
    vocabulary entry spells (byte-level entries spell each byte as one character)."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    return context * max([len(entry) for entry in vocab] + [1])


def context_error(context: int, prompt: int, completion: int, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt + completion} tokens ({prompt} in the {param}, {completion} in the completion). "
                         f"Please reduce the length of the {param} or completion.", param, "context_length_exceeded")


def usage(info: dict, completion_tokens: int) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": completion_tokens,
            "total_tokens": info["prompt_tokens"] + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]},
            **({"sp_degree": info["sp_degree"], "sp_ranks": info["sp_ranks"]} if info.get("sp_degree") else {})}


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
