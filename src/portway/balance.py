"""Which target of a pool serves the next connection, and whether each target is healthy.

Pure and synchronous: no sockets, no event loop, no clock. The caller passes ``now`` (monotonic
seconds) into every call that depends on time, so every rule here is testable with plain numbers
and the same state can be driven by the TCP engines, the UDP relay and the health prober alike.

Health has two independent inputs, combined in `Balancer.available`:

- **Active checks** (`probe_result`): HAProxy-style hysteresis, ``fall`` failures in a row take a
  target down, ``rise`` successes in a row bring it back. Without a ``healthcheck:`` nobody calls it
  and ``up`` stays True.
- **Passive ejection** (`dial_failed` / `dial_succeeded`, always on): ``passive_fall`` failed dials in
  a row eject the target for ``eject_base`` seconds. When that time passes the target is *half-open*:
  it is offered again, one failed dial re-ejects it for twice as long (capped at ``eject_max``), and
  one successful dial or probe restores it fully. The back-off keeps a dead target from costing one
  failed dial per client while still noticing quickly when it returns.

Selection modes (all O(number of targets) per choice, never dependent on the number of clients):

- ``roundrobin``: nginx's *smooth* weighted round robin. Weights 5,1,1 give a,a,b,a,c,a,a: the heavy
  target gets its share spread out, not in bursts of five.
- ``leastconn``: fewest ``active`` per unit of weight; ties go through the same smooth weighted round
  robin, so idle pools still spread load by weight instead of always picking the first.
- ``iphash``: weighted rendezvous (highest random weight) hashing of (target key, client address).
  A client's target depends only on the keys and weights of the available targets, never on list
  positions, so when a target leaves or goes down only the clients that were on it move. The hash is
  blake2b + a 64-bit mixer, stable across processes and workers (Python's ``hash()`` is salted).
- ``random``: power of two choices: two distinct weighted-random candidates, the one with fewer
  ``active`` per weight wins (HAProxy's ``random(2)``, Envoy's least request). Near leastconn quality
  without its herding when many workers share stale counts.
- ``first``: the first available target in list order (ordered failover).

Backup targets are candidates only while no primary is available.

Indexes and reloads: `choose` returns an index into ``targets`` (the config order). `update` may
reorder, add and remove targets, so an index is only meaningful until the next `update`. Anything that
outlives a choice (a connection holding a target, a dial in flight) should keep the `TargetState`
object instead: every per-target method accepts either an index or the `TargetState`, and a state whose
target was removed by a reload is simply detached (``released`` still decrements its count, health
calls on it are ignored). `update` also returns the old-index -> new-index mapping for callers that
prefer numbers.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "MODES",
    "Balancer",
    "HealthPolicy",
    "Mode",
    "Target",
    "TargetSpec",
    "TargetState",
    "Transition",
    "rendezvous_score",
]

Mode = Literal["roundrobin", "leastconn", "iphash", "random", "first"]
MODES: tuple[Mode, ...] = get_args(Mode)

State = Literal["up", "down"]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One target as configured. ``key`` ("host:port" as written) is its identity across reloads."""

    key: str
    weight: int = 1
    backup: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"target {self.key}: weight must be >= 0, got {self.weight}")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Thresholds of the active checks and of passive ejection."""

    rise: int = 2
    fall: int = 3
    passive_fall: int = 3
    eject_base: float = 1.0
    eject_max: float = 60.0

    def __post_init__(self) -> None:
        for name in ("rise", "fall", "passive_fall"):
            if getattr(self, name) < 1:
                raise ValueError(f"health policy: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eject_base <= self.eject_max:
            raise ValueError(
                f"health policy: need 0 < eject_base <= eject_max, got {self.eject_base}, {self.eject_max}"
            )


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of a target's reported state, to be logged once by the caller."""

    key: str
    old: State
    new: State
    reason: str


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64 bits with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rendezvous_score(key_hash: int, client_hash: int, weight: int) -> float:
    """Weighted highest-random-weight score: the target with the largest score serves the client.

    With u uniform in (0, 1) per (target, client), ``-weight / ln(u)`` makes each target win with
    probability weight / total weight, and a target's score never depends on the other targets: that
    independence is what guarantees only the clients of a departed target move.
    """
    u = ((_mix64(key_hash ^ client_hash) >> 11) + 0.5) / 9007199254740992.0  # 2**53; u in (0, 1)
    return -weight / math.log(u)


