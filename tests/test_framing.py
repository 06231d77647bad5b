"""The worker-stream framing: messages split anywhere come out whole and in order."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from server.executors.framing import FrameReader


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 50), max_size=40))
def test_messages_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader, out, pos = FrameReader(), [], 0
    for cut in cuts:
        out += reader.feed(stream[pos : pos + cut])
        pos += cut
    out += reader.feed(stream[pos:])
    assert out == payloads


def test_long_header_form() -> None:
    payload = b"x" * 10
    data = struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    assert FrameReader().feed(data) == [payload]
