"""Degraded modes: a circuit breaker per remote dependency, and warnings that cannot flood the log.

When Redis (or another remote dependency) dies, every request that touches it fails the same way. The
issue-15 outage (Redis SIGKILLed for 10 s under 400 decisions/s) showed what that costs without these:
each decision waited for its own failed connection attempt (P99 104 ms against a 20 ms target) and
logged a full traceback (4,001 warnings, 12.9 MB in 10 s).

`CircuitBreaker` (closed → open → half-open): after `failures` consecutive failures it opens and callers
fail at once with `CircuitOpen` (a fallback, no I/O) for `reset_seconds`; then one trial call is let
through, and its success closes the breaker again. `RateLimitedWarning` writes at most one line per
dependency per interval, with the count of what it held back, and a traceback only on the first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class CircuitOpen(ConnectionError):
    """Raised instead of calling a dependency whose breaker is open."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"{name} is unavailable (circuit open; next try in {retry_in:.1f} s)")
        self.name = name


class RateLimitedWarning:
    """One WARNING line per ``interval`` for one dependency; the lines in between are counted, not written."""

    def __init__(self, logger: logging.Logger, name: str, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.name = name
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self.written = 0
        self._last = -float("inf")

    def said(self) -> None:
        """A line about it went out elsewhere just now (e.g. the start's own WARNING): the next waits ``interval``."""
        self._last = self.clock()

    def __call__(self, message: str, exc: BaseException | None = None) -> bool:
        """Log ``message`` (about ``exc``) unless a line went out less than ``interval`` ago; True if written."""
        now = self.clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        held, self.suppressed = self.suppressed, 0
        self._last = now
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        more = f" ({held} similar in the last {self.interval:.0f} s not logged)" if held else ""
        # A traceback only with the first line (after that it is the same one again), and none for an
        # open circuit: that is the breaker working, not a new failure.
        trace = exc is not None and self.written == 0 and not isinstance(exc, CircuitOpen)
        self.logger.warning("%s: %s%s%s", self.name, message, reason, more, exc_info=exc if trace else None)
        self.written += 1
        return True


class CircuitBreaker:
    """Closed, open or half-open; `allow` before a call, then `success` or `failure` after it."""

    def __init__(self, name: str, failures: int = 3, reset_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.name = name
        self.failures = failures
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.on_change = on_change
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.rejected = 0
        self._trial_at: float | None = None  # when the half-open probe went out (None: none outstanding)

    def available(self) -> bool:
        """Whether a call now would go ahead (closed, or a probe is due), without taking the probe.

        Lets a hot path fall back without raising: an exception per request (with asyncio's task and
        traceback cycles) fed the cyclic GC enough to add ~15 ms to the outage P99.
        """
        if self.state == "closed":
            return True
        now = self.clock()
        if self.state == "open":
            return now >= self.opened_at + self.reset_seconds
        return self._trial_at is None or now - self._trial_at > self.reset_seconds

    def allow(self) -> None:
        """Return when the call may go ahead; raise `CircuitOpen` when it must fall back at once."""
        if self.state == "closed":
            return
        retry_in = self.opened_at + self.reset_seconds - self.clock()
        if self.state == "open" and retry_in <= 0:
            self._set("half-open")
        if self.state == "half-open":
            now = self.clock()
            # Exactly one caller probes the dependency; another may if that one never reported back.
            if self._trial_at is None or now - self._trial_at > self.reset_seconds:
                self._trial_at = now
                return
        self.rejected += 1
        raise CircuitOpen(self.name, max(retry_in, 0.0))

    def success(self) -> None:
        self.consecutive = 0
        self._trial_at = None
        if self.state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self.consecutive += 1
        self._trial_at = None
        if self.state == "half-open" or (self.state == "closed" and self.consecutive >= self.failures):
            self.opened_at = self.clock()
            self._set("open")

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        if self.on_change is not None:
            self.on_change(old, state)
