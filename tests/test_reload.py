"""Live reload: the diff rules, and `Server.apply` on real loopback sockets.

Each test holds a proxied connection open across a reload and checks it keeps working on the
settings it started with, that new connections get the new settings, and that nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from portway.config.schema import Config, RouteConfig
from portway.reload import plan_reload
from portway.server import Server
from tests.conftest import current_loop_kind
from tests.ports import free_port
from tests.targets import TCPEchoTarget


def route(**fields: str) -> RouteConfig:
    return RouteConfig.model_validate({"scheme": "tcp4", "bind": "127.0.0.1", **fields})


def config(grace: str = "5s", **routes: RouteConfig) -> Config:
    return Config(routes=routes, grace_period=grace)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the pure diff -------------------------------------------------------------------------------


def test_plan_sorts_routes_by_what_happens_to_them() -> None:
    old = {
        "keep": route(port="1000:1"),
        "edit": route(port="1001:1"),
        "gone": route(port="1002:1"),
        "pool": route(port="1004:1"),
    }
    new = {
        "keep": route(port="1000:1"),
        "edit": route(port="1001:1", idle_timeout="5s"),
        "fresh": route(port="1003:1"),
        "pool": route(port="1004:2", host="127.0.0.2"),
    }
    plan = plan_reload(old, new)
    assert (plan.unchanged, plan.changed, plan.removed, plan.added, plan.retargeted) == (
        ("keep",),
        ("edit",),
        ("gone",),
        ("fresh",),
        ("pool",),  # only its target moved: updated in place, the listener stays
    )
    assert plan.release_first == ("edit",)  # it keeps port 1001, so the old listener goes first
    assert plan.to_start == ("edit", "fresh")


def test_plan_equal_values_written_differently_are_unchanged() -> None:
    old = {"a": route(port="2222:22", connect_timeout="5s")}
    new = {"a": route(port=" 2222:22", connect_timeout="5000ms")}
    assert plan_reload(old, new).is_empty


def test_plan_changed_route_moving_port_keeps_old_listener_until_new_one_listens() -> None:
    plan = plan_reload({"a": route(port="1000:1")}, {"a": route(port="1001:1")})
    assert plan.changed == ("a",)
    assert plan.release_first == ()


def test_plan_swapping_ports_releases_both_first() -> None:
    old = {"a": route(port="1000:1"), "b": route(port="1001:2")}
    new = {"a": route(port="1001:1"), "b": route(port="1000:2")}
    assert plan_reload(old, new).release_first == ("a", "b")


def test_plan_replace_all_changes_every_kept_route() -> None:
    old = {"a": route(port="1000:1")}
    assert plan_reload(old, dict(old), replace_all=True).changed == ("a",)


# --- Server.apply on real sockets ---------------------------------------------------------------


@pytest.fixture
async def second_echo() -> AsyncIterator[TCPEchoTarget]:
    target = TCPEchoTarget()
    await target.start()
    yield target
    await target.stop()


async def connect(server: Server, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = server.streams[name].local_addr
    assert addr is not None
    return await asyncio.open_connection(addr[0], addr[1])


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def drained(server: Server) -> None:
    """Wait for every stream a reload retired to finish draining."""
    await asyncio.wait_for(asyncio.gather(*server._draining), 5)


async def test_reload_of_an_unrelated_route_leaves_held_connection_alone(
    tcp_echo: TCPEchoTarget, second_echo: TCPEchoTarget
) -> None:
    server = Server(config(a=route(port=f"0:{tcp_echo.port}"), b=route(port=f"0:{tcp_echo.port}")))
    await server.start()
    try:
        reader, writer = await connect(server, "a")
        assert await echo(reader, writer, b"before") == b"before"
        stream_a, fds = server.streams["a"], open_fds()

        failed = await server.apply(
            config(a=route(port=f"0:{tcp_echo.port}"), b=route(port=f"0:{second_echo.port}"))
        )
        await drained(server)

        assert failed == {}
        assert server.streams["a"] is stream_a  # same listener, same connections
        assert await echo(reader, writer, b"after") == b"after"
        b_reader, b_writer = await connect(server, "b")
        assert await echo(b_reader, b_writer, b"new") == b"new"
        assert second_echo.accepted == 1
        await close(b_writer)
        await asyncio.wait_for(_until(lambda: not server.streams["b"].conns and not second_echo.live), 5)
        assert open_fds() <= fds  # b's new listener replaced b's old one
        await close(writer)
    finally:
        await server.stop()


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "new-port"])
async def test_changed_route_keeps_held_connection_on_old_settings(
    tcp_echo: TCPEchoTarget, second_echo: TCPEchoTarget, same_port: bool
) -> None:
    port = free_port()
    server = Server(config(a=route(port=f"{port}:{tcp_echo.port}")))
    await server.start()
    try:
        reader, writer = await connect(server, "a")
        assert await echo(reader, writer, b"one") == b"one"
        baseline = open_fds()
        new_port = port if same_port else free_port()

        assert await server.apply(config(a=route(port=f"{new_port}:{second_echo.port}"))) == {}

        # The held connection still talks to the first target...
        assert await echo(reader, writer, b"two") == b"two"
        assert (tcp_echo.accepted, second_echo.accepted) == (1, 0)
        # ...while a new one is accepted by the new listener and goes to the second.
        assert server.streams["a"].local_addr == ("127.0.0.1", new_port)
        new_reader, new_writer = await asyncio.open_connection("127.0.0.1", new_port)
        assert await echo(new_reader, new_writer, b"three") == b"three"
        assert second_echo.accepted == 1
        if not same_port:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)

        # When the held connection ends, the old stream finishes draining and frees everything.
        await close(writer)
        await drained(server)
        await close(new_writer)
        await asyncio.wait_for(_until(lambda: not server.streams["a"].conns and not second_echo.live), 5)
        assert open_fds() <= baseline
    finally:
        await server.stop()


async def _until(predicate: Callable[[], bool]) -> None:
    # Teardown after the client's close has no event to await (connection_lost runs on the
    # loop's next turns); poll in small steps, bounded by the caller's wait_for.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def test_removed_route_stops_accepting_and_drains(tcp_echo: TCPEchoTarget) -> None:
    server = Server(config(a=route(port=f"0:{tcp_echo.port}"), b=route(port=f"0:{tcp_echo.port}")))
    await server.start()
    try:
        addr = server.streams["a"].local_addr
        assert addr is not None
        reader, writer = await connect(server, "a")
        assert await echo(reader, writer, b"x") == b"x"

        await server.apply(config(b=route(port=f"0:{tcp_echo.port}")))

        assert "a" not in server.streams
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*addr)
        assert await echo(reader, writer, b"still here") == b"still here"
        await close(writer)
        await drained(server)
    finally:
        await server.stop()


async def test_removed_route_closes_held_connection_after_grace(tcp_echo: TCPEchoTarget) -> None:
    server = Server(config(grace="200ms", a=route(port=f"0:{tcp_echo.port}")))
    await server.start()
    try:
        reader, writer = await connect(server, "a")
        assert await echo(reader, writer, b"x") == b"x"
        await server.apply(config(grace="200ms"))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy closed it at the deadline
        await drained(server)
        await close(writer)
    finally:
        await server.stop()


async def test_port_conflict_fails_only_that_route(
    tcp_echo: TCPEchoTarget, caplog: pytest.LogCaptureFixture
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    server = Server(config(a=route(port=f"0:{tcp_echo.port}")))
    await server.start()
    try:
        held_reader, held_writer = await connect(server, "a")
        with caplog.at_level(logging.ERROR, logger="portway"):
            failed = await server.apply(
                config(
                    a=route(port=f"{busy}:{tcp_echo.port}"),  # changed onto a taken port
                    b=route(port=f"{busy}:{tcp_echo.port}", bind="127.0.0.2"),  # fine
                    c=route(port=f"{busy}:{tcp_echo.port}", scheme="tcp4"),  # overlaps a: rejected
                )
            )
        assert set(failed) == {"a", "c"}
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert {r.route for r in errors} == {"a", "c"}  # type: ignore[attr-defined]
        assert all(f"127.0.0.1:{busy}" in r.listen for r in errors)  # type: ignore[attr-defined]
        assert "previous version keeps serving" in next(r.getMessage() for r in errors if r.route == "a")  # type: ignore[attr-defined]
        # a keeps its old listener and its connection; b started; c is absent.
        assert await echo(held_reader, held_writer, b"ok") == b"ok"
        assert server.config.routes["a"].port.listening == 0
        b_reader, b_writer = await connect(server, "b")
        assert await echo(b_reader, b_writer, b"b") == b"b"
        assert sorted(server.streams) == ["a", "b"]
        await close(b_writer)
        await close(held_writer)
    finally:
        taken.close()
        await server.stop()


async def test_failed_route_is_retried_by_the_next_reload(tcp_echo: TCPEchoTarget) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    wanted = config(a=route(port=f"{busy}:{tcp_echo.port}"))
    server = Server(config())
    await server.start()
    try:
        assert set(await server.apply(wanted)) == {"a"}
        taken.close()
        assert await server.apply(wanted) == {}
        assert server.streams["a"].local_addr == ("127.0.0.1", busy)
    finally:
        taken.close()
        await server.stop()


# --- the CLI: SIGHUP and file watching -----------------------------------------------------------


class Portway:
    """`portway serve` as a subprocess, with its stderr log read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def expect(self, text: str, within: float = 10.0) -> str:
        assert self.proc.stderr is not None
        async with asyncio.timeout(within):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"portway exited waiting for {text!r}:\n" + "".join(self.lines))
                line = raw.decode()
                self.lines.append(line)
                if text in line:
                    return line


