"""`ApiClient`: the demo's JSON-over-HTTP client, one keep-alive ``http.client`` connection per thread.

Standard library only (httpx is a dev dependency, not a runtime one). Requests and responses are
encoded with msgspec; a problem response becomes an `ApiError` naming the failing field.
"""

from __future__ import annotations

import http.client
from typing import Any

import msgspec

# A keep-alive connection the server closed while idle fails on the next send; one retry on a fresh
# connection covers it. Retrying is safe here: events are deduplicated by event_id, and a repeated
# decision is just another decision.
_RETRYABLE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError,
              ConnectionResetError, ConnectionAbortedError)


class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        detail = body.decode(errors="replace")[:500]
        try:
            problem = msgspec.json.decode(body)
            if isinstance(problem, dict):
                detail = f"{problem.get('title')}: {problem.get('detail')} (field {problem.get('field')})"
        except msgspec.DecodeError:
            pass
        super().__init__(f"{method} {path} -> {status}: {detail}")
        self.status = status


class ApiClient:
    def __init__(self, host: str, port: int, key: str, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn = self._connect()
        self.requests = 0

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """Send ``payload`` as JSON and return the decoded JSON answer; raise `ApiError` on 4xx/5xx."""
        body = msgspec.json.encode(payload) if payload is not None else None
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body, self.headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except _RETRYABLE:
                self.conn.close()
                self.conn = self._connect()
                if attempt:
                    raise
        self.requests += 1
        if resp.status >= 400:
            raise ApiError(method, path, resp.status, data)
        return msgspec.json.decode(data) if data else None

    def post(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, payload)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def close(self) -> None:
        self.conn.close()
