"""An ACL as a stream applies it: one decision per new connection or UDP session, and its log.

Denials are aggregated per address through a `DenyLog` (the first logged at once, repeats
summarised by a periodic task), so a scan or a flood costs a few lines, not one per attempt.
Built by ``admission.AdmissionFactory`` from the config; the data plane only calls `admit`.
"""

from __future__ import annotations

import asyncio
import logging

from portway.acl import Acl, DenyLog

__all__ = ["DENY_LOG_INTERVAL", "AccessControl"]

#: Seconds between summaries of repeated denials (and the window they aggregate over).
DENY_LOG_INTERVAL = 10.0


class AccessControl:
    """An ACL as streams use it: `admit` decides for a client address and logs the outcome.

    Streams call `attach` when they start serving and `detach` when they stop; the first attach
    starts the task that flushes denial summaries, the last detach stops it and flushes the rest.
    """

    def __init__(self, acl: Acl, logger: logging.Logger, *, log_allowed: bool = False) -> None:
        self.acl = acl
        self.log = logger
        self.log_allowed = log_allowed
        self.denials = DenyLog(DENY_LOG_INTERVAL)
        self._users = 0
        self._summariser: asyncio.Task[None] | None = None

    def admit(self, host: str, route: str) -> bool:
        """Whether `host` may connect to `route`; a lookup error (corrupt GeoIP data) denies."""
        try:
            decision = self.acl.decide(host)
        except Exception as exc:
            allowed, reason = False, f"ACL error: {exc!r}"
        else:
            allowed, reason = decision.allowed, decision.reason
        if allowed:
            if self.log_allowed and self.log.isEnabledFor(logging.INFO):
                self.log.info(
                    f"allowed {host} ({reason})", extra={"route": route, "action": "allow", "client": host}
                )
            return True
        line = self.denials.record(host, reason)
        if line is not None:
            self.log.info(line, extra={"route": route, "action": "deny", "client": host})
        return False

    def attach(self) -> None:
        self._users += 1
        if self._summariser is None:
            self._summariser = asyncio.get_running_loop().create_task(self._summarise_periodically())

    def detach(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._summariser is not None:
            self._users = 0
            self._summariser.cancel()
            self._summariser = None
            self._flush(force=True)

    async def _summarise_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.denials.interval)
            self._flush()

    def _flush(self, *, force: bool = False) -> None:
        for line in self.denials.summaries(force=force):
            self.log.info(line, extra={"action": "deny"})
