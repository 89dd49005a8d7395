"""Pools of TCP targets end to end: portway's Server on real loopback sockets, both TCP engines.

Each target greets a connection with its name (tests/pool_targets.py), so a client knows where the
balancer sent it; shares are counted on the target side. Health is observed through the pool's
reported state only where no event announces it (`wait_until`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter

import pytest

from portway.config.load import load_config_text
from portway.config.schema import RouteConfig
from portway.server import Server
from portway.stream.tcp import TCPStream
from portway.stream.tcp_splice import SpliceConn
from tests.pool_targets import (
    Blackhole,
    NamedTarget,
    dead_port,
    echo,
    greeted_by,
    listen_addr,
    member,
    open_greeted,
    pool_yaml,
    refused,
    running,
)
from tests.test_udp import wait_until

pytestmark = pytest.mark.usefixtures("both_tcp_engines")

#: Short active checks: a state change takes a few hundred milliseconds, not seconds.
FAST_CHECK = "healthcheck: {interval: 100ms, timeout: 50ms, rise: 2, fall: 2}"
FAST_SEND_EXPECT = (
    'healthcheck: {interval: 100ms, timeout: 50ms, rise: 2, fall: 2, send: "PING", expect: hello}'
)


async def targets(*names: str) -> list[NamedTarget]:
    return [await NamedTarget(name).start() for name in names]


async def stop_all(pool: list[NamedTarget]) -> None:
    for target in pool:
        await target.stop()


def state(server: Server, index: int) -> str:
    return server.pools["pool"].member_state(index).state


def active(server: Server, index: int) -> int:
    return server.pools["pool"].member_state(index).active


async def served(addr: tuple[str, int], n: int, source: str | None = None) -> Counter[str]:
    """Which targets served `n` short connections made one after another."""
    return Counter([await greeted_by(addr, source) for _ in range(n)])


async def test_roundrobin_spreads_10000_connections_by_weight_1_1_2() -> None:
    pool = await targets("a", "b", "c")
    try:
        text = pool_yaml(member(pool[0].port), member(pool[1].port), member(pool[2].port, weight=2))
        async with running(text) as server:
            addr = listen_addr(server)
            total = 10_000
            gate = asyncio.Semaphore(128)  # many short connections in flight, not 10,000 fds at once

            async def one() -> None:
                async with gate:
                    await greeted_by(addr)

            await asyncio.gather(*(one() for _ in range(total)))
            counts = [t.accepted for t in pool]
            assert sum(counts) == total
            for got, weight in zip(counts, (1, 1, 2), strict=True):
                expected = total * weight / 4
                assert abs(got - expected) <= 0.05 * expected, counts
    finally:
        await stop_all(pool)


@pytest.mark.parametrize("mode", ["leastconn", "random"])
async def test_leastconn_sends_new_connections_to_the_target_with_fewer_live_ones(mode: str) -> None:
    # `random` is power of two choices: with two targets both are always the candidates, so it
    # must behave exactly like leastconn here.
    pool = await targets("a", "b")
    held: list[socket.socket] = []
    try:
        async with running(
            pool_yaml(member(pool[0].port), member(pool[1].port), route=f"load_balance: {{mode: {mode}}}")
        ) as server:
            addr = listen_addr(server)
            on: dict[str, list[socket.socket]] = {"a": [], "b": []}
            for _ in range(6):
                sock, name = await open_greeted(addr)
                held.append(sock)
                on[name].append(sock)
            assert {k: len(v) for k, v in on.items()} == {"a": 3, "b": 3}
            # b's clients leave; a keeps its three long-lived connections.
            for sock in on["b"]:
                sock.close()
            await wait_until(lambda: active(server, 1) == 0)
            assert active(server, 0) == 3
            # The next three all go to the idle target, none to the busy one.
            for _ in range(3):
                sock, name = await open_greeted(addr)
                held.append(sock)
                assert name == "b"
            assert pool[0].accepted == 3
    finally:
        for sock in held:
            sock.close()
        await stop_all(pool)


async def test_iphash_keeps_each_source_on_one_target_and_moves_only_a_removed_targets_clients() -> None:
    pool = await targets("a", "b", "c")
    sources = [f"127.0.0.{i}" for i in range(10, 40)]
    members = [member(t.port) for t in pool]
    route = "load_balance: {mode: iphash}"
    try:
        async with running(pool_yaml(*members, route=route)) as server:
            addr = listen_addr(server)
            first: dict[str, str] = {}
            for source in sources:
                seen = await served(addr, 3, source)
                assert len(seen) == 1, f"{source} was served by {dict(seen)}"
                first[source] = next(iter(seen))
            assert set(first.values()) == {"a", "b", "c"}  # thirty sources do spread

            # A reload takes c out of the pool (in place: same listener).
            stream = server.streams["pool"]
            assert (
                await server.apply(server.config.model_copy(update={"routes": _routes(members[:2], route)}))
                == {}
            )
            assert server.streams["pool"] is stream
            after = {source: await greeted_by(addr, source) for source in sources}
            for source in sources:
                if first[source] == "c":
                    assert after[source] in {"a", "b"}
                else:
                    assert after[source] == first[source], f"{source} moved off a target that stayed"

            # c comes back: exactly its old clients return to it.
            assert (
                await server.apply(server.config.model_copy(update={"routes": _routes(members, route)})) == {}
            )
            again = {source: await greeted_by(addr, source) for source in sources}
            assert again == first
    finally:
        await stop_all(pool)


def _routes(members: list[str], route: str) -> dict[str, RouteConfig]:
    return dict(load_config_text(pool_yaml(*members, route=route), "reload.yml").routes)


async def test_a_target_that_dies_costs_no_client_an_error() -> None:
    pool = await targets("a", "b", "c")
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool))) as server:
            addr = listen_addr(server)
            assert await served(addr, 30) == Counter(a=10, b=10, c=10)
            await pool[2].stop()
            # Every client is still served: each failed dial to c fails over to a or b at once,
            # and after three of them c is ejected (not dialed again for a while).
            after = await served(addr, 30)
            assert set(after) == {"a", "b"} and after.total() == 30
            assert state(server, 2) == "down"
    finally:
        await stop_all(pool)


async def test_a_hung_target_stays_up_for_a_connect_only_check() -> None:
    pool = await targets("a", "hung")
    pool[1].hung = True
    try:
        text = pool_yaml(member(pool[0].port), member(pool[1].port), route=FAST_CHECK)
        async with running(text) as server:
            # Connect-only probes see a port that accepts: three of them, and it is still up.
            await wait_until(lambda: pool[1].accepted >= 3)
            assert state(server, 1) == "up"
    finally:
        await stop_all(pool)


async def test_send_expect_catches_a_hung_target_and_rise_brings_it_back() -> None:
    pool = await targets("a", "hung")
    pool[1].hung = True
    try:
        text = pool_yaml(member(pool[0].port), member(pool[1].port), route=FAST_SEND_EXPECT)
        async with running(text) as server:
            addr = listen_addr(server)
            await wait_until(lambda: state(server, 1) == "down")
            probes = pool[1].accepted
            # Clients are no longer sent to it (a client sent there would wait forever).
            assert await served(addr, 20) == Counter(a=20)
            assert pool[1].accepted - probes <= 1  # at most a probe that ran meanwhile

            pool[1].hung = False  # it recovers: `rise` good probes bring it back
            await wait_until(lambda: state(server, 1) == "up")
            assert await served(addr, 20) == Counter(a=10, hung=10)
    finally:
        await stop_all(pool)


async def test_backup_serves_only_while_every_primary_is_down() -> None:
    pool = await targets("a", "b", "spare")
    try:
        members = (member(pool[0].port), member(pool[1].port), member(pool[2].port, backup=True))
        async with running(pool_yaml(*members, route=FAST_CHECK)) as server:
            addr = listen_addr(server)
            assert await served(addr, 20) == Counter(a=10, b=10)
            await pool[0].stop()
            assert set(await served(addr, 10)) == {"b"}  # one primary left: still no backup
            await pool[1].stop()
            assert await served(addr, 10) == Counter(spare=10)  # failover reaches the backup at once
            # a comes back on its port: once its checks pass, the backup is idle again.
            await pool[0].start(pool[0].port)
            await wait_until(lambda: state(server, 0) == "up")
            assert await served(addr, 10) == Counter(a=10)
    finally:
        await stop_all(pool)


async def test_route_max_connections_refuses_new_clients_at_once() -> None:
    pool = await targets("a", "b")
    held: list[socket.socket] = []
    try:
        text = pool_yaml(member(pool[0].port), member(pool[1].port), route="max_connections: 4")
        async with running(text) as server:
            addr = listen_addr(server)
            for _ in range(4):
                held.append((await open_greeted(addr))[0])
            # A burst from many sources: all refused while four are live.
            verdicts = await asyncio.gather(*(refused(addr, f"127.0.1.{i}") for i in range(1, 21)))
            assert all(verdicts)
            held.pop().close()
            await wait_until(lambda: active(server, 0) + active(server, 1) == 3)
            held.append((await open_greeted(addr))[0])  # room for exactly one again
            assert await refused(addr)
    finally:
        for sock in held:
            sock.close()
        await stop_all(pool)


async def test_per_client_max_connections_under_a_burst_from_many_sources() -> None:
    pool = await targets("a", "b")
    sources = [f"127.0.2.{i}" for i in range(1, 17)]
    held: list[socket.socket] = []
    try:
        text = pool_yaml(member(pool[0].port), member(pool[1].port), route="per_client: {max_connections: 2}")
        async with running(text) as server:
            addr = listen_addr(server)

            async def attempt(source: str) -> bool:
                try:
                    sock, _ = await open_greeted(addr, source, timeout=2.0)
                except Exception:
                    return False
                held.append(sock)
                return True

            # Three at once from each of sixteen sources: exactly two of each are let in.
            results = await asyncio.gather(*(attempt(s) for s in sources for _ in range(3)))
            per_source = Counter(
                s for s, ok in zip([s for s in sources for _ in range(3)], results, strict=True) if ok
            )
            assert per_source == Counter({s: 2 for s in sources})
            assert pool[0].accepted + pool[1].accepted == 32
    finally:
        for sock in held:
            sock.close()
        await stop_all(pool)


async def test_per_client_rate_refuses_a_source_past_its_tokens(caplog: pytest.LogCaptureFixture) -> None:
    pool = await targets("a")
    pool += await targets("b")
    sources = [f"127.0.3.{i}" for i in range(1, 11)]
    try:
        # 2/m: a burst of one connection per source, then one every thirty seconds.
        text = pool_yaml(member(pool[0].port), member(pool[1].port), route="per_client: {rate: 2/m}")
        with caplog.at_level(logging.WARNING, logger="portway"):
            async with running(text) as server:
                addr = listen_addr(server)
                firsts = await asyncio.gather(*(greeted_by(addr, s) for s in sources))
                assert len(firsts) == 10
                verdicts = await asyncio.gather(*(refused(addr, s) for s in sources for _ in range(2)))
                assert all(verdicts)
                assert await greeted_by(addr, "127.0.3.99")  # a new source has its own tokens
        limited = [r for r in caplog.records if r.getMessage().startswith("refused: ")]
        assert limited and all(getattr(r, "route", None) == "pool" for r in limited)
        assert len(limited) < 20  # logged at a bounded rate, not once per refusal
    finally:
        await stop_all(pool)


async def test_reload_reweights_a_pool_while_connections_keep_flowing() -> None:
    pool = await targets("a", "b", "c")
    held: dict[str, list[socket.socket]] = {"a": [], "b": [], "c": []}
    grace = "grace_period: 300ms"
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool), top=grace)) as server:
            addr = listen_addr(server)
            for _ in range(6):
                sock, name = await open_greeted(addr)
                held[name].append(sock)
            assert {k: len(v) for k, v in held.items()} == {"a": 2, "b": 2, "c": 2}
            stream = server.streams["pool"]

            # a becomes three times as heavy as b; c leaves the pool.
            new = pool_yaml(member(pool[0].port, weight=3), member(pool[1].port), top=grace)
            loop = asyncio.get_running_loop()
            assert await server.apply(load_config_text(new, "reload.yml")) == {}
            reloaded = loop.time()
            assert server.streams["pool"] is stream  # the listener stayed

            # Every live connection still flows, including c's within the grace period.
            for name, socks in held.items():
                for i, sock in enumerate(socks):
                    data = f"{name}{i} after reload".encode()
                    assert await echo(sock, data) == data
            # New connections follow the new weights.
            assert await served(addr, 40) == Counter(a=30, b=10)
            # c's connections are closed when the grace period ends, not before; a's and b's stay.
            await wait_until(lambda: not pool[2].live, timeout=3.0)
            assert loop.time() - reloaded >= 0.25
            for sock in held["c"]:
                assert await echo(sock, b"late", timeout=3.0) == b""
            for name in ("a", "b"):
                for sock in held[name]:
                    assert await echo(sock, b"still here") == b"still here"
    finally:
        for socks in held.values():
            for sock in socks:
                sock.close()
        await stop_all(pool)


async def test_every_target_down_closes_clients_at_once_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = pool_yaml(member(dead_port()), member(dead_port()), route="connect_timeout: 5s")
    with caplog.at_level(logging.INFO, logger="portway"):
        async with running(text) as server:
            addr = listen_addr(server)
            loop = asyncio.get_running_loop()
            started = loop.time()
            verdicts = [await refused(addr, timeout=2.0) for _ in range(12)]
            assert all(verdicts)
            assert loop.time() - started < 2.0  # nobody waited for the 5 s connect timeout
            assert state(server, 0) == state(server, 1) == "down"
    lines = [r for r in caplog.records if r.getMessage().startswith("no target available")]
    assert len(lines) == 1  # rate-limited: once, however many clients are turned away
    assert getattr(lines[0], "route", None) == "pool"
    assert lines[0].levelno == logging.ERROR


async def test_a_single_dead_target_is_dialed_on_every_connection(caplog: pytest.LogCaptureFixture) -> None:
    port = dead_port()
    text = pool_yaml(member(port))
    revived = NamedTarget("back")
    with caplog.at_level(logging.INFO, logger="portway"):
        async with running(text) as server:
            addr = listen_addr(server)
            for _ in range(6):
                assert await refused(addr)
            assert state(server, 0) == "up"  # nothing to fail over to: never ejected
            # Each connection really dialed (and logged its refusal); none was turned away unseen.
            dials = [r for r in caplog.records if r.getMessage() == "dial failed"]
            assert len(dials) == 6
            assert not [r for r in caplog.records if r.getMessage().startswith("no target available")]
            # So the very next connection after the target returns is served.
            await revived.start(port)
            try:
                assert await greeted_by(addr) == "back"
            finally:
                await revived.stop()


async def test_a_reload_while_a_dial_is_in_flight_still_ends_that_dial_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = await targets("a", "b")
    hole = Blackhole()
    members = [member(pool[0].port), member(pool[1].port), member(hole.port)]
    try:
        with caplog.at_level(logging.ERROR):
            async with running(pool_yaml(*members, route="connect_timeout: 900ms")) as server:
                addr = listen_addr(server)
                assert [await greeted_by(addr) for _ in range(2)] == ["a", "b"]
                # The third client's dial goes to the black hole (the pool's third target)...
                pending = asyncio.create_task(open_greeted(addr, timeout=3.0))
                stream = server.streams["pool"]
                assert isinstance(stream, TCPStream)
                await wait_until(lambda: any(_dialing(c) == 2 for c in stream.conns))
                # ...when a reload removes a: the black hole is now second of two.
                new = pool_yaml(*members[1:], route="connect_timeout: 900ms")
                assert await server.apply(load_config_text(new, "reload.yml")) == {}
                # The dial to the black hole times out after its share of the connect timeout and
                # fails over to b, which is still in the pool: the client is served, on time.
                sock, name = await pending
                sock.close()
                assert name == "b"
                assert server.pools["pool"].member_state(1).spec.key.endswith(f":{hole.port}")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
        assert not errors
    finally:
        hole.close()
        await stop_all(pool)


async def test_a_target_that_drops_syns_costs_its_share_of_the_timeout_then_fails_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """connect_timeout bounds the whole dial; each target gets an equal share (up to three), so a
    black-holed target does not cost the client the whole timeout: it fails over after 400 ms."""
    pool = await targets("a")
    hole = Blackhole()
    try:
        members = [member(hole.port), member(pool[0].port)]
        async with running(
            pool_yaml(*members, route="connect_timeout: 800ms\nload_balance: {mode: first}")
        ) as server:
            addr = listen_addr(server)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await greeted_by(addr) == "a"
            took = loop.time() - started
            assert 0.35 < took < 0.8, took  # the hole's share (400 ms), then a at once
            # A pool of one black hole waits out the whole timeout, then gives up.
        async with running(pool_yaml(member(hole.port), route="connect_timeout: 300ms")) as server:
            addr = listen_addr(server)
            started = loop.time()
            assert await refused(addr, timeout=3.0)
            assert loop.time() - started >= 0.29
    finally:
        hole.close()
        await stop_all(pool)


async def test_a_connection_counts_on_the_target_that_serves_it_after_failing_over() -> None:
    """Active counts (what leastconn and the status page read) follow a connection whose dial
    gave up on a black-holed target and moved on: the hole ends at 0, the server at 1, both at
    0 once it closes. (The compiled dial counts from the dial, so the move must give back.)"""
    pool = await targets("a")
    hole = Blackhole()
    try:
        members = [member(hole.port), member(pool[0].port)]
        async with running(
            pool_yaml(*members, route="connect_timeout: 400ms\nload_balance: {mode: first}")
        ) as server:
            states = server.pools["pool"]
            sock, name = await open_greeted(listen_addr(server))
            assert name == "a"
            assert (states.member_state(0).active, states.member_state(1).active) == (0, 1)
            sock.close()
            await wait_until(lambda: states.member_state(1).active == 0)
            assert states.member_state(0).active == 0
    finally:
        hole.close()
        await stop_all(pool)


def _dialing(conn: object) -> int:
    """The pool index a connection is dialing (or connected to), in either engine; -1: none yet."""
    if isinstance(conn, SpliceConn):
        return conn.target
    return int(getattr(conn, "member", -1))


async def test_a_reload_that_keeps_the_pool_keeps_its_health_state() -> None:
    pool = await targets("a", "hung")
    pool[1].hung = True
    members = (member(pool[0].port), member(pool[1].port))
    try:
        async with running(pool_yaml(*members, route=FAST_SEND_EXPECT)) as server:
            await wait_until(lambda: state(server, 1) == "down")
            before = server.pools["pool"]
            # Another idle timeout replaces the listener, but the pool's settings are the same.
            new = pool_yaml(*members, route=FAST_SEND_EXPECT + "\nidle_timeout: 1h")
            assert await server.apply(load_config_text(new, "reload.yml")) == {}
            assert server.pools["pool"] is before
            assert state(server, 1) == "down"  # not "up" again until `rise` checks pass
            assert await served(listen_addr(server), 10) == Counter(a=10)
    finally:
        await stop_all(pool)


async def test_a_reload_that_drops_the_healthcheck_forgets_its_verdicts() -> None:
    """Without active checks nothing would ever bring a target they took down back up."""
    pool = await targets("a", "hung")
    pool[1].hung = True
    members = (member(pool[0].port), member(pool[1].port))
    try:
        async with running(pool_yaml(*members, route=FAST_SEND_EXPECT)) as server:
            await wait_until(lambda: state(server, 1) == "down")
            pool[1].hung = False
            assert await server.apply(load_config_text(pool_yaml(*members), "reload.yml")) == {}
            assert state(server, 1) == "up"
            assert await served(listen_addr(server), 10) == Counter(a=5, hung=5)
    finally:
        await stop_all(pool)


async def test_a_route_replaced_with_a_new_pool_stops_the_old_pools_probes() -> None:
    pool = await targets("a", "b")
    members = (member(pool[0].port), member(pool[1].port))
    port = dead_port()  # a fixed listening port: the replaced listener must let go of it first
    try:
        first = pool_yaml(*members, route=FAST_CHECK).replace('port: "0:9"', f'port: "{port}:9"')
        async with running(first) as server:
            old = server.pools["pool"]
            await wait_until(lambda: pool[0].accepted >= 1)  # probing
            # A new idle timeout replaces the route, a new `rise` makes it a new pool.
            second = first.replace("rise: 2", "rise: 3") + "    idle_timeout: 1h\n"
            assert await server.apply(load_config_text(second, "reload.yml")) == {}
            await drained_reloads(server)
            assert server.pools["pool"] is not old
            assert not old._probes, "the replaced pool still probes its targets"
            assert await greeted_by(listen_addr(server)) in {"a", "b"}
    finally:
        await stop_all(pool)


async def drained_reloads(server: Server) -> None:
    await asyncio.wait_for(asyncio.gather(*server._draining), 5)


async def test_an_ejected_target_is_offered_again_after_its_back_off_and_restored_by_a_dial() -> None:
    pool = await targets("a", "b", "c")
    try:
        async with running(pool_yaml(*(member(t.port) for t in pool))) as server:
            addr = listen_addr(server)
            await pool[2].stop()
            assert set(await served(addr, 12)) == {"a", "b"}
            ejected = server.pools["pool"].member_state(2)
            assert ejected.state == "down"
            await pool[2].start(pool[2].port)  # it is back, but its ejection (1 s) has not run out
            assert "c" not in await served(addr, 6)
            loop = asyncio.get_running_loop()
            await wait_until(lambda: loop.time() >= ejected.ejected_until)
            # Half-open: it is offered again, and the first successful dial restores it fully.
            assert (await served(addr, 30))["c"] >= 8
            assert state(server, 2) == "up"
    finally:
        await stop_all(pool)
