"""One typed settings object, read from a YAML file and then ``KASSA_*`` environment variables.

Precedence: defaults < file (``--config`` or ``KASSA_CONFIG``) < environment. An env var is the
upper-cased field path joined with ``__``: ``KASSA_SERVER__PORT=9000``, ``KASSA_DATA_DIR=/var/kassa``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml
from msgspec import Struct, field


class ServerSettings(Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 65_536
    idempotency_ttl_seconds: float = 600.0
    idempotency_max_entries: int = 100_000
    cors_origins: list[str] = []
    bench_endpoints: bool = False  # POST /_bench/noop: a do-nothing endpoint for latency baselines


class CanarySettings(Struct, forbid_unknown_fields=True):
    """Guardrails that roll a canary back automatically (see kassa.learn.canary)."""

    window_decisions: int = 5_000
    min_decisions: int = 300  # unused since issue 17 (the tests are sequential); kept so configs still load
    min_rewards: int = 200  # per arm, before the reward test looks
    max_reward_drop: float = 0.10  # relative drop of the top-slot reward rate vs production...
    z: float = 2.33  # ...that is also significant: every sequential test runs at alpha = P(N(0,1) > z)
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 2.0
    min_latency_decisions: int = 100  # production decisions behind its P99 before latency/errors are tested
    latency_breach_share: float = 0.10  # the latency SPRT's alternative: this share over the allowed P99


class LearnSettings(Struct, forbid_unknown_fields=True):
    snapshot_every_seconds: float = 10.0  # how often the online learner publishes a model snapshot
    snapshot_min_learns: int = 50  # ...when at least this many examples were learned since the last
    learning_rate: float = 0.5
    vw_extra_args: str = ""
    keep_snapshots: int = 5
    # Continuous learning: each snapshot is registered; with auto_publish it becomes production at once
    # (Personalizer's model export), without it it waits as a candidate for evaluate + promote.
    auto_publish: bool = True
    registry_poll_seconds: float = 1.0  # serving processes pick up registry changes this often
    keep_online_artifacts: int = 20  # archived online snapshots whose artifacts are kept
    canary: CanarySettings = field(default_factory=CanarySettings)
    drift_check_seconds: float = 60.0  # 0 disables the periodic drift check
    drift_webhook_url: str | None = None  # POSTed a JSON alert when drift is detected


class FeatureSettings(Struct, forbid_unknown_fields=True):
    online_store: Literal["memory", "redis"] = "memory"  # memory: in-process, snapshotted under data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "kassa"  # namespaces every Redis key, so several deployments can share one server
    definitions_file: str | None = None  # feature definitions (YAML/JSON/Python) applied at start


class StateSettings(Struct, forbid_unknown_fields=True):
    """Per-buyer / per-request state: profiles, frequency caps, idempotency, decisions awaiting their reward
    (see kassa.state). embedded: in process, journaled to <data_dir>/state.db; redis: shared by every
    process."""

    backend: Literal["embedded", "redis"] = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "kassa:state"  # namespaces every key, so several deployments can share one server
    timeout_ms: float = 20.0  # most a decision waits on each Redis round trip (also bounded by its budget)
    retry_seconds: float = 1.0  # after a failure, requests skip Redis (fallback) this long before trying again
    flush_ms: float = 20.0  # embedded: how often the journal commits (what a kill -9 can lose at most)
    await_commit: bool = False  # redis: a decision waits for its write (strict request_id across processes)


class Settings(Struct, forbid_unknown_fields=True):
    data_dir: str = ".kassa"
    catalog_file: str | None = None  # YAML/JSON offers + placements loaded (upserted) at start
    store_timezone: str = "UTC"
    admin_key: str | None = None  # bootstrap keys (plaintext only in env/config; stored hashed)
    publishable_key: str | None = None
    secret_key: str | None = None
    auth: bool = True
    server: ServerSettings = field(default_factory=ServerSettings)
    learn: LearnSettings = field(default_factory=LearnSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    state: StateSettings = field(default_factory=StateSettings)
    decision_log_flush_seconds: float = 1.0
    log_level: str = "info"
    # Per commerce platform (shopify, woocommerce, magento, sfcc, sap): `webhook_secret`,
    # `replay_window_seconds`, ... read by POST /v1/webhooks/{platform}; see kassa.integrations.config.
    integrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _set_path(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = yaml.safe_load(value) if value != "" else ""


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional file, the environment and explicit overrides."""
    tree: dict[str, Any] = {}
    path = path or os.environ.get("KASSA_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise SystemExit(f"config file not found: {path}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"config file {path} must hold a mapping")
        tree.update(loaded)
    for name, value in os.environ.items():
        if name.startswith("KASSA_") and name != "KASSA_CONFIG":
            keys = [p.lower() for p in name[len("KASSA_") :].split("__")]
            _set_path(tree, keys, value)
    for key, value in overrides.items():
        if value is not None:
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    try:
        return msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid configuration: {exc}") from None
