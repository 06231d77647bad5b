"""What a handler reads of a request (`Incoming`), and a request that arrived whole from another
front (`BufferedRequest`): its body held in memory, read within the same limits as aiohttp's
(server.max_body_bytes as sent, server.max_decompressed_bytes once inflated).

Event loop only; no torch. aiohttp's own `web.BaseRequest` is an `Incoming` as it is, so the
low-level server's hot path is untouched; exchange.py builds a `BufferedRequest` per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from aiohttp.compression_utils import (
    BrotliDecompressor,
    DecompressionBaseHandler,
    ZLibDecompressor,
    ZSTDDecompressor,
)
from multidict import CIMultiDict, CIMultiDictProxy

from server.http.request_body import too_large, unreadable

# The codings aiohttp's parser inflates itself (any other arrives as sent; OIP refuses it).
_INFLATED = frozenset(("gzip", "deflate", "br", "zstd"))


class Incoming(Protocol):
    """The part of a request that the path table and the handlers use."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    async def read(self) -> bytes: ...


class BufferedRequest:
    """A request whose body came whole (a Ray Serve proxy, another front process)."""

    def __init__(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        max_body_bytes: int,
        max_decompressed_bytes: int,
    ) -> None:
        self._method, self._path, self._body = method.upper(), path, body
        self._headers = CIMultiDictProxy(CIMultiDict(headers))
        self._max_body_bytes = max_body_bytes
        self._max_decompressed_bytes = max_decompressed_bytes
        self._read: bytes | None = None

    @property
    def method(self) -> str:
        return self._method

    @property
    def path(self) -> str:
        return self._path

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._headers

    @property
    def content_length(self) -> int | None:
        return len(self._body)  # the body is here: its length as sent, whatever the header says

    async def read(self) -> bytes:
        if self._read is None:
            if len(self._body) > self._max_body_bytes:
                raise too_large("max_body_bytes", self._max_body_bytes)
            self._read = self._inflated()
        return self._read

    def _inflated(self) -> bytes:
        coding = self._headers.get("Content-Encoding", "")
        coding = coding.lower() if coding.isascii() else ""
        if coding not in _INFLATED or not self._body:
            return self._body
        limit = self._max_decompressed_bytes
        try:
            inflater = _inflater(coding)
            # One bounded step, as aiohttp takes them: a bomb stops one byte past the limit.
            body = inflater.decompress_sync(self._body, max_length=limit + 1)
        except Exception:  # zlib, brotli and zstd each raise their own error types
            raise unreadable(f"Can not decode content-encoding: {coding}") from None
        if len(body) > limit:
            raise too_large("max_decompressed_bytes", limit)
        if coding == "deflate" and isinstance(inflater, ZLibDecompressor) and not inflater.eof:
            raise unreadable("Can not decode content-encoding: deflate")
        return body


def _inflater(coding: str) -> DecompressionBaseHandler:
    if coding == "br":
        return BrotliDecompressor()
    if coding == "zstd":
        return ZSTDDecompressor()
    return ZLibDecompressor(encoding=coding)
