"""`kill -9` of a real `kassa serve` (embedded state): the decision waiting for its reward window and the
response given for a request_id both survive, and the decision's reward is joined after the restart."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ADMIN, PUB = "restart-admin", "restart-pub"

CATALOG = {
    "offers": [
        {"id": "discount", "kind": "discount", "title": "10% off", "value": 4},
        {"id": "magazine", "kind": "partner", "title": "Magazine", "value": 2},
    ],
    "placements": [{"id": "thanks", "slots": 1, "offers": ["discount", "magazine"],
                    # long enough that a restart on a loaded 2-core machine (5 s seen) ends inside the window
                    "reward": {"weights": {"accept": 1.0}, "wait_seconds": 12}}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(cfg: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KASSA_ADMIN_KEY": ADMIN, "KASSA_PUBLISHABLE_KEY": PUB}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kassa", "serve", "--settings", str(cfg), "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("kassa serve did not get ready: " + log.read_text(errors="replace")[-3000:])


def _metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([-0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_kill_9_keeps_the_pending_decision_and_the_request_id(tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    cfg = tmp_path / "kassa.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "catalog_file": str(tmp_path / "catalog.yaml")}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    pub = {"Authorization": f"Bearer {PUB}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"placement": "thanks", "request_id": "order-1001", "customer": {"id": "c-1"},
            "order": {"id": "1001", "total": 40.0, "items": [{"sku": "A", "qty": 1, "price": 40.0}]}}
    proc = _serve(cfg, port, tmp_path / "server.log")
    try:
        first = httpx.post(f"{url}/v1/decisions", json=body, headers=pub).json()
        offer = first["offers"][0]["offer_id"]
        time.sleep(0.5)  # answered well before the kill (the journal commits every 20 ms)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _serve(cfg, port, tmp_path / "server.log")
        metrics = httpx.get(f"{url}/metrics", headers=admin).text
        assert _metric(metrics, "kassa_pending_decisions") == 1.0
        again = httpx.post(f"{url}/v1/decisions", json=body, headers=pub).json()
        assert again["decision_id"] == first["decision_id"] and again["offers"] == first["offers"]
        event = {"event_id": "e-1", "type": "accept", "decision_id": first["decision_id"], "offer_id": offer}
        assert httpx.post(f"{url}/v1/events", json={"events": [event]}, headers=pub).json()["accepted"] == 1
        deadline = time.monotonic() + 40
        reward = None
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{url}/metrics", headers=admin).text
            reward = _metric(metrics, "kassa_offer_reward", f'{{offer="{offer}",placement="thanks"}}')
            if reward is not None:
                break
            time.sleep(0.2)
        assert reward == 1.0, metrics
        assert _metric(metrics, "kassa_pending_decisions") == 0.0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
