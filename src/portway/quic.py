"""The SNI and ALPN of a QUIC v1 client, from its Initial packets. Sans-I/O.

A UDP listener shared by several routes (``match.sni`` on a ``udp`` route) pins each new client
session to a route from its first datagrams. QUIC encrypts even its first packet, but with keys
anyone can derive: RFC 9001 §5.2 derives them with HKDF from a public salt and the packet's own
Destination Connection ID. So the proxy can read the ClientHello without being an endpoint:

1. parse the long header (RFC 9000 §17.2.2), of version 1, type Initial;
2. derive the client Initial key, IV and header-protection key from the DCID (HKDF-SHA256);
3. remove header protection (AES-128-ECB over a 16-byte sample of the ciphertext, §5.4.3) to
   learn the packet number and its length;
4. decrypt the payload (AES-128-GCM, the header as associated data; §5.3);
5. collect CRYPTO frames, which may come in any order, overlap, and span several packets and
   datagrams, and parse the ClientHello in them with `portway.sniff`.

    sniffer = QuicSniffer()
    outcome = sniffer.feed(datagram)     # None: the hello continues in a later datagram; keep
                                         # (and later forward) every datagram fed so far
    # Sniffed("quic", sni, alpn) -> MatchTable.choose; Sniffed("unknown") -> not a QUIC v1 Initial
    # (another protocol, another QUIC version): the fallback; SniffError -> drop, log the reason

Nothing is consumed: the datagrams go to the chosen target unchanged. Decryption is a parse,
not trust: the AEAD tag proves only that the packet was built for this DCID, which anyone can do.

Bounds, and what they prevent: a client Initial datagram must be at least 1200 bytes (RFC 9000
§14.1, which is what stops QUIC being an amplifier, and a cheap filter for junk); the CRYPTO stream
read is at most 16 KiB (`portway.sniff.HANDSHAKE_LIMIT`) and the sniffer gives up after
`MAX_INITIAL_DATAGRAMS` datagrams, so a client cannot make a session hold unbounded state before
it has a route. Each datagram costs one HKDF derivation (once per sniffer), one AES block and one
GCM decryption per Initial packet. Overlapping CRYPTO data that disagrees is an error (two
readings of one hello). Only v1 (0x00000001) is decrypted; v2 (RFC 9369) and drafts are
``unknown`` and go to the fallback.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portway.sniff import HANDSHAKE_LIMIT, ClientHello, Sniffed, SniffError, parse_handshake_client_hello

__all__ = [
    "INITIAL_SALT_V1",
    "MAX_INITIAL_DATAGRAMS",
    "MIN_INITIAL_DATAGRAM",
    "QUIC_V1",
    "InitialKeys",
    "InitialPacket",
    "QuicSniffer",
    "crypto_frames",
    "initial_keys",
    "parse_initial_packets",
]

QUIC_V1: Final = 0x00000001
INITIAL_SALT_V1: Final = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")  # RFC 9001 §5.2
MIN_INITIAL_DATAGRAM: Final = 1200
MAX_INITIAL_DATAGRAMS: Final = 8
_MAX_CID: Final = 20
_MIN_CLIENT_DCID: Final = 8  # RFC 9000 §7.2: a client's first DCID is at least 8 unpredictable bytes

_FRAME_PADDING, _FRAME_PING, _FRAME_ACK, _FRAME_ACK_ECN = 0x00, 0x01, 0x02, 0x03
_FRAME_CRYPTO, _FRAME_CLOSE = 0x06, 0x1C
# Real clients send a handful of frames per Initial (Chrome scatters a few CRYPTO, PING and PADDING
# runs); the cap keeps a valid but hostile 64 KiB datagram of 1-byte frames from costing a Python
# loop turn per byte.
_MAX_FRAMES: Final = 256
_ZEROS: Final = re.compile(rb"\x00*")  # a run of PADDING frames, skipped without copying


@dataclass(frozen=True, slots=True)
class InitialKeys:
    key: bytes
    iv: bytes
    hp: bytes


@dataclass(frozen=True, slots=True)
class InitialPacket:
    """One decrypted Initial packet; `payload` is its frames (padding included)."""

    dcid: bytes
    scid: bytes
    token: bytes
    packet_number: int
    payload: bytes


def _hkdf_expand_label(secret: bytes, label: str, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label (RFC 8446 §7.1) with an empty context; every QUIC Initial output is
    at most one SHA-256 block, so a single HMAC suffices."""
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", hashlib.sha256)[:length]


def initial_keys(dcid: bytes, *, server: bool = False) -> InitialKeys:
    """The Initial packet protection keys of one side, from the client's first DCID (RFC 9001 §5.2)."""
    initial_secret = hmac.digest(INITIAL_SALT_V1, dcid, hashlib.sha256)  # HKDF-Extract
    secret = _hkdf_expand_label(initial_secret, "server in" if server else "client in", 32)
    return InitialKeys(
        key=_hkdf_expand_label(secret, "quic key", 16),
        iv=_hkdf_expand_label(secret, "quic iv", 12),
        hp=_hkdf_expand_label(secret, "quic hp", 16),
    )


