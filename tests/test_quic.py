"""quic.py: the RFC 9001 Appendix A vectors, and Initials built here around real ClientHellos."""

from __future__ import annotations

import contextlib
import itertools
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from portway.quic import (
    MAX_INITIAL_DATAGRAMS,
    QuicSniffer,
    crypto_frames,
    initial_keys,
    parse_initial_packets,
)
from portway.sniff import HANDSHAKE_LIMIT, Sniffed, SniffError
from tests.hellos import real_hello, unframe

RFC_DCID = bytes.fromhex("8394c8f03e515708")
# RFC 9001 Appendix A.2: the client Initial, protected (1200 bytes).
RFC_CLIENT_INITIAL = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934"
)
HELLO = unframe(real_hello("h3.example.test", ("h3", "h3-29"), tls13_only=True))
DCID = bytes(range(1, 9))


def varint(value: int) -> bytes:
    for size, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | prefix << (8 * size - 8)).to_bytes(size, "big")
    raise ValueError(value)


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def protect(
    payload: bytes,
    *,
    dcid: bytes = DCID,
    packet_number: int = 0,
    pn_len: int = 2,
    first: int = 0xC0,
    version: bytes = b"\x00\x00\x00\x01",
    pad_to: int = 1200,
) -> bytes:
    """A client Initial as a QUIC stack would send it (RFC 9001 §5.3-5.4), padded to `pad_to`."""
    keys = initial_keys(dcid)
    start = bytes([first | (pn_len - 1)]) + version + bytes([len(dcid)]) + dcid + b"\x00" + varint(0)
    payload += bytes(max(0, pad_to - (len(start) + 2 + pn_len + len(payload) + 16)))
    header = start + (0x4000 | (pn_len + len(payload) + 16)).to_bytes(2, "big")
    header += packet_number.to_bytes(pn_len, "big")
    nonce = (int.from_bytes(keys.iv, "big") ^ packet_number).to_bytes(12, "big")
    packet = bytearray(header + AESGCM(keys.key).encrypt(nonce, payload, header))
    pn_offset = len(header) - pn_len
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(bytes(packet[pn_offset + 4 : pn_offset + 20])) + encryptor.finalize()
    packet[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        packet[pn_offset + i] ^= mask[1 + i]
    return bytes(packet)


def expect_error(outcome: Sniffed | SniffError | None, words: str) -> None:
    assert isinstance(outcome, SniffError), outcome
    assert words in outcome.reason


def test_initial_keys_match_rfc9001_a1() -> None:
    client = initial_keys(RFC_DCID)
    assert (client.key.hex(), client.iv.hex(), client.hp.hex()) == (
        "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2"
    )  # fmt: skip
    server = initial_keys(RFC_DCID, server=True)
    assert (server.key.hex(), server.iv.hex(), server.hp.hex()) == (
        "cf3a5331653c364c88f0f379b6067e37", "0ac1493ca1905853b0bba03e", "c206b8d9b9f0f37644430b490eeaa314"
    )  # fmt: skip


def test_rfc9001_a2_client_initial() -> None:
    [packet] = parse_initial_packets(RFC_CLIENT_INITIAL)
    assert (packet.dcid, packet.scid, packet.token, packet.packet_number) == (RFC_DCID, b"", b"", 2)
    assert packet.payload.startswith(
        bytes.fromhex("060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863")
    )
    [(offset, data)] = crypto_frames(packet.payload)
    assert offset == 0 and len(data) == 0xF1
    assert QuicSniffer().feed(RFC_CLIENT_INITIAL) == Sniffed("quic", "example.com", ("alpn",))


def test_our_builder_reproduces_the_rfc_packet() -> None:
    """The builder the other tests use protects exactly as RFC 9001 A.2 does."""
    [packet] = parse_initial_packets(RFC_CLIENT_INITIAL)
    rebuilt = protect(packet.payload, dcid=RFC_DCID, packet_number=2, pn_len=4)
    assert rebuilt == RFC_CLIENT_INITIAL


@given(st.integers(2, 12), st.randoms(use_true_random=False), st.sampled_from([1, 2, 4]))
def test_real_hello_in_shuffled_split_crypto_frames(pieces: int, rng: random.Random, pn_len: int) -> None:
    cuts = sorted(rng.sample(range(1, len(HELLO)), pieces - 1))
    bounds = [0, *cuts, len(HELLO)]
    frames = [crypto(a, HELLO[a:b]) for a, b in itertools.pairwise(bounds)]
    rng.shuffle(frames)
    payload = b"".join(frame + b"\x01" * rng.randint(0, 2) + b"\x00" * rng.randint(0, 3) for frame in frames)
    outcome = QuicSniffer().feed(protect(payload, pn_len=pn_len))
    assert outcome == Sniffed("quic", "h3.example.test", ("h3", "h3-29"))


def test_hello_across_two_datagrams_in_any_order() -> None:
    half = len(HELLO) // 2
    first = protect(crypto(half, HELLO[half:]), packet_number=0)
    second = protect(crypto(0, HELLO[:half]), packet_number=1)
    sniffer = QuicSniffer()
    assert sniffer.feed(first) is None
    assert sniffer.feed(second) == Sniffed("quic", "h3.example.test", ("h3", "h3-29"))
    assert sniffer.feed(b"anything later") == Sniffed("quic", "h3.example.test", ("h3", "h3-29"))


def test_coalesced_packets_and_a_foreign_dcid() -> None:
    half = len(HELLO) // 2
    one = protect(crypto(0, HELLO[:half]), pad_to=0)
    other_connection = protect(crypto(half, b"\xff" * (len(HELLO) - half)), dcid=b"\x09" * 8, pad_to=0)
    zero_rtt = b"\xd0\x00\x00\x00\x01\x08" + DCID + b"\x00" + varint(30) + bytes(30)  # skipped by Length
    two = protect(crypto(half, HELLO[half:]), packet_number=1, pad_to=1200 - len(one) - len(other_connection))
    datagram = one + other_connection + two + zero_rtt
    assert QuicSniffer().feed(datagram) == Sniffed("quic", "h3.example.test", ("h3", "h3-29"))


def test_overlapping_crypto_frames() -> None:
    agree = crypto(0, HELLO[:300]) + crypto(100, HELLO[100:])
    assert QuicSniffer().feed(protect(agree)) == Sniffed("quic", "h3.example.test", ("h3", "h3-29"))
    forged = HELLO[100:200].replace(b"h3.example.test", b"evil.example.te")
    disagree = crypto(0, HELLO) + crypto(100, forged)
    if forged != HELLO[100:200]:
        expect_error(QuicSniffer().feed(protect(disagree)), "disagree")
    expect_error(QuicSniffer().feed(protect(crypto(0, HELLO) + crypto(50, b"\x00" * 20))), "disagree")


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        bytes.fromhex("12340100000100000000000003777777076578616d706c6503636f6d0000010001"),  # DNS query
        b"\x40" + bytes(1300),  # short header
        protect(crypto(0, HELLO), version=bytes.fromhex("6b3343cf")),  # QUIC v2
        protect(crypto(0, HELLO), first=0xE0),  # Handshake packet type
    ],
)
def test_not_a_v1_initial_is_unknown(datagram: bytes) -> None:
    assert QuicSniffer().feed(datagram) == Sniffed("unknown")


