"""The link between an instance's control plane and its workers: framing and messages.

With ``workers: N`` one control process reads the files and providers and probes the pools'
targets; the workers only serve. They talk over one unix stream socket, ``control.sock`` in the
supervisor's private directory (mode 0700, see `portway.supervisor`), one connection per worker.

Frames: a 4-byte big-endian length, then that many bytes of a pickled ``dict`` whose ``"type"``
says what it is. Messages (protocol version `VERSION`):

=========  ===========  ===================================================================
direction  type         fields
=========  ===========  ===================================================================
worker ->  ``hello``    ``v`` (protocol version), ``worker`` (index), ``pid``
control -> ``routes``   ``version`` (plan number), ``config`` (the complete, merged `Config`,
                        port-0 routes given their shared port), ``files`` (True when the files
                        were re-read: the worker counts it as a reload in its metrics)
worker ->  ``applied``  ``version``, ``failed`` (route -> error text; empty when all applied)
control -> ``health``   ``route``, ``target``, ``up``, ``successes``, ``failures``: a target's
                        active-check state, sent after every ``routes`` (a new or restarted
                        worker starts with the instance's health, not "all up")
control -> ``refused``  (no fields): a re-read of the files failed validation; nothing changes,
                        the worker counts a failed reload in its metrics
control -> ``probe``    ``route``, ``target``, ``ok``, ``reason``: one probe's result, which
                        each worker feeds into its balancer (the hysteresis is deterministic,
                        so every worker reaches the same state)
=========  ===========  ===================================================================

Why pickle and not JSON: the validated `Config` is normalised (``port`` is a `PortSpec`, targets
are folded) and its JSON dump does not validate again as a config file would, while both ends are
the same build of portway forked from one supervisor, and the socket sits in a 0700 directory
of the same user: whoever can write to it can already ptrace either process. A frame larger
than `MAX_FRAME` is refused, so a corrupt length cannot make a process allocate gigabytes.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

__all__ = ["MAX_FRAME", "VERSION", "LinkClosed", "Message", "encode", "read_message", "send"]

VERSION = 1
#: A config of thousands of routes pickles to a few MiB; far beyond that is corruption.
MAX_FRAME = 64 * 1024 * 1024

Message = dict[str, Any]
_HEADER = struct.Struct(">I")


class LinkClosed(Exception):
    """The other end went away (or sent something that is not a frame)."""


def encode(message: Message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next message; LinkClosed at end of stream or on a malformed frame."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME:
            raise LinkClosed(f"frame of {size} bytes is over the {MAX_FRAME} limit")
        payload = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise LinkClosed("the link closed") from exc
    try:
        message = pickle.loads(payload)
    except Exception as exc:
        raise LinkClosed(f"unreadable frame: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise LinkClosed("a frame without a message type")
    return message


def send(writer: asyncio.StreamWriter, message: Message) -> None:
    """Queue `message` (asyncio buffers it; a dead peer shows up on the next read)."""
    if not writer.is_closing():
        writer.write(encode(message))