def _varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """A QUIC variable-length integer (RFC 9000 §16) at `pos`: (value, position after it)."""
    if pos >= len(data):
        raise SniffError(f"QUIC packet truncated in {what}")
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        raise SniffError(f"QUIC packet truncated in {what}")
    value = int.from_bytes(data[pos : pos + size], "big") & ((1 << (8 * size - 2)) - 1)
    return value, pos + size


def _is_v1_initial(datagram: bytes) -> bool:
    """Long header, version 1, type Initial: the only packets this module decrypts."""
    long_initial = len(datagram) >= 5 and datagram[0] & 0xB0 == 0x80
    return long_initial and datagram[1:5] == QUIC_V1.to_bytes(4, "big")


def parse_initial_packets(datagram: bytes) -> list[InitialPacket]:
    """Decrypt every v1 Initial packet in `datagram` (packets may be coalesced, RFC 9000 §12.2).

    Other long-header packets (0-RTT, Handshake) are skipped by their Length; a short-header packet
    ends the datagram. Each Initial is decrypted with the keys of its own DCID. Raises `SniffError`
    for a malformed or undecryptable Initial.
    """
    packets: list[InitialPacket] = []
    keys: InitialKeys | None = None
    pos = 0
    while pos < len(datagram) and datagram[pos] & 0x80:
        start = pos
        if len(datagram) - pos < 7:
            raise SniffError("QUIC long header truncated")
        first = datagram[pos]
        version = int.from_bytes(datagram[pos + 1 : pos + 5], "big")
        if version != QUIC_V1:
            raise SniffError(f"coalesced QUIC packet of version 0x{version:08x}")
        pos += 5
        dcid_len = datagram[pos]
        if dcid_len > _MAX_CID:
            raise SniffError(f"QUIC destination connection ID of {dcid_len} bytes is over 20")
        dcid = datagram[pos + 1 : pos + 1 + dcid_len]
        pos += 1 + dcid_len
        if pos >= len(datagram):
            raise SniffError("QUIC long header truncated")
        scid_len = datagram[pos]
        if scid_len > _MAX_CID:
            raise SniffError(f"QUIC source connection ID of {scid_len} bytes is over 20")
        scid = datagram[pos + 1 : pos + 1 + scid_len]
        pos += 1 + scid_len
        if len(dcid) != dcid_len or len(scid) != scid_len:
            raise SniffError("QUIC long header truncated")
        is_initial = first & 0x30 == 0
        token = b""
        if is_initial:
            token_len, pos = _varint(datagram, pos, "token length")
            token = datagram[pos : pos + token_len]
            if len(token) != token_len:
                raise SniffError("QUIC packet truncated in token")
            pos += token_len
        length, pos = _varint(datagram, pos, "length")
        end = pos + length
        if end > len(datagram):
            raise SniffError("QUIC packet length runs past the datagram")
        if is_initial:
            if not packets and dcid_len < _MIN_CLIENT_DCID:
                raise SniffError(f"QUIC client Initial with a {dcid_len}-byte destination connection ID")
            if keys is None or dcid != packets[-1].dcid:
                keys = initial_keys(dcid)
            packets.append(_decrypt(datagram[start:end], pos - start, keys, dcid, scid, token))
        pos = end
    return packets


