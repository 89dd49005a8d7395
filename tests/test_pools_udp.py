"""Pools of UDP targets end to end: sessions stick, move on ICMP unreachable, and active UDP checks.

Each target prefixes its replies with its name (tests/pool_targets.py), so a client sees which
target its session relays to.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from portway.config.load import load_config_text
from portway.probe import format_escapes
from portway.server import Server
from portway.stream.udp import UDPStream
from tests.pool_targets import NamedUDPTarget, listen_addr, member, pool_yaml, running
from tests.targets import UDPClient
from tests.test_probe import dns_query, running_dnsmasq
from tests.test_udp import wait_until

#: Short UDP checks: a state change takes a few hundred milliseconds.
CHECK = "interval: 100ms, timeout: 50ms, rise: 2, fall: 2"


async def targets(*names: str, reply: bool = True) -> list[NamedUDPTarget]:
    return [await NamedUDPTarget(name, reply).start() for name in names]


async def stop_all(pool: list[NamedUDPTarget]) -> None:
    for target in pool:
        await target.stop()


def state(server: Server, index: int) -> str:
    return server.pools["pool"].member_state(index).state


async def client(server: Server, source: str | None = None) -> UDPClient:
    host, port = listen_addr(server)
    return await UDPClient.connect(host, port, source)


async def ask(c: UDPClient, data: bytes, timeout: float = 2.0) -> str:
    """Send one datagram, return the name of the target that answered it."""
    c.send(data)
    reply = await c.recv(timeout)
    name, _, echoed = reply.partition(b":")
    assert echoed == data
    return name.decode()


async def test_a_session_sticks_to_its_target_for_every_datagram() -> None:
    pool = await targets("a", "b", "c")
    clients: list[UDPClient] = []
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool), scheme="udp4")) as server:
            clients = [await client(server) for _ in range(12)]
            chosen: dict[int, str] = {}
            for rnd in range(25):
                for i, c in enumerate(clients):
                    name = await ask(c, f"{i}/{rnd}".encode())
                    assert chosen.setdefault(i, name) == name, f"client {i} moved from {chosen[i]} to {name}"
            # Sessions, not datagrams, are balanced: twelve sessions, four per target.
            assert Counter(chosen.values()) == Counter(a=4, b=4, c=4)
            assert [len(t.sources) for t in pool] == [4, 4, 4]
    finally:
        for c in clients:
            c.close()
        await stop_all(pool)


async def test_a_session_moves_when_its_target_answers_icmp_unreachable() -> None:
    pool = await targets("a", "b")
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool), scheme="udp4")) as server:
            c = await client(server)
            try:
                first = await ask(c, b"one")
                dead = next(t for t in pool if t.name == first)
                await dead.stop()
                # This datagram is lost: the closed port answers with ICMP port unreachable...
                c.send(b"into the void")
                stream = server.streams["pool"]
                assert isinstance(stream, UDPStream)
                key = c.transport.get_extra_info("sockname")[:2]
                await wait_until(lambda: getattr(stream.sessions.get(key), "unreachable", False))
                # ...and the session's next datagram goes to the other target, as do all after it.
                for i in range(10):
                    assert await ask(c, f"after {i}".encode()) != first
            finally:
                c.close()
    finally:
        await stop_all(pool)


async def test_connectionless_check_follows_nginx_icmp_rule() -> None:
    """Without send/expect a UDP check sees a closed port (ICMP), never a silent server."""
    pool = await targets("a", "gone")
    pool += await targets("silent", reply=False)
    await pool[1].stop()
    try:
        text = pool_yaml(*(member(t.port) for t in pool), scheme="udp4", route=f"healthcheck: {{{CHECK}}}")
        async with running(text) as server:
            await wait_until(lambda: state(server, 1) == "down")
            await wait_until(lambda: pool[2].received >= 3)  # three probes met silence...
            assert state(server, 2) == "up"  # ...and silence is not failure under this rule
            assert state(server, 0) == "up"
    finally:
        await stop_all(pool)


async def test_send_expect_marks_a_silent_target_down_and_moves_its_sessions() -> None:
    pool = await targets("a")
    pool += await targets("silent", reply=False)
    check = f'healthcheck: {{{CHECK}, send: "ping", expect_regex: ":ping$"}}'
    try:
        text = pool_yaml(*(member(t.port) for t in pool), scheme="udp4", route=check)
        async with running(text) as server:
            on_a, on_silent = await client(server), await client(server)
            try:
                # Round robin puts the second session on the silent target before any check ran.
                assert await ask(on_a, b"hi") == "a"
                on_silent.send(b"anyone?")
                await wait_until(lambda: pool[1].received >= 1)
                await wait_until(lambda: state(server, 1) == "down")
                # Its session moves on its next datagram, and new clients avoid it.
                assert await ask(on_silent, b"now?") == "a"
                for _ in range(5):
                    fresh = await client(server)
                    try:
                        assert await ask(fresh, b"new") == "a"
                    finally:
                        fresh.close()
            finally:
                on_a.close()
                on_silent.close()
    finally:
        await stop_all(pool)


@pytest.mark.peers
async def test_a_dns_query_probe_keeps_dnsmasq_up_and_a_silent_target_down() -> None:
    """A real DNS query as the probe datagram, written with the documented escapes."""
    query = dns_query(0xBEEF, "probe.test")
    send = format_escapes(query).replace("'", "''")  # a single-quoted YAML scalar: read as written
    check = f"healthcheck: {{{CHECK}, send: '{send}', expect: '\\xbe\\xef'}}"
    silent = await NamedUDPTarget("silent", reply=False).start()
    try:
        with running_dnsmasq() as (port, _):
            text = pool_yaml(member(port), member(silent.port), scheme="udp4", route=check)
            async with running(text) as server:
                await wait_until(lambda: state(server, 1) == "down")
                assert state(server, 0) == "up"
                assert silent.received >= 2
                # Every client's query is answered by dnsmasq.
                for i in range(4):
                    c = await client(server)
                    try:
                        c.send(dns_query(i, "probe.test"))
                        reply = await asyncio.wait_for(c.recv(), 2)
                        assert reply[:2] == i.to_bytes(2, "big")
                    finally:
                        c.close()
    finally:
        await silent.stop()


async def test_reload_keeps_sessions_on_their_targets_and_drains_a_removed_ones() -> None:
    pool = await targets("a", "b", "c")
    grace = "grace_period: 300ms"
    clients: list[UDPClient] = []
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool), scheme="udp4", top=grace)) as server:
            clients = [await client(server) for _ in range(3)]
            assert [await ask(c, b"before") for c in clients] == ["a", "b", "c"]
            # a leaves the pool: b and c move up one place in the list.
            new = pool_yaml(member(pool[1].port), member(pool[2].port), scheme="udp4", top=grace)
            loop = asyncio.get_running_loop()
            assert await server.apply(load_config_text(new, "reload.yml")) == {}
            reloaded = loop.time()
            # Every session keeps its target, the removed one's until the grace period ends.
            for _ in range(3):
                assert [await ask(c, b"after") for c in clients] == ["a", "b", "c"]
            stream = server.streams["pool"]
            assert isinstance(stream, UDPStream)
            await wait_until(lambda: len(stream.sessions) == 2)
            assert loop.time() - reloaded >= 0.25
            # a's client starts a new session on a target of the new pool; the others stay put.
            assert await ask(clients[0], b"again") in {"b", "c"}
            assert [await ask(c, b"later") for c in clients[1:]] == ["b", "c"]
    finally:
        for c in clients:
            c.close()
        await stop_all(pool)


async def test_session_limits_drop_a_new_clients_datagrams() -> None:
    pool = await targets("a", "b")
    route = "max_connections: 6\nper_client: {max_connections: 2}"
    clients: list[UDPClient] = []
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool), scheme="udp4", route=route)) as server:
            # Three sessions (client ports) from each of three sources: two of each get through.
            for source in ("127.0.4.1", "127.0.4.2", "127.0.4.3"):
                trio = [await client(server, source) for _ in range(3)]
                clients += trio
                for c in trio[:2]:
                    assert await ask(c, b"hi") in {"a", "b"}
                trio[2].send(b"third")
                with pytest.raises(TimeoutError):
                    await trio[2].recv(0.2)  # dropped: the listener never answers it
            # Six sessions are live: the route is full, even for a fresh source.
            late = await client(server, "127.0.4.9")
            clients.append(late)
            late.send(b"full")
            with pytest.raises(TimeoutError):
                await late.recv(0.2)
            assert sum(t.received for t in pool) == 6
    finally:
        for c in clients:
            c.close()
        await stop_all(pool)
