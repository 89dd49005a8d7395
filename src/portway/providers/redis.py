"""Routes from a Redis server: keyspace notifications for speed, a periodic full re-read for truth.

Redis has no watch with a revision like etcd's: keyspace notifications are Pub/Sub messages, sent
once to whoever is subscribed at that instant and lost otherwise (a reconnect, a slow client
dropped by ``client-output-buffer-limit``). So they only say "look at this key now"; a full
re-read every ``poll_interval`` (5 s by default) is what guarantees the routes converge.

Order of a (re)connection: subscribe first, then read everything, so a change made during the
read is either in the read or in a notification that follows it (possibly both: harmless).

Notifications are off on a stock server (``notify-keyspace-events ""``). They are a server-wide
setting, so we add only the flags we need (``K`` keyspace channel, ``$`` string commands, ``g``
generic ones like DEL and RENAME, ``x`` expired, ``e`` evicted) to whatever is set, and never
remove any. Where ``CONFIG`` is not allowed (a managed service, an ACL without ``+config``) we
say so once and rely on the re-read; the operator can set the flags themselves.

Why redis-py: it is Redis's own Python client, maintained by Redis, with an asyncio API,
``rediss://`` TLS, ACL users and password in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from portway.providers.kv import KVRoutes, KVRouteTable, Outage, routes_prefix
from portway.providers.notify import SnapshotNotifier

__all__ = ["NOTIFY_FLAGS", "RedisProvider", "glob_escape", "notify_flags_to_set"]

log = logging.getLogger("portway.redis")

#: Keyspace channel plus the event classes that can change or remove a route key.
NOTIFY_FLAGS = "K$gxe"
#: A connection or command that takes longer than this counts as the server being unreachable.
CALL_TIMEOUT_S = 5.0
#: Keys per SCAN step and per MGET: bounds one reply's size whatever the store holds.
BATCH = 500


def glob_escape(text: str) -> str:
    """`text` as a literal inside a Redis glob pattern (SCAN MATCH, PSUBSCRIBE)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def notify_flags_to_set(current: str) -> str | None:
    """The ``notify-keyspace-events`` value that adds ours to `current`, or None if nothing is missing."""
    have = set(current)
    if "A" in have:  # A = g$lshzxe(t/d/m depending on version): all the event classes we need
        have |= set("g$lshzxe")
    missing = [flag for flag in NOTIFY_FLAGS if flag not in have]
    return current + "".join(missing) if missing else None


