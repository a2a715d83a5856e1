"""The drift alert hook: a WARNING log line per new alert (``ALERT_MESSAGE``, stable for log alerting)
and, optionally, a JSON POST of the report to a webhook from the hook's own thread, so a slow or failing
webhook never reaches the monitor.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from kassa import errors
from kassa.monitor.drift.report import DriftReport, DriftRow

log = logging.getLogger("kassa.drift")


ALERT_MESSAGE = "kassa drift alert: placement=%s kind=%s feature=%s statistic=%.6g p_value=%s"


class AlertHook:
    """Says so when drift alerts: one WARNING log line per new alert (``ALERT_MESSAGE``, stable for log
    alerting) and, with ``webhook_url``, a JSON POST of the report from the hook's own thread. ``notify``
    never blocks and never raises: a full queue drops the POST, and a failed POST is logged."""

    def __init__(self, webhook_url: str | None = None, timeout: float = 5.0, max_pending: int = 100,
                 logger: logging.Logger | None = None) -> None:
        if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
            raise errors.Invalid(f"drift webhook URL must be http:// or https://, got {webhook_url!r}",
                                 "webhook_url")
        if not timeout > 0:
            raise errors.Invalid(f"drift webhook timeout must be > 0 seconds, got {timeout!r}", "timeout")
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.log = logger or log
        self.posted = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def notify(self, report: DriftReport, alerts: Sequence[DriftRow]) -> None:
        if not alerts:
            return
        for row in alerts:
            p = "none" if row.p_value is None else f"{row.p_value:.3g}"
            self.log.warning(ALERT_MESSAGE, report.placement, row.kind, row.feature, row.statistic, p)
        if self.webhook_url is None:
            return
        payload = {"event": "kassa.drift.alert", "placement": report.placement,
                   "alerts": [r.to_dict() for r in alerts], "report": report.to_dict()}
        self._ensure_thread()
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            self.log.warning("drift webhook queue full: dropped an alert for %s", report.placement)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kassa-drift-webhook", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        import httpx  # only a process with a webhook configured pays for the import

        with httpx.Client(timeout=self.timeout) as client:
            while True:
                payload = self._queue.get()
                try:
                    if payload is None:
                        return
                    self._post(client, payload)
                finally:
                    self._queue.task_done()

    def _post(self, client: Any, payload: dict[str, Any]) -> None:
        try:
            resp = client.post(self.webhook_url, json=payload)
        except Exception as exc:  # a webhook outage must never reach the monitor
            self.failed += 1
            self.log.warning("drift webhook POST to %s failed: %s", self.webhook_url, exc)
            return
        if resp.status_code >= 300:
            self.failed += 1
            self.log.warning("drift webhook POST to %s failed: HTTP %d", self.webhook_url, resp.status_code)
        else:
            self.posted += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued POSTs are done (for tests and shutdown); True when the queue drained."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            thread.join(timeout)
