"""Long-document summarisation: one pass or map-reduce over sections that follow the
document, a section cache for --resume. Nothing here imports torch at module level."""
from .mapreduce import (DEFAULT_INSTRUCTION, DEFAULT_REPETITION_PENALTY, Progress, SummaryResult,
                        encode_prompt, summarize_text)
from .sections import Section, split_sections

__all__ = ["DEFAULT_INSTRUCTION", "DEFAULT_REPETITION_PENALTY", "Progress", "Section", "SummaryResult",
           "encode_prompt", "split_sections", "summarize_text"]
