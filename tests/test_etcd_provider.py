"""The etcd provider against a real three-member cluster: follow, survive members and outages, compaction."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import portway.providers.kv as kv
from portway.app import LiveServer
from portway.providers.etcd import EtcdProvider
from tests.conftest import current_loop_kind
from tests.kv_servers import EtcdCluster, LogWatch, TLSFiles, until
from tests.ports import free_port
from tests.portway_process import PortwayProcess, run_cli
from tests.targets import TCPEchoTarget


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
def prefix() -> str:
    """Each test its own prefix: the cluster is shared by the module."""
    return f"/t-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outage tests need not wait out the 30 s back-off ceiling (its schedule is tested purely)."""
    monkeypatch.setattr(kv, "BACKOFF_MAX_S", 0.5)


@asynccontextmanager
async def following(cluster: EtcdCluster, prefix: str) -> AsyncIterator[EtcdProvider]:
    changes = asyncio.Event()
    provider = EtcdProvider(cluster.followers_first(), prefix=prefix, on_change=changes.set)
    provider.start()
    try:
        async with asyncio.timeout(5):
            await provider.synced.wait()
        yield provider
    finally:
        await provider.stop()


def route(port: int, target: int = 22) -> str:
    return f"bind: 127.0.0.1\nport: {port}:{target}\n"


async def test_put_change_and_delete_arrive_within_two_seconds(cluster: EtcdCluster, prefix: str) -> None:
    cluster.put(f"{prefix}routes/before", route(7100))
    async with following(cluster, prefix) as p:
        assert set(p.current.routes) == {"before"}, "the initial read"
        assert p.current.origins["before"] == f"etcd key {prefix}routes/before"
        cluster.put(f"{prefix}routes/web", route(7101))
        await until(p, lambda: "web" in p.current.routes)
        cluster.put(f"{prefix}routes/web", route(7102))
        await until(p, lambda: p.current.routes["web"].port.listening == 7102)
        cluster.delete(f"{prefix}routes/web")
        await until(p, lambda: "web" not in p.current.routes)
        cluster.put(f"{prefix}other/web", route(7103))  # not under routes/: ignored
        cluster.put(f"{prefix}routes/last", route(7104))
        await until(p, lambda: "last" in p.current.routes)
        assert set(p.current.routes) == {"before", "last"}


async def test_a_bad_key_is_logged_once_and_skipped(cluster: EtcdCluster, prefix: str) -> None:
    with LogWatch("portway.etcd") as logs:
        cluster.put(f"{prefix}routes/good", route(7110))
        cluster.put(f"{prefix}routes/db", "port: 7111:nosuchservice\n")
        async with following(cluster, prefix) as p:
            assert set(p.current.routes) == {"good"}
            cluster.put(f"{prefix}routes/more", route(7112))
            await until(p, lambda: "more" in p.current.routes)
            bad = f"etcd key {prefix}routes/db: field 'port' at line 1:"
            assert logs.count(bad) == 1, logs.messages
            cluster.put(f"{prefix}routes/db", route(7113))
            await until(p, lambda: "db" in p.current.routes)
    assert logs.count(bad) == 1


async def test_one_member_killed_and_the_watch_goes_on(cluster: EtcdCluster, prefix: str) -> None:
    async with following(cluster, prefix) as p:
        watched = cluster.member(p.endpoint)
        try:
            cluster.kill(watched)
            cluster.put(f"{prefix}routes/after", route(7120))
            await until(p, lambda: "after" in p.current.routes)
            assert p.endpoint != watched.client_url
        finally:
            await asyncio.to_thread(cluster.revive)


async def test_a_watch_resumed_after_compaction_reads_everything_again(
    cluster: EtcdCluster, prefix: str
) -> None:
    async with following(cluster, prefix) as p:
        watched = cluster.member(p.endpoint)
        cluster.pause(watched)  # the watch stalls: what happens next reaches the provider late
        try:
            cluster.put(f"{prefix}routes/one", route(7130))
            revision = cluster.put(f"{prefix}routes/two", route(7131))
            cluster.compact(revision)  # the history the watch would resume from is gone
            with LogWatch("portway.etcd") as logs:
                cluster.kill(watched)
                await until(p, lambda: {"one", "two"} <= set(p.current.routes))
            assert logs.count("compacted") == 1, logs.messages
            cluster.put(f"{prefix}routes/three", route(7132))
            await until(p, lambda: "three" in p.current.routes)
        finally:
            await asyncio.to_thread(cluster.revive)