def test_errors() -> None:
    good = protect(crypto(0, HELLO))
    tampered = bytearray(good)
    tampered[-20] ^= 1
    expect_error(QuicSniffer().feed(bytes(tampered)), "does not decrypt")
    expect_error(QuicSniffer().feed(good[:1199]), "under 1200")
    short_dcid = protect(crypto(0, HELLO), dcid=b"\x01\x02\x03\x04")
    expect_error(QuicSniffer().feed(short_dcid), "4-byte destination")
    expect_error(QuicSniffer().feed(protect(b"\x08\x00\x00")), "0x8 is not allowed")
    expect_error(QuicSniffer().feed(protect(crypto(HANDSHAKE_LIMIT - 10, bytes(20)))), "past 16384")
    expect_error(QuicSniffer().feed(protect(crypto(0, b"\x02\x00\x00\x10"))), "not a ClientHello")
    truncated_frame = protect(b"\x06\x00\x40\x10abc", pad_to=0) + bytes(1200)  # zeros after: a short header
    expect_error(QuicSniffer().feed(truncated_frame), "runs past its packet")


def test_frame_count_is_bounded() -> None:
    assert crypto_frames(b"\x01\x00\x00\x00" * 128) == []
    with pytest.raises(SniffError, match="more than 256 frames"):
        crypto_frames(b"\x01\x00" * 200)
    expect_error(QuicSniffer().feed(protect(b"\x01" * 300)), "more than 256 frames")


def test_stalling_client_is_bounded() -> None:
    sniffer = QuicSniffer()
    for number in range(MAX_INITIAL_DATAGRAMS):
        assert sniffer.feed(protect(b"\x01", packet_number=number)) is None
    expect_error(sniffer.feed(protect(b"\x01", packet_number=99)), "not complete in 8 datagrams")
    slow = QuicSniffer()
    assert slow.feed(protect(crypto(0, HELLO[:50]))) is None
    expect_error(slow.expired(), "timed out")


@given(st.binary(min_size=0, max_size=1400))
def test_fuzz_random_datagrams(tail: bytes) -> None:
    for datagram in (tail, b"\xc0\x00\x00\x00\x01" + tail, b"\xc0\x00\x00\x00\x01\x08" + tail):
        outcome = QuicSniffer().feed(datagram)
        assert outcome is None or isinstance(outcome, Sniffed | SniffError)


@given(st.lists(st.tuples(st.integers(0, 1199), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_rfc_packet(changes: list[tuple[int, int]]) -> None:
    datagram = bytearray(RFC_CLIENT_INITIAL)
    for position, value in changes:
        datagram[position] = value
    outcome = QuicSniffer().feed(bytes(datagram))
    assert isinstance(outcome, Sniffed | SniffError)
    with contextlib.suppress(SniffError):
        parse_initial_packets(bytes(datagram))
