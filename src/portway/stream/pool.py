"""A route's pool of targets at run time: addresses, the balancer's choice, health, and use.

The one piece that answers "which address do I dial next, and what happened" for both TCP
engines and UDP. The decisions are pure (``portway.balance``); this adapter adds what needs the
loop: name resolution per target (``TargetResolver``), the clock, active health probes
(``portway.probe``), and the log lines for state changes.

Each dial works on a snapshot: ``addresses(i)`` returns the resolver's current list object,
which a re-resolve replaces rather than mutates, so a refresh (or a reload re-weighting the
pool) never shifts an index under a dial in flight.

A pool of one target without active checks is the plain route of before: ``pick`` returns it
without consulting the balancer, and a dead target is not "ejected" (with nothing to fail over
to, ejection would only turn a slow failure into a fast one for the next clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from portway.addr import format_hostport
from portway.balance import Balancer, HealthPolicy, Mode, TargetSpec, TargetState, Transition
from portway.logs import BurstLog
from portway.probe import first_probe_in, next_probe_in, probe_tcp, probe_udp
from portway.stream.resolve import SockAddr, TargetResolver

__all__ = ["HealthCheck", "PoolMember", "TargetPool"]

log = logging.getLogger("portway.pool")


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One configured target."""

    host: str
    port: int
    weight: int = 1
    backup: bool = False

    @property
    def key(self) -> str:
        return format_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active probing of every target of a pool (only for routes with `healthcheck:`)."""

    interval: float
    timeout: float
    send: bytes = b""
    expect: bytes | re.Pattern[bytes] | None = None


#: What the control plane hears of each active probe: route, target key, ok, reason.
ProbeListener = Callable[[str, str, bool, str], None]


class TargetPool:
    """The targets of one route and the state shared by every connection to them."""

    #: False in a worker of a control plane (``workers: N``): the control process probes each
    #: target once per instance and sends the results (`apply_probe`), so the workers' pools
    #: keep their checks' policy but never probe themselves.
    probes_here: ClassVar[bool] = True

    def __init__(
        self,
        route: str,
        members: Sequence[PoolMember],
        *,
        family: int,
        kind: int,
        mode: Mode = "roundrobin",
        health: HealthPolicy | None = None,
        check: HealthCheck | None = None,
        resolve_interval: float = 60.0,
    ) -> None:
        if not members:
            raise ValueError(f"route {route!r}: a pool needs at least one target")
        self.route = route
        self.family = family
        self.kind = kind
        self.check = check
        self.resolve_interval = resolve_interval
        self.members = tuple(members)
        self.balancer = Balancer(
            [TargetSpec(m.key, m.weight, m.backup) for m in members], mode, health or HealthPolicy()
        )
        self.resolvers = [self._resolver(m) for m in members]
        #: One target, no active check: pick() is a constant and failures eject nothing.
        self.trivial = len(members) == 1 and check is None
        #: Bumped on every health transition: a UDP session compares it per datagram (one int
        #: compare) to learn that it may have to move, without reading the clock. Sessions the
        #: compiled inlet relays are unbound by a watcher instead (see `watch`).
        self.generation = 0
        self._watchers: list[Callable[[], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._probes: list[asyncio.Task[None]] = []
        self._none_up = BurstLog(10.0)
        self._started = False
        #: Told every probe result (the control plane forwards them to the workers).
        self.on_probe: ProbeListener | None = None

    def _resolver(self, member: PoolMember) -> TargetResolver:
        return TargetResolver(
            member.host,
            member.port,
            family=self.family,
            kind=self.kind,
            interval=self.resolve_interval,
            route=self.route,
        )

    def __str__(self) -> str:
        if len(self.members) == 1:
            return str(self.resolvers[0])
        return ",".join(m.key for m in self.members)

    # -- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve every target (a name that does not resolve is a ResolveError naming the
        route) and start the probes. Idempotent: a pool shared by two streams starts once."""
        if self._started:
            return
        self.loop = asyncio.get_running_loop()
        try:
            for resolver in self.resolvers:
                await resolver.start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        self._start_probes()

    def stop(self) -> None:
        for resolver in self.resolvers:
            resolver.stop()
        self._stop_probes()
        self._started = False

    def _stop_probes(self) -> None:
        for task in self._probes:
            task.cancel()
        self._probes.clear()

    def _start_probes(self) -> None:
        assert self.loop is not None
        if self.check is not None and self.probes_here:
            for index in range(len(self.members)):
                self._probes.append(self.loop.create_task(self._probe_forever(index)))

    async def update(
        self,
        members: Sequence[PoolMember],
        *,
        mode: Mode,
        health: HealthPolicy | None = None,
        check: HealthCheck | None = None,
    ) -> None:
        """A reload changed the pool: add, remove and re-weight targets in place.

        Targets that stay (same ``host:port``) keep their resolver, health and active count;
        live connections are untouched (those to a removed target are the caller's to drain).
        A new name that does not resolve raises ResolveError and changes nothing.
        """
        if not members:
            raise ValueError(f"route {self.route!r}: a pool needs at least one target")
        kept = {m.key: r for m, r in zip(self.members, self.resolvers, strict=True)}
        wanted = {m.key for m in members}
        fresh: list[TargetResolver] = []
        resolvers: list[TargetResolver] = []
        try:
            for member in members:
                resolver = kept.get(member.key)
                if resolver is None:
                    resolver = self._resolver(member)
                    fresh.append(resolver)
                    await resolver.start()
                resolvers.append(resolver)
        except BaseException:
            for resolver in fresh:
                resolver.stop()
            raise
        for key, resolver in kept.items():
            if key not in wanted:
                resolver.stop()
        self._stop_probes()
        self.balancer.update([TargetSpec(m.key, m.weight, m.backup) for m in members], mode, health)
        self.members = tuple(members)
        self.resolvers = resolvers
        if check is None and self.check is not None:
            # Only active checks bring a target they took down back up: without them, their
            # last verdict would keep the target out of the pool for good.
            for state in self.balancer.targets:
                if not state.up:
                    state.up = True
                    if state.state == "up":  # not also ejected by failed dials
                        self._transition(Transition(state.spec.key, "down", "up", "active checks removed"))
        self.check = check
        self.trivial = len(members) == 1 and check is None
        self._changed()
        self._start_probes()

    # -- the data plane's questions ----------------------------------------------------------

    def pick(self, client: str, exclude: Sequence[int] = ()) -> int | None:
        """The target for a new connection from `client` (an IP), or None if none is up."""
        if self.trivial:
            return None if exclude else 0
        assert self.loop is not None
        choice = self.balancer.choose(client, self.loop.time(), exclude)
        if choice is None and not exclude:
            emit, suppressed = self._none_up.hit()
            if emit:
                log.error(
                    "no target available: every target is down; clients are closed at once",
                    extra={"route": self.route, "targets": str(self), "suppressed": suppressed},
                )
        return choice

    def attempt_timeout(self, connect_timeout: float) -> float:
        """How long one target may take to answer a dial before the next one is tried.

        The route's `connect_timeout` bounds the whole dial, failover included; each of up to
        three targets gets an equal share of it, so a target that drops SYNs costs a client
        part of the budget, not all of it (HAProxy's per-try `timeout connect` with redispatch,
        but never longer in total than the route says). A pool of one gets it all."""
        if len(self.members) == 1:
            return connect_timeout
        return connect_timeout / min(len(self.members), 3)

    def addresses(self, index: int) -> list[SockAddr]:
        """Target `index`'s addresses: a snapshot (re-resolving replaces the list, never edits it)."""
        return self.resolvers[index].addresses

    def key(self, index: int) -> str:
        return self.members[index].key

    def member_state(self, index: int) -> TargetState:
        return self.balancer.targets[index]

    def acquired(self, target: int | TargetState) -> TargetState:
        """A connection now uses `target`; it releases the returned state (which stays
        valid when a reload moves or removes the target) when it ends."""
        return self.balancer.acquired(target)

    def released(self, state: TargetState) -> None:
        self.balancer.released(state)

    def _index(self, target: int | TargetState) -> int | None:
        """The current index of `target`; a dial passes the state it picked, since a reload
        while the dial was in flight may have moved (or removed: None) the target."""
        return target if isinstance(target, int) else self.balancer.index_of(target)

    def dial_failed(self, target: int | TargetState) -> None:
        """A dial to `target` failed (refused, unreachable, timed out): re-resolve soon,
        and count it toward passive ejection."""
        index = self._index(target)
        if index is None:
            return  # removed by a reload meanwhile: nothing left to count it against
        self.resolvers[index].dial_failed()
        if self.trivial or self.loop is None:
            return
        self._transition(self.balancer.dial_failed(index, self.loop.time()))

    def dial_succeeded(self, target: int | TargetState, addr: SockAddr | None = None) -> None:
        if addr is None and (self.trivial or self.loop is None):
            return  # the first address answered and there is no health to count: nothing to learn
        index = self._index(target)
        if index is None:
            return
        if addr is not None:
            self.resolvers[index].prefer(addr)
        if self.trivial or self.loop is None:
            return
        self._transition(self.balancer.dial_succeeded(index, self.loop.time()))

    def success_is_news(self, state: TargetState) -> bool:
        """Whether `dial_succeeded` for `state` would change anything (passive health to reset):
        a dial that connects need not be reported otherwise."""
        return not (self.trivial or self.loop is None or state.settled)

    def is_up(self, index: int) -> bool:
        if self.trivial or self.loop is None:
            return True
        return self.balancer.available(index, self.loop.time())

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` on every health transition (whenever `generation` moves): what caches
        a decision in C (a UDP inlet's bindings) drops it there."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._watchers.remove(callback)

    def _changed(self) -> None:
        self.generation += 1
        for callback in list(self._watchers):
            callback()

    # -- health ------------------------------------------------------------------------------

    def _transition(self, change: Transition | None) -> None:
        if change is None:
            return
        self._changed()
        level = logging.WARNING if change.new == "down" else logging.INFO
        log.log(
            level,
            f"target {change.old} -> {change.new}",
            extra={
                "route": self.route,
                "target": change.key,
                "action": "health",
                "state": change.new,
                "error": change.reason,
            },
        )

    def _index_of_key(self, key: str) -> int | None:
        for index, member in enumerate(self.members):
            if member.key == key:
                return index
        return None

    def apply_probe(self, key: str, ok: bool, reason: str = "") -> None:
        """The control plane probed target `key`: the same hysteresis as a local probe, but
        silent (the control plane logs the transition once for the instance)."""
        index = self._index_of_key(key)
        if index is None or self.loop is None or self.check is None:
            return  # a reload raced the probe: the next health snapshot settles it
        if self.balancer.probe_result(index, ok, self.loop.time(), reason) is not None:
            self._changed()

    def check_state(self) -> list[tuple[str, bool, int, int]]:
        """Each target's active-check state (key, up, successes, failures), for a new worker."""
        return [(t.spec.key, t.up, t._probe_successes, t._probe_failures) for t in self.balancer.targets]

    def set_check_state(self, key: str, up: bool, successes: int, failures: int) -> None:
        """Take over the control plane's check state of target `key` (see `check_state`)."""
        index = self._index_of_key(key)
        if index is None or self.check is None:
            return
        state = self.balancer.targets[index]
        if state.up != up:
            self._changed()
        state.up, state._probe_successes, state._probe_failures = up, successes, failures

    async def _probe_forever(self, index: int) -> None:
        check = self.check
        assert check is not None and self.loop is not None
        loop = self.loop
        # The first probe of each target lands anywhere in the first interval, the next ones
        # +-10 % around it, so the probes of many targets never line up.
        await asyncio.sleep(first_probe_in(check.interval, random.random()))
        while True:
            ok, reason = await self._probe_once(index, check)
            if self.on_probe is not None:  # first: the workers hear it before anyone reads the log
                self.on_probe(self.route, self.members[index].key, ok, reason)
            self._transition(self.balancer.probe_result(index, ok, loop.time(), reason))
            await asyncio.sleep(next_probe_in(check.interval, random.random()))

    async def _probe_once(self, index: int, check: HealthCheck) -> tuple[bool, str]:
        addresses = self.addresses(index)
        if not addresses:
            return False, "no address"
        family, addr = addresses[0]
        try:
            if self.kind == socket.SOCK_DGRAM:
                return await probe_udp(family, addr, check.timeout, check.send, check.expect)
            return await probe_tcp(family, addr, check.timeout, check.send, check.expect)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a probe must never take the pool down
            with contextlib.suppress(Exception):
                log.debug("probe error", extra={"route": self.route, "error": repr(exc)})
            return False, f"probe error: {exc}"
