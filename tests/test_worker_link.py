"""The control plane <-> worker framing: every message survives any split of the byte stream,
and a corrupt stream ends the link with a reason instead of an allocation or a traceback."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.config.load import load_config_text
from portway.worker_link import MAX_FRAME, LinkClosed, encode, read_message


def reader_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


CONFIG = load_config_text(
    "routes:\n  a:\n    host: 127.0.0.1\n    port: 0:22\n"
    "  b:\n    scheme: udp4\n    targets: [127.0.0.1:53, {host: 127.0.0.2, port: 53, weight: 3}]\n"
    "    port: 5353:53\n",
    "t.yml",
)


async def test_a_route_set_arrives_exactly_as_sent() -> None:
    sent = {"type": "routes", "version": 7, "config": CONFIG, "files": True}
    got = await read_message(reader_of(encode(sent)))
    assert got == sent and got["config"] == CONFIG


@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["probe", "applied", "hello"]), "n": st.integers(), "s": st.text()}
        ),
        min_size=1,
        max_size=5,
    ),
    cut=st.integers(min_value=0),
)
def test_messages_split_anywhere_come_out_whole_and_in_order(
    messages: list[dict[str, object]], cut: int
) -> None:
    stream = b"".join(encode(m) for m in messages)
    cut %= len(stream) + 1

    async def read_all() -> list[dict[str, object]]:
        reader = asyncio.StreamReader()
        reader.feed_data(stream[:cut])
        reader.feed_data(stream[cut:])
        reader.feed_eof()
        return [await read_message(reader) for _ in messages]

    assert asyncio.run(read_all()) == messages


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "the link closed"),
        (b"\x00\x00", "the link closed"),
        (struct.pack(">I", 10) + b"short", "the link closed"),
        (struct.pack(">I", MAX_FRAME + 1), "over the"),
        (struct.pack(">I", 4) + b"junk", "unreadable frame"),
        (encode({"no": "type"}), "without a message type"),
    ],
)
async def test_a_corrupt_stream_ends_the_link_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(LinkClosed, match=reason):
        await read_message(reader_of(data))
