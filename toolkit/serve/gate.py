"""Who may ask, and how much they may send, checked before a request's body is read: the API keys
(each its own tenant), and without a key the Host and Content-Type rules that keep a web page in
the user's browser from driving a server on localhost (DNS rebinding, cross-site simple POSTs)."""
from __future__ import annotations

import hashlib
import hmac

from starlette.requests import ClientDisconnect

from .protocol import ApiError

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
MIB = 1 << 20


def default_max_request_bytes(context: int) -> int:
    """A body that can carry a full context: 16 bytes a token (an id and its separator, or text escaped as JSON)
    and 1 MiB for the rest of the request."""
    return context * 16 + MIB


def read_keys(keys, keys_file) -> list[str]:
    """The keys given with --api-key and those of --api-keys-file (one a line; blank lines and # comments skipped)."""
    found = [k for k in keys or () if k]
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            found += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    bad = [k for k in found if any(c.isspace() for c in k)]
    if bad:
        raise ValueError("an API key may not hold white space (it travels as 'Authorization: Bearer KEY')")
    return list(dict.fromkeys(found))


class Gate:
    def __init__(self, keys: list[str], host: str, port: int, max_request_bytes: int):
        self.keys = [f"Bearer {k}".encode() for k in keys]
        self.max_request_bytes = max_request_bytes
        bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.port, self.hosts = port, {f"{name}:{port}" for name in (*LOCAL_NAMES, bound)}

    @property
    def open(self) -> bool:
        return not self.keys

    def tenant(self, authorization: str) -> str | None:
        """The tenant of a request ("" when the server has no keys), or None when its key is wrong. Every key
        is compared, each in constant time, so the time taken says nothing about which one nearly matched."""
        if not self.keys:
            return ""
        given = authorization.encode("utf-8", "replace")
        matched = [hmac.compare_digest(given, key) for key in self.keys]
        return f"key{matched.index(True)}" if any(matched) else None

    def refusal(self, method: str, path: str, headers, local) -> ApiError | None:
        """Why a request is refused before it is read (None: it may go on)."""
        if not self.keys:
            host = headers.get("host", "")
            own = {f"{local[0]}:{self.port}", f"[{local[0]}]:{self.port}"} if local else set()
            if host.lower() not in self.hosts | own:
                return ApiError(403, f"Host {host[:80]!r} is not this server's address: without an API key only "
                                     f"localhost, 127.0.0.1 or the bound address with port {self.port} are answered "
                                     "(a guard against DNS rebinding); start the server with --api-key to take "
                                     "other names", None, "host_not_allowed")
        elif path.startswith("/v1") and self.tenant(headers.get("authorization", "")) is None:
            return ApiError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY'", None,
                            "invalid_api_key")
        if not self.keys and method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the request's Content-Type is {kind or 'missing'!r}, not 'application/json' "
                                     "(without an API key other types are refused: a web page can send them "
                                     "cross-site)", None, "unsupported_media_type")
        return None

    async def read_body(self, request) -> bytes:
        """The body, refused from its Content-Length before a byte is read, else as soon as the bytes streamed
        in pass the limit: a 50 MB body is never held whole."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"the Content-Length header is not a number: {declared[:40]!r}")
            if int(declared) > limit:
                raise too_large(int(declared), limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(size, limit, so_far=True)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client left before its request body arrived") from None
        return b"".join(chunks)


def too_large(size: int, limit: int, so_far: bool = False) -> ApiError:
    said = f"more than {limit} bytes arrived" if so_far else f"it is {size} bytes"
    return ApiError(413, f"the request body is over the server's limit of {limit} bytes ({said}); "
                         "--max-request-bytes raises the limit", None, "request_too_large")


def salt_of(tenant: str, cache_salt: str | None) -> str:
    """What keys a request's cached prefixes: its tenant and its cache_salt ("" when it has neither, so that
    a server without keys shares prefixes among unsalted requests as before)."""
    if not tenant and cache_salt is None:
        return ""
    return hashlib.sha256(f"{tenant}\0{cache_salt or ''}".encode("utf-8")).hexdigest()[:32]