def _decrypt(
    packet: bytes, pn_offset: int, keys: InitialKeys, dcid: bytes, scid: bytes, token: bytes
) -> InitialPacket:
    """Remove header protection and decrypt one Initial packet (RFC 9001 §5.3, §5.4)."""
    sample = packet[pn_offset + 4 : pn_offset + 20]
    if len(sample) < 16:
        raise SniffError("QUIC Initial too short to sample for header protection")
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first = packet[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(
        b ^ m for b, m in zip(packet[pn_offset : pn_offset + pn_len], mask[1 : 1 + pn_len], strict=True)
    )
    # The first packet's expected number is 0, so the truncated number is the full one (RFC 9000 A.3).
    packet_number = int.from_bytes(pn_bytes, "big")
    header = bytes([first]) + packet[1:pn_offset] + pn_bytes
    nonce = (int.from_bytes(keys.iv, "big") ^ packet_number).to_bytes(12, "big")
    try:
        payload = AESGCM(keys.key).decrypt(nonce, packet[pn_offset + pn_len :], header)
    except InvalidTag:
        raise SniffError("QUIC Initial does not decrypt (corrupt, or not a client Initial)") from None
    if first & 0x0C:
        raise SniffError("QUIC Initial has reserved header bits set")
    if not payload:
        raise SniffError("QUIC Initial carries no frames")
    return InitialPacket(dcid, scid, token, packet_number, payload)


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """The (offset, data) of every CRYPTO frame in a decrypted Initial payload.

    PADDING, PING, ACK and CONNECTION_CLOSE are skipped; any other frame type is not allowed in an
    Initial packet (RFC 9000 §12.4, table 3) and is an error, as are more than 256 frames (a run
    of PADDING counts once)."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    count = 0
    while pos < len(payload):
        count += 1
        if count > _MAX_FRAMES:
            raise SniffError(f"QUIC Initial with more than {_MAX_FRAMES} frames")
        kind, pos = _varint(payload, pos, "frame type")
        if kind == _FRAME_PADDING:  # each zero byte is a frame; a 1200-byte Initial is mostly these
            pos = _ZEROS.match(payload, pos).end()  # type: ignore[union-attr]  # always matches
            continue
        if kind == _FRAME_PING:
            continue
        if kind in (_FRAME_ACK, _FRAME_ACK_ECN):
            for what in ("ACK largest", "ACK delay"):
                _, pos = _varint(payload, pos, what)
            ranges, pos = _varint(payload, pos, "ACK range count")
            _, pos = _varint(payload, pos, "ACK first range")
            for _ in range(min(2 * ranges, len(payload))):
                _, pos = _varint(payload, pos, "ACK range")
            for _ in range(3 if kind == _FRAME_ACK_ECN else 0):
                _, pos = _varint(payload, pos, "ACK ECN count")
        elif kind == _FRAME_CRYPTO:
            offset, pos = _varint(payload, pos, "CRYPTO offset")
            length, pos = _varint(payload, pos, "CRYPTO length")
            data = payload[pos : pos + length]
            if len(data) != length:
                raise SniffError("QUIC CRYPTO frame runs past its packet")
            if offset + length > HANDSHAKE_LIMIT:
                raise SniffError(f"QUIC CRYPTO data past {HANDSHAKE_LIMIT} bytes")
            frames.append((offset, data))
            pos += length
        elif kind == _FRAME_CLOSE:
            for what in ("CONNECTION_CLOSE code", "CONNECTION_CLOSE frame type"):
                _, pos = _varint(payload, pos, what)
            reason, pos = _varint(payload, pos, "CONNECTION_CLOSE reason length")
            pos += reason
        else:
            raise SniffError(f"QUIC frame type 0x{kind:x} is not allowed in an Initial packet")
    return frames


def _contiguous(frames: list[tuple[int, bytes]]) -> bytes:
    """The CRYPTO stream from offset 0 up to the first gap; overlaps must agree byte for byte."""
    stream = bytearray()
    for offset, data in sorted(frames, key=lambda frame: frame[0]):
        if offset > len(stream):
            break
        overlap = stream[offset : offset + len(data)]
        if data[: len(overlap)] != overlap:
            raise SniffError("QUIC CRYPTO frames disagree where they overlap")
        stream += data[len(overlap) :]
    return bytes(stream)


class QuicSniffer:
    """One UDP client's first datagrams, until its QUIC ClientHello is complete.

    Feed every datagram the client sends until an outcome comes back; once it has, every later
    call returns it again. Only Initial packets carrying the first packet's DCID count: a client
    keeps that DCID until the server answers, which it has not (no route yet).
    """

    __slots__ = ("_datagrams", "_dcid", "_frames", "_outcome")

    def __init__(self) -> None:
        self._dcid: bytes | None = None
        self._frames: list[tuple[int, bytes]] = []
        self._datagrams = 0
        self._outcome: Sniffed | SniffError | None = None

    def feed(self, datagram: bytes) -> Sniffed | SniffError | None:
        """Add the client's next datagram. None: the ClientHello continues in a later one."""
        if self._outcome is None:
            self._outcome = self._step(bytes(datagram))
        return self._outcome

    def expired(self) -> Sniffed | SniffError:
        """The peek timed out with the hello incomplete (lost datagrams, or a stalling client)."""
        if self._outcome is None:
            self._outcome = SniffError("peek timed out inside the QUIC ClientHello")
        return self._outcome

    def _step(self, datagram: bytes) -> Sniffed | SniffError | None:
        if self._datagrams == 0 and not _is_v1_initial(datagram):
            return Sniffed("unknown")
        self._datagrams += 1
        if self._datagrams > MAX_INITIAL_DATAGRAMS:
            return SniffError(f"QUIC ClientHello not complete in {MAX_INITIAL_DATAGRAMS} datagrams")
        if len(datagram) < MIN_INITIAL_DATAGRAM:
            return SniffError(
                f"QUIC Initial datagram of {len(datagram)} bytes (under {MIN_INITIAL_DATAGRAM})"
            )
        try:
            for packet in parse_initial_packets(datagram):
                if self._dcid is None:
                    self._dcid = packet.dcid
                if packet.dcid == self._dcid:
                    self._frames += crypto_frames(packet.payload)
            hello = parse_handshake_client_hello(_contiguous(self._frames))
        except SniffError as exc:
            return exc
        if isinstance(hello, ClientHello):
            return Sniffed("quic", hello.sni, hello.alpn)
        return None