async def start_portway(main: Path) -> Portway:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "portway",
        "serve",
        "-c",
        str(main),
        "--loop",
        current_loop_kind(),
        "--grace",
        "1",
        stderr=subprocess.PIPE,
    )
    app = Portway(proc)
    await app.expect("portway serving")
    return app


async def stop_portway(app: Portway) -> None:
    if app.proc.returncode is None:
        app.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(app.proc.wait(), 10) == 0


def yaml_routes(**ports: tuple[int, int]) -> str:
    lines = ["grace_period: 2s", "routes:"]
    for name, (listen, target) in ports.items():
        lines += [f"  {name}:", "    scheme: tcp4", "    bind: 127.0.0.1", f'    port: "{listen}:{target}"']
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("trigger", ["sighup", "file-change"])
async def test_cli_reloads_on_sighup_and_on_file_change(
    tmp_path: Path, tcp_echo: TCPEchoTarget, second_echo: TCPEchoTarget, trigger: str
) -> None:
    main = tmp_path / "portway.yml"
    port_a, port_b = free_port(), free_port()
    main.write_text(yaml_routes(a=(port_a, tcp_echo.port)))
    app = await start_portway(main)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_a)
        assert await echo(reader, writer, b"held") == b"held"

        new = yaml_routes(a=(port_a, tcp_echo.port), b=(port_b, second_echo.port))
        if trigger == "sighup":
            # Write elsewhere and rename over: the watcher may see it too; either way one reload.
            main.with_suffix(".tmp").write_text(new)
            os.replace(main.with_suffix(".tmp"), main)
            app.proc.send_signal(signal.SIGHUP)
        else:
            main.write_text(new)
        await app.expect("reload applied")

        b_reader, b_writer = await asyncio.open_connection("127.0.0.1", port_b)
        assert await echo(b_reader, b_writer, b"b") == b"b"
        assert await echo(reader, writer, b"still") == b"still"
        await close(b_writer)
        await close(writer)
    finally:
        await stop_portway(app)


