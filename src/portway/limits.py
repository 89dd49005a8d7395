"""Per-client admission limits: concurrent connections and a new-connection rate per source.

Pure: the caller passes ``now`` (monotonic seconds) and the client's address text, and gets back
None (admitted) or the reason for refusing, ready for a log line.

Memory is bounded. A limiter that remembers every source it has seen is itself a denial-of-service
target: a flood of spoofed UDP sources or of IPv6 addresses (one /64 holds 2**64 of them) would grow
the table until the process dies. So `ClientLimits` keeps two tables:

- *busy* sources, which have a connection or session open right now. Their count is bounded by the
  connections the route holds open (which ``max_connections`` and the file-descriptor limit bound),
  and they are never forgotten, or their ``release`` would be lost and the count would drift.
- *idle* sources, which only carry rate-limit history, in an LRU of at most ``max_idle`` entries.
  Past the bound the least recently seen is forgotten. Forgetting a source whose bucket has refilled
  loses nothing; forgetting one that was being rate-limited lets it start over with a full burst,
  which a flood of at least ``max_idle`` other sources can force. The limit then degrades to
  "rate per source, unless the attacker also spends ``max_idle`` sources", which still costs the
  attacker far more than it costs us, rather than to unbounded memory.

IPv6 clients are counted per /64 by default (``ipv6_prefix``): a single host usually controls a
whole /64, so per-address limits would not limit it at all. IPv4-mapped IPv6 addresses
(``::ffff:192.0.2.1`` from a dual-stack socket) count as their IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

__all__ = [
    "CONNECTION_LIMIT",
    "RATE_LIMIT",
    "ClientLimits",
    "TokenBucket",
    "client_key",
]

CONNECTION_LIMIT = "per-client connection limit"
RATE_LIMIT = "per-client rate limit"

#: Slack for float timestamps: a client paced exactly at the rate must not be refused by rounding.
_ROUNDING = 1e-9

#: Default bound on remembered idle sources: ~100 bytes each, so about 10 MB at most.
DEFAULT_MAX_IDLE = 100_000


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``.

    The burst defaults to one second's worth, but at least one token: a rate below 1/s (``30/m``)
    would otherwise never admit anything.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"token bucket: rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = max(1.0, rate) if burst is None else burst
        if self.burst < 1:
            raise ValueError(f"token bucket: burst must be >= 1 to ever admit anything, got {self.burst}")
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:  # a clock that goes backwards never mints tokens
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend `n` tokens if there are that many; False (and nothing spent) otherwise."""
        self._refill(now)
        if self.tokens >= n - _ROUNDING:
            self.tokens = max(0.0, self.tokens - n)
            return True
        return False

    def full(self, now: float) -> bool:
        """True when the bucket holds a full burst: it remembers nothing worth keeping."""
        self._refill(now)
        return self.tokens >= self.burst


def client_key(client_ip: str, ipv6_prefix: int = 64) -> str:
    """The identity a limit counts: the IPv4 address, or the IPv6 /`ipv6_prefix` network."""
    if ":" not in client_ip:
        return client_ip
    try:
        addr = ipaddress.IPv6Address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip  # not an address (a test name, a unix path): count it as written
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    if ipv6_prefix >= 128:
        return str(addr)
    return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))


class _Client:
    __slots__ = ("active", "bucket")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.active = 0
        self.bucket = bucket


class ClientLimits:
    """Concurrent connections and new-connection rate per source address (see the module docstring)."""

    def __init__(
        self,
        max_connections: int | None = None,
        rate: float | None = None,
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"per-client max_connections must be >= 1, got {max_connections}")
        if rate is not None and rate <= 0:
            raise ValueError(f"per-client rate must be > 0, got {rate}")
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, got {max_idle}")
        if not 0 < ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be in 1..128, got {ipv6_prefix}")
        self.max_connections = max_connections
        self.rate = rate
        self.max_idle = max_idle
        self.ipv6_prefix = ipv6_prefix
        self._busy: dict[str, _Client] = {}
        self._idle: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        """Sources remembered right now (busy + idle)."""
        return len(self._busy) + len(self._idle)

    def active(self, client_ip: str) -> int:
        """Connections `client_ip` holds open right now."""
        entry = self._busy.get(client_key(client_ip, self.ipv6_prefix))
        return entry.active if entry is not None else 0

    def admit(self, client_ip: str, now: float) -> str | None:
        """None if `client_ip` may open one more connection (and count it), else the refusal reason.

        A refused attempt is not counted and does not need a `release`. The connection limit is
        checked first, so a client at its limit does not also drain its rate tokens.
        """
        key = client_key(client_ip, self.ipv6_prefix)
        entry = self._busy.get(key)
        if entry is None:
            entry = self._idle.pop(key, None)
            if entry is None:
                bucket = TokenBucket(self.rate, now) if self.rate is not None else None
                entry = _Client(bucket)
            if not self._take(entry, now):
                self._remember_idle(key, entry, now)
                return RATE_LIMIT
            entry.active = 1
            self._busy[key] = entry
            return None
        if self.max_connections is not None and entry.active >= self.max_connections:
            return CONNECTION_LIMIT
        if not self._take(entry, now):
            return RATE_LIMIT
        entry.active += 1
        return None

    def release(self, client_ip: str, now: float | None = None) -> None:
        """The connection `admit` counted has ended. Extra releases are ignored."""
        key = client_key(client_ip, self.ipv6_prefix)
        entry = self._busy.get(key)
        if entry is None:
            return
        entry.active -= 1
        if entry.active <= 0:
            del self._busy[key]
            self._remember_idle(key, entry, now)

    @staticmethod
    def _take(entry: _Client, now: float) -> bool:
        return entry.bucket is None or entry.bucket.take(now)

    def _remember_idle(self, key: str, entry: _Client, now: float | None) -> None:
        if entry.bucket is None or (now is not None and entry.bucket.full(now)):
            return  # nothing to remember: no rate limit, or a full bucket (same as a fresh one)
        self._idle[key] = entry
        while len(self._idle) > self.max_idle:
            self._idle.popitem(last=False)
