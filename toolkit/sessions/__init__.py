"""Document sessions: prefill a document once, ask it many questions, keep its sharded KV
cache on disk and load it back on any layout."""
from .session import DocumentSession
from .restore import check_cache, load_session
from .store import CacheError, save_session

__all__ = ["CacheError", "DocumentSession", "check_cache", "load_session", "save_session"]