@pytest.mark.usefixtures("quick_retries")
async def test_whole_store_down_keeps_routes_and_changes_after_restart_arrive(
    cluster: EtcdCluster, prefix: str
) -> None:
    with LogWatch("portway.etcd") as logs:
        cluster.put(f"{prefix}routes/kept", route(7140))
        async with following(cluster, prefix) as p:
            try:
                cluster.kill_all()
                await logs.wait("etcd unreachable")
                assert set(p.current.routes) == {"kept"}, "the last good routes stay"
            finally:
                await asyncio.to_thread(cluster.revive)
            cluster.put(f"{prefix}routes/new", route(7141))
            await until(p, lambda: "new" in p.current.routes, within=5)
            await logs.wait("etcd reachable again")
    assert logs.count("etcd unreachable") == 1 and logs.count("etcd reachable again") == 1


async def test_live_server_serves_a_route_put_in_etcd(
    tmp_path: Path, cluster: EtcdCluster, prefix: str, tcp_echo: TCPEchoTarget, both_tcp_engines: str
) -> None:
    main = tmp_path / "portway.yml"
    endpoints = ", ".join(cluster.endpoints)
    main.write_text(f"grace_period: 1s\nproviders:\n  etcd: {{endpoints: [{endpoints}], prefix: {prefix}}}\n")
    app = LiveServer(main)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(app.run(stop, shutdown_grace=0.5))
    try:
        async with asyncio.timeout(5):
            await app.ready.wait()
        server = app.server
        assert server is not None
        listen = free_port()
        echo = f"bind: 127.0.0.1\nhost: 127.0.0.1\nport: {listen}:{tcp_echo.port}\n"
        cluster.put(f"{prefix}routes/echo", echo)
        await app.wait_for(lambda: "echo" in server.streams, within=2)
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        writer.write(b"first")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
        cluster.put(f"{prefix}routes/other", route(free_port(), tcp_echo.port))
        await app.wait_for(lambda: "other" in server.streams, within=2)
        writer.write(b"still")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still", "an unrelated change kept it"
        # New settings for the same store: the routes stay while the new connection reads them.
        reordered = list(reversed(cluster.endpoints))
        main.write_text(main.read_text().replace(endpoints, ", ".join(reordered)))
        await app.wait_for(lambda: app.stores.running["etcd"][0] == _etcd_settings(app, reordered), within=5)
        assert "echo" in server.streams
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"again", "a settings change kept it"
        writer.close()
        cluster.delete(f"{prefix}routes/echo")
        await app.wait_for(lambda: "echo" not in server.streams, within=2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member that serves HTTPS and wants a client certificate signed by its CA."""
    root = tmp_path_factory.mktemp("etcd-tls")
    etcd = EtcdCluster(root, size=1, tls=TLSFiles.make(root))
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member with authentication on and a user that may only read /secured/."""
    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd-auth"), size=1)
    try:
        etcd.start()
        etcd.add_reader("portway", "reader-secret", "/secured/")
        etcd.enable_auth("root-secret")
        yield etcd
    finally:
        etcd.stop()


async def test_tls_with_a_client_certificate(secured: EtcdCluster, prefix: str) -> None:
    tls = secured.tls
    assert tls is not None
    secured.put(f"{prefix}routes/safe", route(7150))
    provider = EtcdProvider(
        secured.endpoints,
        prefix=prefix,
        on_change=lambda: None,
        ca=tls.ca,
        cert=tls.client_cert,
        key=tls.client_key,
    )
    provider.start()
    try:
        async with asyncio.timeout(5):
            await provider.synced.wait()
        assert set(provider.current.routes) == {"safe"}
        secured.put(f"{prefix}routes/watched", route(7151))
        await until(provider, lambda: "watched" in provider.current.routes)
    finally:
        await provider.stop()


def reader(cluster: EtcdCluster, prefix: str, password_file: Path) -> EtcdProvider:
    return EtcdProvider(
        cluster.endpoints,
        prefix=prefix,
        on_change=lambda: None,
        username="portway",
        password_file=password_file,
    )


async def test_username_and_password_file(authed: EtcdCluster, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("reader-secret\n")
    prefix = f"/secured/{uuid.uuid4().hex[:8]}/"
    authed.put(f"{prefix}routes/safe", route(7160))
    provider = reader(authed, prefix, password)
    provider.start()
    try:
        async with asyncio.timeout(5):
            await provider.synced.wait()
        assert set(provider.current.routes) == {"safe"}
        authed.put(f"{prefix}routes/watched", route(7161))
        await until(provider, lambda: "watched" in provider.current.routes)
    finally:
        await provider.stop()


async def test_a_wrong_password_is_an_outage_that_says_why(authed: EtcdCluster, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("wrong\n")
    provider = reader(authed, "/secured/", password)
    with LogWatch("portway.etcd") as logs:
        provider.start()
        try:
            await logs.wait("etcd unreachable")
        finally:
            await provider.stop()
    [line] = [m for m in logs.messages if "unreachable" in m]
    assert "authenticate: HTTP" in line and "authentication failed" in line, line
    assert not provider.synced.is_set()


def _etcd_settings(app: LiveServer, endpoints: list[str]) -> object:
    """The etcd settings the app's config now holds, if they list `endpoints`; None otherwise."""
    assert app.sources is not None
    settings = app.sources.config.providers.etcd
    return settings if settings is not None and settings.endpoints == endpoints else None


async def echo_through(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readexactly(len(data)), 5)
    finally:
        writer.close()


async def every_worker_logged(pw: PortwayProcess, event: str, workers: int, after: int) -> None:
    """Wait until `event` was logged `workers` times after record `after` (once per worker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while sum(r.get("event") == event for r in pw.records[after:]) < workers:
        await pw.wait_for(event, timeout=max(0.01, deadline - loop.time()), after=len(pw.records))


async def test_two_portway_processes_follow_the_same_store(
    tmp_path: Path, cluster: EtcdCluster, prefix: str, tcp_echo: TCPEchoTarget
) -> None:
    """A fleet in miniature: two `portway serve` processes, one with two workers fed by its control
    plane, one store; every change reaches every worker of both within 2 s."""
    endpoints = ", ".join(cluster.endpoints)
    fleet: list[tuple[PortwayProcess, int]] = []
    for workers in (1, 2):
        config = tmp_path / f"portway-{workers}.yml"
        config.write_text(
            f"workers: {workers}\nproviders:\n  etcd: {{endpoints: [{endpoints}], prefix: {prefix}}}\n"
        )
        fleet.append((await PortwayProcess.serve(config, current_loop_kind()), workers))
    try:
        for pw, workers in fleet:
            await pw.wait_for("portway serving" if workers == 1 else "workers serving", timeout=20)
        # Port 0: both instances run on this one machine, so each takes a free port of its own
        # (and the control plane of the one with two workers picks one for both of them).
        fleet_route = f"bind: 127.0.0.1\nhost: 127.0.0.1\nport: 0:{tcp_echo.port}\n"
        marks = [len(pw.records) for pw, _ in fleet]
        cluster.put(f"{prefix}routes/fleet", fleet_route)
        for (pw, workers), mark in zip(fleet, marks, strict=True):
            await every_worker_logged(pw, "route started", workers, mark)
            assert len({r["listen"] for r in pw.records[mark:] if r.get("event") == "route started"}) == 1
            for i in range(4):
                assert await echo_through(pw.port_of("fleet"), b"hello%d" % i) == b"hello%d" % i
        marks = [len(pw.records) for pw, _ in fleet]
        cluster.put(f"{prefix}routes/fleet", fleet_route + "idle_timeout: 1m\n")
        for (pw, workers), mark in zip(fleet, marks, strict=True):
            await every_worker_logged(pw, "route started", workers, mark)
            assert await echo_through(pw.port_of("fleet"), b"again") == b"again"
        marks = [len(pw.records) for pw, _ in fleet]
        cluster.delete(f"{prefix}routes/fleet")
        for (pw, workers), mark in zip(fleet, marks, strict=True):
            await every_worker_logged(pw, "route removed, draining", workers, mark)
    finally:
        for pw, _ in fleet:
            assert await pw.stop() == 0


async def test_a_server_that_is_not_etcd_is_an_outage_not_a_dead_provider() -> None:
    async def not_etcd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_etcd, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = EtcdProvider([f"http://127.0.0.1:{port}"], prefix="/p/", on_change=lambda: None)
    try:
        with LogWatch("portway.etcd") as logs:
            provider.start()
            await logs.wait("etcd unreachable")
        [line] = [m for m in logs.messages if "unreachable" in m]
        assert "KeyError" in line, line
        assert provider._task is not None and not provider._task.done(), "still retrying"
    finally:
        await provider.stop()
        server.close()


async def test_check_with_providers_shows_every_source(
    tmp_path: Path, cluster: EtcdCluster, prefix: str
) -> None:
    endpoints = ", ".join(cluster.endpoints)
    config = tmp_path / "portway.yml"
    config.write_text(
        f"providers:\n  etcd: {{endpoints: [{endpoints}], prefix: {prefix}}}\n"
        "routes:\n  infile:\n    host: 127.0.0.1\n    port: 0:22\n"
    )
    cluster.put(f"{prefix}routes/instore", "bind: 127.0.0.1\nhost: 127.0.0.1\nport: 0:23\n")
    status, out, err = await run_cli("check", "-c", str(config), "--offline", "--providers")
    assert status == 0, err
    sources = out.split("ROUTE  ", 2)[2].splitlines()[1:3]
    assert sources[0].startswith("infile") and str(config) in sources[0]
    assert sources[1].startswith("instore") and f"{prefix}routes/instore" in sources[1]
    assert out.rstrip().endswith("2 route(s) from every source, OK")
    # Without the flag, check reads the file alone (it runs where the stores may be unreachable).
    status, out, _err = await run_cli("check", "-c", str(config), "--offline")
    assert status == 0 and "instore" not in out


async def test_check_with_an_unreachable_store_says_its_routes_are_missing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    config = tmp_path / "portway.yml"
    config.write_text(f"providers:\n  etcd: {{endpoints: [http://127.0.0.1:{dead}]}}\n")
    status, _out, err = await run_cli("check", "-c", str(config), "--providers", "--provider-timeout", "0.5")
    assert status == 1
    assert "portway: error: etcd provider: no answer within 0.5s; its routes are missing" in err


async def test_a_restarted_control_plane_keeps_the_store_routes_up(
    tmp_path: Path, cluster: EtcdCluster, prefix: str, tcp_echo: TCPEchoTarget
) -> None:
    """Its first route set waits for the store: the workers never see the store's routes vanish."""
    endpoints = ", ".join(cluster.endpoints)
    config = tmp_path / "portway.yml"
    config.write_text(f"workers: 2\nproviders:\n  etcd: {{endpoints: [{endpoints}], prefix: {prefix}}}\n")
    pw = await PortwayProcess.serve(config, current_loop_kind())
    try:
        ready = await pw.wait_for("workers serving", timeout=20)
        mark = len(pw.records)
        cluster.put(f"{prefix}routes/kept", f"bind: 127.0.0.1\nhost: 127.0.0.1\nport: 0:{tcp_echo.port}\n")
        await every_worker_logged(pw, "route started", 2, mark)
        port = pw.port_of("kept")
        children = pw.children()
        (control,) = set(children) - set(ready["pids"])
        mark = len(pw.records)
        os.kill(control, signal.SIGKILL)
        await pw.wait_for("control plane serving", after=mark, timeout=10)
        cluster.put(f"{prefix}routes/later", f"bind: 127.0.0.1\nhost: 127.0.0.1\nport: 0:{tcp_echo.port}\n")
        await every_worker_logged(pw, "route started", 2, mark)
        events = [(r.get("event"), r.get("route")) for r in pw.records[mark:]]
        assert ("route removed, draining", "kept") not in events
        assert {route for event, route in events if event == "route started"} == {"later"}
        assert await echo_through(port, b"kept") == b"kept"
    finally:
        assert await pw.stop() == 0