class TargetState:
    """The live state of one target; the same object survives reloads that keep its key."""

    __slots__ = (
        "_current",
        "_dial_failures",
        "_key_hash",
        "_probe_failures",
        "_probe_successes",
        "active",
        "attached",
        "ejected_until",
        "ejections",
        "spec",
        "up",
    )

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.active = 0
        self.up = True
        self.ejected_until = 0.0
        self.ejections = 0  # consecutive ejections; 0 = not ejected nor half-open
        self.attached = True  # False once a reload removed this target from its pool
        self._probe_successes = 0
        self._probe_failures = 0
        self._dial_failures = 0
        self._current = 0  # smooth weighted round robin's running weight
        self._key_hash = _hash64(spec.key)

    def acquire(self) -> TargetState:
        """One more connection or session uses this target (what leastconn and the status page
        read); the same as `Balancer.acquired`, without the lookup, for the connection path."""
        self.active += 1
        return self

    def release(self) -> None:
        """The connection that `acquire`d this target ended."""
        if self.active > 0:
            self.active -= 1

    def available(self, now: float) -> bool:
        """May take new connections: up, not ejected at `now`, weight > 0 (half-open counts as yes)."""
        return self.up and self.spec.weight > 0 and now >= self.ejected_until

    @property
    def settled(self) -> bool:
        """No failed dials counted and no ejection: a successful dial would change nothing."""
        return not self._dial_failures and not self.ejections

    @property
    def state(self) -> State:
        """Reported health: down while active checks say so, while ejected and while half-open."""
        return "up" if self.up and self.ejections == 0 else "down"

    def __repr__(self) -> str:
        return (
            f"TargetState({self.spec.key!r}, weight={self.spec.weight}, active={self.active}, "
            f"up={self.up}, ejections={self.ejections}, ejected_until={self.ejected_until})"
        )


#: What per-target methods accept: an index from `choose` (valid until the next `update`) or the state.
Target = int | TargetState


