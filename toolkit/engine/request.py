"""What one request gives back, whichever front end ran it (generate, a session's ask, the
server): the tokens, their text, the prompt's length and the timings. It lives below every
front end, so sessions and the API share it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