async def test_cli_invalid_reload_changes_nothing_and_names_the_error(
    tmp_path: Path, tcp_echo: TCPEchoTarget
) -> None:
    main = tmp_path / "portway.yml"
    port_a = free_port()
    main.write_text(yaml_routes(a=(port_a, tcp_echo.port)))
    app = await start_portway(main)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_a)
        main.write_text(yaml_routes(a=(port_a, tcp_echo.port)).replace("scheme: tcp4", "scheme: tcpx"))
        line = await app.expect("reload refused")
        assert str(main) in line
        assert "route=a" in line
        assert "field=scheme" in line
        assert await echo(reader, writer, b"unchanged") == b"unchanged"
        await close(writer)
    finally:
        await stop_portway(app)


async def test_cli_watches_included_files(tmp_path: Path, tcp_echo: TCPEchoTarget) -> None:
    main = tmp_path / "portway.yml"
    (tmp_path / "routes").mkdir()
    included = tmp_path / "routes" / "extra.yml"
    port_a, port_b = free_port(), free_port()
    main.write_text("providers:\n  include: [routes/extra.yml]\n" + yaml_routes(a=(port_a, tcp_echo.port)))
    included.write_text("")
    app = await start_portway(main)
    try:
        included.write_text(f'b:\n  scheme: tcp4\n  bind: 127.0.0.1\n  port: "{port_b}:{tcp_echo.port}"\n')
        await app.expect("reload applied")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_b)
        assert await echo(reader, writer, b"included") == b"included"
        await close(writer)
    finally:
        await stop_portway(app)


async def _admitted(server: Server, name: str, source: str) -> bool:
    """Whether a client from `source` gets an echo through route `name`."""
    addr = server.streams[name].local_addr
    assert addr is not None
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, addr)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"hi")
        return await asyncio.wait_for(reader.read(2), 5) == b"hi"
    except ConnectionResetError:
        return False
    finally:
        writer.close()


async def test_reload_applies_the_global_acl_to_new_and_rebuilt_routes(tcp_echo: TCPEchoTarget) -> None:
    deny = {"deny": ["ip:127.0.0.66"]}
    first = Config.model_validate({"acl": deny, "routes": {"a": route(port=f"0:{tcp_echo.port}")}})
    server = Server(first)
    await server.start()
    try:
        assert not await _admitted(server, "a", "127.0.0.66")
        # A route added by a reload is held to the same global ACL.
        second = Config.model_validate(
            {"acl": deny, "routes": {"a": first.routes["a"], "b": route(port=f"0:{tcp_echo.port}")}}
        )
        assert await server.apply(second) == {}
        assert not await _admitted(server, "b", "127.0.0.66")
        assert await _admitted(server, "b", "127.0.0.65")
        # Dropping the global ACL rebuilds every route without it.
        third = Config.model_validate({"routes": second.routes})
        assert await server.apply(third) == {}
        await drained(server)
        assert await _admitted(server, "a", "127.0.0.66")
        assert await _admitted(server, "b", "127.0.0.66")
    finally:
        await server.stop()