class Balancer:
    """Chooses among a pool's targets and tracks their health; see the module docstring."""

    def __init__(
        self,
        targets: Sequence[TargetSpec],
        mode: Mode = "roundrobin",
        health: HealthPolicy = HealthPolicy(),  # frozen: sharing the default is safe
        *,
        seed: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown load balancing mode {mode!r} (one of {', '.join(MODES)})")
        self.mode: Mode = mode
        self.health = health
        self._rng = random.Random(seed)
        self.targets: list[TargetState] = []
        self._install([TargetState(spec) for spec in _checked(targets)])

    def _install(self, states: list[TargetState]) -> None:
        self.targets = states
        self._index = {id(s): i for i, s in enumerate(states)}

    # -- choosing -------------------------------------------------------------------------------

    def choose(self, client: str, now: float, exclude: Collection[int] = ()) -> int | None:
        """The index of the target for a new connection from `client`, or None if none is available.

        `exclude` holds indexes already tried by this connection (a retry after a failed dial).
        Primaries first; backups only when no primary is a candidate.
        """
        targets = self.targets
        if len(targets) == 1:  # the common single-target route: no candidate list, no mode
            return 0 if targets[0].available(now) and 0 not in exclude else None
        primaries: list[int] = []
        backups: list[int] = []
        for i, t in enumerate(targets):
            if t.available(now) and i not in exclude:
                (backups if t.spec.backup else primaries).append(i)
        candidates = primaries or backups
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        mode = self.mode
        if mode == "roundrobin":
            return self._smooth(candidates)
        if mode == "leastconn":
            return self._leastconn(candidates)
        if mode == "iphash":
            return self._iphash(candidates, client)
        if mode == "random":
            return self._two_choices(candidates)
        return candidates[0]  # first

    def _smooth(self, candidates: list[int]) -> int:
        """nginx's smooth weighted round robin over `candidates` (all weights > 0)."""
        targets = self.targets
        total = 0
        best = -1
        best_current = 0
        for i in candidates:
            t = targets[i]
            w = t.spec.weight
            t._current += w
            total += w
            if best < 0 or t._current > best_current:
                best, best_current = i, t._current
        targets[best]._current -= total
        return best

    def _leastconn(self, candidates: list[int]) -> int:
        targets = self.targets
        tied: list[int] = []
        best_active, best_weight = 0, 1
        for i in candidates:
            t = targets[i]
            # active/weight compared without division: a/w < b/v  <=>  a*v < b*w (weights > 0)
            if not tied or t.active * best_weight < best_active * t.spec.weight:
                tied = [i]
                best_active, best_weight = t.active, t.spec.weight
            elif t.active * best_weight == best_active * t.spec.weight:
                tied.append(i)
        return tied[0] if len(tied) == 1 else self._smooth(tied)

    def _iphash(self, candidates: list[int], client: str) -> int:
        targets = self.targets
        client_hash = _hash64(client)
        best = candidates[0]
        best_score = -1.0
        for i in candidates:
            t = targets[i]
            score = rendezvous_score(t._key_hash, client_hash, t.spec.weight)
            if score > best_score:
                best, best_score = i, score
        return best

    def _two_choices(self, candidates: list[int]) -> int:
        targets = self.targets
        weights = [targets[i].spec.weight for i in candidates]
        total = sum(weights)
        first = _weighted_pick(weights, total, self._rng.random())
        second_weights = weights.copy()
        second_weights[first] = 0
        second = _weighted_pick(second_weights, total - weights[first], self._rng.random())
        a, b = targets[candidates[first]], targets[candidates[second]]
        # fewer active per weight wins; on a tie the first draw (already weight-proportional) wins
        if b.active * a.spec.weight < a.active * b.spec.weight:
            return candidates[second]
        return candidates[first]

    # -- connection accounting ----------------------------------------------------------------------

    def _state(self, target: Target) -> TargetState:
        return self.targets[target] if isinstance(target, int) else target

    def acquired(self, target: Target) -> TargetState:
        """A connection or session now uses `target`; returns the state to release it by later."""
        return self._state(target).acquire()

    def released(self, target: Target) -> None:
        """The connection that `acquired` the target ended. Pass the state if a reload may have passed."""
        self._state(target).release()

    # -- health -----------------------------------------------------------------------------------

    def _eject(self, t: TargetState, now: float) -> float:
        t.ejections += 1
        seconds = min(self.health.eject_max, self.health.eject_base * 2.0 ** (t.ejections - 1))
        t.ejected_until = now + seconds
        return seconds

    def _restore(self, t: TargetState) -> None:
        t.ejections = 0
        t.ejected_until = 0.0
        t._dial_failures = 0

    def dial_failed(self, target: Target, now: float) -> Transition | None:
        """A dial to `target` failed (refused, unreachable, timed out): passive ejection.

        ``passive_fall`` failures in a row eject it; while half-open a single failure re-ejects it
        for twice as long. Failures of dials that started before the current ejection change nothing.
        """
        t = self._state(target)
        if not t.attached:
            return None
        before = t.state
        t._dial_failures += 1
        reason: str | None = None
        if t.ejections:
            if now >= t.ejected_until:  # half-open: this was the test dial
                seconds = self._eject(t, now)
                reason = f"dial failed while half-open, ejected for {seconds:g}s"
        elif t._dial_failures >= self.health.passive_fall:
            seconds = self._eject(t, now)
            reason = f"{t._dial_failures} dials failed in a row, ejected for {seconds:g}s"
        return _transition(t, before, reason)

    def dial_succeeded(self, target: Target, now: float) -> Transition | None:
        """A dial to `target` connected: resets the passive counter and ends any ejection."""
        t = self._state(target)
        if not t.attached:
            return None
        before = t.state
        was_ejected = t.ejections > 0
        self._restore(t)
        return _transition(t, before, "dial succeeded" if was_ejected else None)

    def probe_result(self, target: Target, ok: bool, now: float, reason: str = "") -> Transition | None:
        """An active check finished: rise/fall hysteresis; a success also ends a passive ejection."""
        t = self._state(target)
        if not t.attached:
            return None
        before = t.state
        why: str | None = None
        detail = f": {reason}" if reason else ""
        if ok:
            t._probe_failures = 0
            t._probe_successes += 1
            if t.ejections:
                self._restore(t)
                why = f"check passed{detail}"
            if not t.up and t._probe_successes >= self.health.rise:
                t.up = True
                why = f"{t._probe_successes} checks passed{detail}"
        else:
            t._probe_successes = 0
            t._probe_failures += 1
            if t.up and t._probe_failures >= self.health.fall:
                t.up = False
                why = f"{t._probe_failures} checks failed{detail}"
        return _transition(t, before, why)

    def available(self, target: Target, now: float) -> bool:
        return self._state(target).available(now)

    def state_of(self, target: Target, now: float) -> State:
        """Reported health for metrics and status: "down" while checks fail, ejected or half-open."""
        return self._state(target).state

    # -- reload ---------------------------------------------------------------------------------

    def index_of(self, target: TargetState) -> int | None:
        """The current index of `target`, or None if a reload removed it."""
        return self._index.get(id(target)) if target.attached else None

    def update(
        self, targets: Sequence[TargetSpec], mode: Mode | None = None, health: HealthPolicy | None = None
    ) -> dict[int, int]:
        """Apply a reload: targets that keep their key keep their state object, health and counts.

        Returns {old index: new index} for the kept targets. Removed targets are detached: a
        connection still holding one can release it, and health reports about it are ignored.
        The round-robin phase restarts, since weights may have changed. A new `health` policy
        applies from the next report on; current verdicts and ejections are kept.
        """
        if health is not None:
            self.health = health
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"unknown load balancing mode {mode!r} (one of {', '.join(MODES)})")
            self.mode = mode
        old = {t.spec.key: (i, t) for i, t in enumerate(self.targets)}
        mapping: dict[int, int] = {}
        states: list[TargetState] = []
        for new_index, spec in enumerate(_checked(targets)):
            kept = old.pop(spec.key, None)
            if kept is None:
                states.append(TargetState(spec))
                continue
            old_index, state = kept
            state.spec = spec
            states.append(state)
            mapping[old_index] = new_index
        for _, gone in old.values():
            gone.attached = False
        for state in states:
            state._current = 0
        self._install(states)
        return mapping


def _checked(targets: Sequence[TargetSpec]) -> Sequence[TargetSpec]:
    if not targets:
        raise ValueError("a pool needs at least one target")
    seen: set[str] = set()
    for spec in targets:
        if spec.key in seen:
            raise ValueError(f"target {spec.key} is listed twice")
        seen.add(spec.key)
    return targets


def _weighted_pick(weights: list[int], total: int, u: float) -> int:
    """The index i with probability weights[i] / total, for u uniform in [0, 1)."""
    point = u * total
    last = 0
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        last = i
        point -= w
        if point < 0:
            return i
    return last  # float rounding at the very top of the range


def _transition(t: TargetState, before: State, reason: str | None) -> Transition | None:
    after = t.state
    if after == before:
        return None
    return Transition(t.spec.key, before, after, reason or "")
