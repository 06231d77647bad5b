"""The request body, read within its limits: at most server.max_body_bytes as sent, at most
server.max_decompressed_bytes once aiohttp has decompressed it (`Content-Encoding: gzip`,
`deflate`, `br`), never a pause longer than server.body_timeout_s between two reads (a large
upload is fine, a stalled one is closed), and a body that is not what its Content-Encoding
says is a 400, not a 500.

Event loop only. `LimitedRequest` is the low-level server's request class (app.py), so that the
handlers' `await request.read()` has these limits. A body that came whole with its head and is
not compressed (the common case) is taken from the buffer in one step, with no timer.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from server.errors import BadRequest, PayloadTooLarge
from server.http.connections import Connection


class LimitedRequest(web.BaseRequest):
    async def read(self) -> bytes:
        if self._read_bytes is None:
            payload = self._payload
            try:
                if payload.is_eof() and self._message.compression is None:
                    body = payload.read_nowait()
                    if len(body) > self._client_max_size:
                        raise too_large("max_body_bytes", self._client_max_size)
                else:
                    body = await self._read_streaming()
            except (RequestPayloadError, HttpProcessingError) as exc:
                self._abandon_body()  # the stream cannot be trusted past this point
                raise _unreadable(exc) from None
            self._read_bytes = body
        return self._read_bytes

    async def _read_streaming(self) -> bytes:
        payload, sent_limit = self._payload, self._client_max_size
        connection = self._protocol if isinstance(self._protocol, Connection) else None
        encoded = self._message.compression is not None
        limit, name = sent_limit, "max_body_bytes"
        if encoded and connection is not None:
            limit, name = connection.limits.max_decompressed_bytes, "max_decompressed_bytes"
        declared = self.content_length
        if declared is not None and declared > sent_limit:
            raise too_large("max_body_bytes", sent_limit)  # refused before a byte is read
        # One decompression step yields at most this much, so a bomb is caught at the limit.
        payload.set_read_chunk_size(limit + 1)
        stall = None if connection is None or payload.is_eof() else _StallTimer(connection)
        body = bytearray()
        try:
            while chunk := await payload.readany():
                body.extend(chunk)
                refused = self._too_large(len(body), limit, name)
                if refused is not None:
                    if encoded:
                        self._abandon_body()  # decompressing the rest would be wasted work
                    raise refused
                if stall is not None:
                    stall.touch()
        finally:
            if stall is not None:
                stall.cancel()
        return bytes(body)

    def _too_large(self, size: int, limit: int, name: str) -> PayloadTooLarge | None:
        if size > limit:
            return too_large(name, limit)
        if (self._payload.total_compressed_bytes or 0) > self._client_max_size:
            return too_large("max_body_bytes", self._client_max_size)  # as sent, compressed
        return None

    def _abandon_body(self) -> None:
        """Read no more of this body: the connection stops reading and closes after the
        answer, rather than waiting for the rest (aiohttp's lingering read) or decompressing
        it. The payload is ended here, so nothing is fed to it after its end."""
        if isinstance(self._protocol, Connection):
            self._protocol.close_after_answer()
            if self._protocol.transport is not None:
                self._protocol.transport.pause_reading()
        self._payload.feed_eof()


def _unreadable(exc: Exception) -> BadRequest:
    cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
    return unreadable(cause.message if isinstance(cause, HttpProcessingError) else str(cause))


def unreadable(why: str) -> BadRequest:
    """A body that is not what its Content-Encoding says (incoming.py says it the same way)."""
    return BadRequest(f"the request body could not be read (corrupt or truncated?): {why}")


def too_large(setting: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body exceeds server.{setting} ({limit} bytes)")


class _StallTimer:
    """Closes the connection when no byte of the body came for server.body_timeout_s: one
    timer per body, re-armed lazily when it fires, not once per read."""

    def __init__(self, connection: Connection) -> None:
        self._loop = asyncio.get_running_loop()
        self._connection = connection
        self._timeout_s = connection.limits.body_timeout_s
        self._touched_at = self._loop.time()
        self._handle = self._loop.call_at(self._touched_at + self._timeout_s, self._check)

    def touch(self) -> None:
        self._touched_at = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        due = self._touched_at + self._timeout_s
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
        else:
            self._connection.close_stalled()
