"""Splits the byte stream from a worker into messages, in multiprocessing.Connection's framing
(a 4-byte big-endian signed length, or -1 and an 8-byte length for huge messages).

Event loop side of every worker link (worker_link.py); pure bytes in, payloads out.
"""

from __future__ import annotations

import struct

_HEADER = struct.Struct("!i")
_LONG = struct.Struct("!Q")


class FrameReader:
    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return every message now complete, in order."""
        buf = self._buf
        buf += chunk
        messages = []
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            start = pos + 4
            if size == -1:
                if len(buf) - start < 8:
                    break
                (size,) = _LONG.unpack_from(buf, start)
                start += 8
            if len(buf) - start < size:
                break
            messages.append(bytes(buf[start : start + size]))
            pos = start + size
        del buf[:pos]
        return messages
