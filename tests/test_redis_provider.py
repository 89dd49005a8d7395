"""The Redis provider against a real redis-server: notifications, the re-read safety net, outages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import portway.providers.kv as kv
from portway.providers.redis import RedisProvider
from tests.kv_servers import LogWatch, RedisServer, until


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        redis.start()
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def prefix() -> str:
    """Each test its own prefix: the server is shared by the module."""
    return f"t-{uuid.uuid4().hex[:8]}/"


@asynccontextmanager
async def following(url: str, prefix: str, **options: Any) -> AsyncIterator[RedisProvider]:
    provider = RedisProvider(url, prefix=prefix, on_change=lambda: None, **options)
    provider.start()
    try:
        async with asyncio.timeout(5):
            await provider.synced.wait()
        yield provider
    finally:
        await provider.stop()


def route(port: int) -> str:
    return f"bind: 127.0.0.1\nport: {port}:22\n"


async def test_set_change_and_del_arrive_by_notification(server: RedisServer, prefix: str) -> None:
    server.command("SET", f"{prefix}routes/before", route(7200))
    # A long re-read interval: only a notification can deliver within the 2 s the test allows.
    async with following(server.url, prefix, poll_interval=60) as p:
        assert p.notifications and set(p.current.routes) == {"before"}
        assert p.current.origins["before"] == f"redis key {prefix}routes/before"
        server.command("SET", f"{prefix}routes/web", route(7201))
        await until(p, lambda: "web" in p.current.routes)
        server.command("SET", f"{prefix}routes/web", route(7202))
        await until(p, lambda: p.current.routes["web"].port.listening == 7202)
        server.command("DEL", f"{prefix}routes/web")
        await until(p, lambda: "web" not in p.current.routes)
        server.command("SET", f"{prefix}routes/brief", route(7203), "PX", "50")
        await until(p, lambda: "brief" in p.current.routes)
        await until(p, lambda: "brief" not in p.current.routes)  # expired: the route goes too


async def test_without_config_rights_changes_arrive_by_re_reading(
    server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    server.command("CONFIG", "SET", "notify-keyspace-events", "")
    user = f"u{uuid.uuid4().hex[:6]}"
    server.command("ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all", "-config")
    password = tmp_path / "password"
    password.write_text("secret\n")
    url = server.url.replace("redis://", f"redis://{user}@")
    with LogWatch("portway.redis") as logs:
        async with following(url, prefix, password_file=password, poll_interval=0.1) as p:
            assert not p.notifications
            server.command("SET", f"{prefix}routes/polled", route(7210))
            await until(p, lambda: "polled" in p.current.routes)
            server.command("DEL", f"{prefix}routes/polled")
            await until(p, lambda: "polled" not in p.current.routes)
    assert logs.count("keyspace notifications are off") == 1, logs.messages


async def test_a_bad_key_is_logged_once_across_re_reads(server: RedisServer, prefix: str) -> None:
    server.command("SET", f"{prefix}routes/good", route(7220))
    server.command("SET", f"{prefix}routes/bad", "port: 7221:22\nbogus: 1\n")
    with LogWatch("portway.redis") as logs:
        async with following(server.url, prefix, poll_interval=0.05) as p:
            for _ in range(5):  # five full re-reads of the same snapshot
                await p.next_snapshot()
            assert set(p.current.routes) == {"good"}
    [problem] = [m for m in logs.messages if "routes/bad" in m]
    assert problem.startswith(f"redis key {prefix}routes/bad: field 'bogus' at line 2: unknown key 'bogus'")
    assert problem.endswith("; skipped")


async def test_server_down_keeps_routes_and_changes_after_restart_arrive(
    server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv, "BACKOFF_MAX_S", 0.5)  # the schedule itself is tested purely
    server.command("SET", f"{prefix}routes/kept", route(7230))
    with LogWatch("portway.redis") as logs:
        async with following(server.url, prefix, poll_interval=60) as p:
            try:
                server.stop()
                await logs.wait("redis unreachable")
                assert set(p.current.routes) == {"kept"}, "the last good routes stay"
            finally:
                await asyncio.to_thread(server.start)
            # No persistence: the restarted server is empty until someone writes again.
            server.command("SET", f"{prefix}routes/new", route(7231))
            await until(p, lambda: set(p.current.routes) == {"new"}, within=5)
            await logs.wait("redis reachable again")
    assert logs.count("redis unreachable") == 1 and logs.count("redis reachable again") == 1
