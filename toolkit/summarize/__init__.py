"""Long-document summarisation: documents in, one pass or map-reduce over sections, a
section cache for --resume. Nothing here imports torch at module level."""
from .documents import SUPPORTED_SUFFIXES, DocumentError, decode_text, read_document, write_atomic
from .mapreduce import (DEFAULT_INSTRUCTION, DEFAULT_REPETITION_PENALTY, Progress, SummaryResult,
                        encode_prompt, split_sections, summarize_text)

__all__ = ["SUPPORTED_SUFFIXES", "DocumentError", "decode_text", "read_document", "write_atomic", "DEFAULT_INSTRUCTION",
           "DEFAULT_REPETITION_PENALTY", "Progress", "SummaryResult", "encode_prompt", "split_sections",
           "summarize_text"]
