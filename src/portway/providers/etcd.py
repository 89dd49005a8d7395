"""Routes from an etcd v3 cluster, through etcd's JSON gateway over HTTP (``/v3/kv/range``, ``/v3/watch``).

Why the gateway and httpx rather than an etcd client library: no asyncio etcd v3 client on PyPI is
kept up to date (``etcd3`` is unmaintained and pins an old protobuf, ``aetcd`` and ``etcd3gw`` are
barely maintained), and the gateway is part of every etcd server since 3.3, stable under ``/v3/``.
We need three calls (authenticate, range, watch); httpx gives HTTP/1.1 streaming, TLS with client
certificates and timeouts, so the whole client is the few functions below.

The protocol, and why no change is lost:

1. Range-read everything under the prefix; the reply's header carries the store revision R.
2. Watch the prefix from revision R + 1: etcd replays every change after the read, then streams new
   ones. Each event's ``mod_revision`` is remembered, so a watch that breaks (its member died) is
   resumed from the next revision on another member, again without a gap.
3. If etcd has compacted the history we would resume from, the watch is canceled with
   ``compact_revision``: the deltas are gone, so we read everything again and watch from there.

Every endpoint is used: a call that fails on one member goes to the next, and the member that
answered is preferred afterwards. Only when no member answers is the store "unreachable": the last
routes keep serving, we retry with back-off and log the outage and the recovery once each.

Not detected: a member that stops answering without closing the connection (a partitioned host)
stalls the watch until TCP gives up; killed or restarted members close it and are handled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from portway.providers.kv import KVRoutes, KVRouteTable, Outage
from portway.providers.notify import SnapshotNotifier

__all__ = ["EtcdProvider", "prefix_range_end"]

log = logging.getLogger("portway.etcd")

#: A call that takes longer than this on one member is tried on the next one.
CALL_TIMEOUT_S = 5.0
#: Pause before resuming a lost watch: a member that accepts watches and drops them at once must
#: not make us spin, and a tenth of a second is nothing next to a member's restart.
LOST_WATCH_PAUSE_S = 0.1


class _StoreError(Exception):
    """No member could do what we asked; the message says why (for the outage log line)."""


class _Compacted(Exception):
    """The revision we wanted to watch from is compacted away: read everything again."""


class _WatchLost(Exception):
    """The watch stream ended or broke; resume it elsewhere from the last revision seen."""


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with `prefix` (etcd's "prefix" rule)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _key(kv: dict[str, Any]) -> str:
    return _unb64(kv.get("key")).decode("utf-8", errors="replace")


class EtcdProvider(SnapshotNotifier):
    """Routes under `prefix` in an etcd cluster; ``current`` is always the last good snapshot.

    Same shape as ``DockerProvider``: ``start()`` on the running loop, ``await stop()``, and
    `on_change` called on the loop whenever the routes differ from the previous ones.
    """

    name = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str,
        on_change: Callable[[], None],
        username: str | None = None,
        password_file: Path | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        self.prefix = prefix
        super().__init__(on_change)
        self.username = username
        self.password_file = password_file
        self.ca, self.cert, self.key = ca, cert, key
        self.table = KVRouteTable("etcd", prefix)
        #: The endpoint that answered last, tried first next time.
        self.endpoint = self.endpoints[0]
        #: The next revision the watch resumes from (0 before the first read).
        self.next_revision = 0
        self._task: asyncio.Task[None] | None = None
        self._key_bytes = prefix.encode()

    @property
    def current(self) -> KVRoutes:
        return self.table.current

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-provider")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- applying what the store says

    def _applied(self, changed: bool, problems: list[str]) -> None:
        self.published(changed, problems, provider="etcd", logger=log)

    # -- the loop

    async def _run(self) -> None:
        outage = Outage()
        while True:
            try:
                async with self._client() as client:
                    while True:
                        if self.next_revision == 0:
                            await self._read_all(client)
                            if outage.succeeded():
                                log.warning("etcd reachable again", extra={"provider": "etcd"})
                        try:
                            await self._watch_somewhere(client)
                        except _Compacted as exc:
                            log.info(f"{exc}; reading every key again", extra={"provider": "etcd"})
                            self.next_revision = 0
            except (_StoreError, KeyError, TypeError, ValueError) as exc:
                # KeyError..ValueError: a reply we do not understand (a proxy in the way, another
                # server on that port). Retrying beats freezing the routes with a dead task.
                first, wait = outage.failed()
                if first:
                    log.error(
                        f"etcd unreachable, keeping the last known routes: {_reason(exc)}",
                        extra={"provider": "etcd", "endpoints": self.endpoints, "retry_s": wait},
                    )
                # After an outage, read again: cheaper to reason about than a long replay.
                self.next_revision = 0
                await asyncio.sleep(wait)

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.ca is not None or self.cert is not None:
            try:
                context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
                if self.cert is not None and self.key is not None:
                    context.load_cert_chain(str(self.cert), str(self.key))
            except (OSError, ssl.SSLError) as exc:
                raise _StoreError(f"cannot load the TLS files (ca, cert, key): {exc}") from None
            verify = context
        # read=None: a watch is quiet for as long as nothing changes; calls set their own limit.
        timeout = httpx.Timeout(CALL_TIMEOUT_S, read=None)
        return httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=False)

    def _order(self, skip_current: bool = False) -> list[str]:
        """Every endpoint, the last good one first (or last, when it just failed us)."""
        i = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else 0
        order = self.endpoints[i:] + self.endpoints[:i]
        return order[1:] + order[:1] if skip_current else order

    async def _headers(self, client: httpx.AsyncClient, endpoint: str) -> dict[str, str]:
        if self.username is None:
            return {}
        try:
            password = self.password_file.read_text().rstrip("\r\n") if self.password_file else ""
        except OSError as exc:
            raise _StoreError(f"cannot read password_file {self.password_file}: {exc.strerror}") from None
        body = {"name": self.username, "password": password}
        reply = await client.post(f"{endpoint}/v3/auth/authenticate", json=body, timeout=CALL_TIMEOUT_S)
        data = _json_reply(reply, "authenticate")
        return {"Authorization": str(data.get("token", ""))}

    async def _read_all(self, client: httpx.AsyncClient) -> None:
        """Range-read the prefix from the first member that answers; take it as the new snapshot."""
        body = {"key": _b64(self._key_bytes), "range_end": _b64(prefix_range_end(self._key_bytes))}
        errors: list[str] = []
        for endpoint in self._order():
            try:
                headers = await self._headers(client, endpoint)
                reply = await client.post(
                    f"{endpoint}/v3/kv/range", json=body, headers=headers, timeout=CALL_TIMEOUT_S
                )
                data = _json_reply(reply, "range")
            except (httpx.HTTPError, _StoreError) as exc:
                errors.append(f"{endpoint}: {_reason(exc)}")
                continue
            self.endpoint = endpoint
            items = {_key(kv): _unb64(kv.get("value")) for kv in data.get("kvs", [])}
            self.next_revision = int(data["header"]["revision"]) + 1
            self._applied(*self.table.replace(items))
            return
        raise _StoreError("; ".join(errors))

    async def _watch_somewhere(self, client: httpx.AsyncClient) -> None:
        """Watch from ``next_revision`` on each member in turn until none will; raises `_StoreError` then."""
        errors: list[str] = []
        skip_current = False
        while True:
            for endpoint in self._order(skip_current):
                try:
                    await self._watch(client, endpoint)
                except _WatchLost as exc:
                    # It did work for a while: start over with every member, this one last.
                    log.info(f"etcd watch on {endpoint} lost ({exc}); resuming", extra={"provider": "etcd"})
                    self.endpoint = endpoint
                    skip_current = True
                    errors = []
                    await asyncio.sleep(LOST_WATCH_PAUSE_S)
                    break
                except (httpx.HTTPError, _StoreError) as exc:
                    errors.append(f"{endpoint}: {_reason(exc)}")
            else:
                raise _StoreError("; ".join(errors))

    async def _watch(self, client: httpx.AsyncClient, endpoint: str) -> None:
        """Stream changes from ``next_revision`` on `endpoint`; returns only by raising."""
        create = {
            "key": _b64(self._key_bytes),
            "range_end": _b64(prefix_range_end(self._key_bytes)),
            "start_revision": str(self.next_revision),
        }
        headers = await self._headers(client, endpoint)
        async with client.stream(
            "POST", f"{endpoint}/v3/watch", json={"create_request": create}, headers=headers
        ) as reply:
            if reply.status_code != 200:
                await reply.aread()
                _json_reply(reply, "watch")
            created = False
            try:
                async for line in reply.aiter_lines():
                    if not line.strip():
                        continue
                    created = self._on_watch_message(json.loads(line), endpoint) or created
            except (httpx.HTTPError, ValueError) as exc:
                if not created:
                    raise _StoreError(f"watch failed: {_reason(exc)}") from None
                raise _WatchLost(_reason(exc)) from None
            if not created:
                raise _StoreError("the watch stream ended before it started")
            raise _WatchLost("the stream ended")

    def _on_watch_message(self, message: dict[str, Any], endpoint: str) -> bool:
        """Apply one watch response; True once the watch is established."""
        if "error" in message:
            err = message["error"]
            raise _StoreError(str(err.get("message") or err) if isinstance(err, dict) else str(err))
        result = message.get("result") or {}
        if result.get("canceled"):
            compacted = int(result.get("compact_revision") or 0)
            if compacted:
                raise _Compacted(
                    f"etcd history before revision {compacted} is compacted "
                    f"(the watch wanted {self.next_revision})"
                )
            raise _WatchLost(f"canceled by {endpoint}: {result.get('cancel_reason') or 'no reason given'}")
        self.endpoint = endpoint
        events = result.get("events") or []
        if events:
            puts: dict[str, bytes] = {}
            deletes: set[str] = set()
            for event in events:
                kv = event.get("kv") or {}
                key = _key(kv)
                self.next_revision = max(self.next_revision, int(kv.get("mod_revision") or 0) + 1)
                if event.get("type") == "DELETE":
                    deletes.add(key)
                    puts.pop(key, None)
                else:  # PUT is the enum's zero value, so the gateway leaves "type" out
                    puts[key] = _unb64(kv.get("value"))
                    deletes.discard(key)
            self._applied(*self.table.apply(puts, deletes))
        return True


def _json_reply(reply: httpx.Response, call: str) -> dict[str, Any]:
    """The JSON body of a gateway reply, or `_StoreError` with etcd's own message."""
    try:
        data = reply.json()
    except ValueError:
        data = None
    if reply.status_code != 200 or not isinstance(data, dict):
        detail = ""
        if isinstance(data, dict):
            detail = str(data.get("message") or data.get("error") or "")
        raise _StoreError(f"{call}: HTTP {reply.status_code}{': ' + detail if detail else ''}")
    return data


def _reason(exc: BaseException) -> str:
    """httpx's messages can be empty (a reset connection); the class name still says what happened."""
    text = str(exc)
    if isinstance(exc, _StoreError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# httpx logs every request at INFO; one line per watch reconnect is our own log's job.
logging.getLogger("httpx").setLevel(logging.WARNING)