class RedisProvider(SnapshotNotifier):
    """Routes under `prefix` in one Redis database; ``current`` is always the last good snapshot.

    Same shape as ``DockerProvider``: ``start()`` on the running loop, ``await stop()``, and
    `on_change` called on the loop whenever the routes differ from the previous ones.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        on_change: Callable[[], None],
        password_file: Path | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        super().__init__(on_change)
        self.password_file = password_file
        self.poll_interval = poll_interval
        self.table = KVRouteTable("redis", prefix)
        #: Whether keyspace notifications are flowing on the current connection.
        self.notifications = False
        self._said_no_notifications = False
        self._task: asyncio.Task[None] | None = None
        self._keys = routes_prefix(prefix)

    @property
    def current(self) -> KVRoutes:
        return self.table.current

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-provider")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _applied(self, changed: bool, problems: list[str]) -> None:
        self.published(changed, problems, provider="redis", logger=log)

    # -- the loop

    async def _run(self) -> None:
        outage = Outage()
        while True:
            client: Any = None
            try:
                client = self._connect()
                await self._follow(client, outage)
            except (RedisError, OSError, _Unusable, ValueError) as exc:  # ValueError: a bad URL part
                first, wait = outage.failed()
                if first:
                    log.error(
                        f"redis unreachable, keeping the last known routes: {_reason(exc)}",
                        extra={"provider": "redis", "retry_s": wait},
                    )
                await asyncio.sleep(wait)
            finally:
                if client is not None:
                    await asyncio.shield(_close(client))

    def _connect(self) -> Any:
        password: str | None = None
        if self.password_file is not None:
            try:
                password = self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise _Unusable(f"cannot read password_file {self.password_file}: {exc.strerror}") from None
        kwargs: dict[str, Any] = {"socket_connect_timeout": CALL_TIMEOUT_S, "socket_timeout": CALL_TIMEOUT_S}
        if password is not None:
            kwargs["password"] = password
        return aioredis.Redis.from_url(self.url, **kwargs)

    async def _follow(self, client: Any, outage: Outage) -> None:
        """Subscribe, read everything, then apply notifications and re-read until the connection fails."""
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        channel_prefix = f"__keyspace@{db}__:".encode()
        pubsub = client.pubsub()
        try:
            self.notifications = await self._enable_notifications(client)
            if self.notifications:
                await pubsub.psubscribe(channel_prefix.decode() + glob_escape(self._keys) + "*")
            await self._read_all(client)
            if outage.succeeded():
                log.warning("redis reachable again", extra={"provider": "redis"})
            loop = asyncio.get_running_loop()
            next_read = loop.time() + self.poll_interval
            while True:
                wait = max(0.0, next_read - loop.time())
                if self.notifications:
                    changed = await self._notified_keys(pubsub, channel_prefix, wait)
                    if changed:
                        await self._read_keys(client, changed)
                else:
                    await asyncio.sleep(wait)
                if loop.time() >= next_read:
                    await self._read_all(client)
                    next_read = loop.time() + self.poll_interval
        finally:
            await asyncio.shield(_close(pubsub))

    async def _enable_notifications(self, client: Any) -> bool:
        try:
            current = (await client.config_get("notify-keyspace-events")).get("notify-keyspace-events", "")
            if isinstance(current, bytes):
                current = current.decode()
            wanted = notify_flags_to_set(current)
            if wanted is not None:
                await client.config_set("notify-keyspace-events", wanted)
        except ResponseError as exc:  # CONFIG renamed, disabled, or not allowed to this user
            if not self._said_no_notifications:
                log.warning(
                    f"redis keyspace notifications are off and cannot be enabled ({exc}); changes arrive "
                    f"with the next full read, every {self.poll_interval:g} s. Set notify-keyspace-events "
                    f"to include {NOTIFY_FLAGS} on the server for changes within milliseconds",
                    extra={"provider": "redis"},
                )
                self._said_no_notifications = True
            return False
        return True

    async def _notified_keys(self, pubsub: Any, channel_prefix: bytes, wait: float) -> set[str]:
        """Keys named by notifications: wait up to `wait` for one, then take what else is queued."""
        keys: set[str] = set()
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
        while message is not None:
            channel = message.get("channel") or b""
            if isinstance(channel, bytes) and channel.startswith(channel_prefix):
                keys.add(channel[len(channel_prefix) :].decode("utf-8", errors="replace"))
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
        return keys

    async def _read_all(self, client: Any) -> None:
        keys = [key async for key in client.scan_iter(match=glob_escape(self._keys) + "*", count=BATCH)]
        values = await self._mget(client, keys)
        pairs = zip(keys, values, strict=True)
        items = {k.decode("utf-8", errors="replace"): v for k, v in pairs if v is not None}
        self._applied(*self.table.replace(items))

    async def _read_keys(self, client: Any, keys: set[str]) -> None:
        ordered = sorted(keys)
        values = await self._mget(client, [k.encode() for k in ordered])
        puts = {k: v for k, v in zip(ordered, values, strict=True) if v is not None}
        self._applied(*self.table.apply(puts, {k for k, v in zip(ordered, values, strict=True) if v is None}))

    async def _mget(self, client: Any, keys: Iterable[bytes]) -> list[bytes | None]:
        keys = list(keys)
        values: list[bytes | None] = []
        for i in range(0, len(keys), BATCH):
            for value in await client.mget(keys[i : i + BATCH]):
                # MGET answers nil for a key that is not a string (a list under our prefix): no route.
                values.append(value if isinstance(value, bytes) or value is None else None)
        return values


class _Unusable(Exception):
    """Something on our side stops us from connecting (an unreadable password file)."""


async def _close(closable: Any) -> None:
    with contextlib.suppress(RedisError, OSError):  # the connection is already gone
        await closable.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
