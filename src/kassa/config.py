"""One typed settings object, read from a YAML file and then ``KASSA_*`` environment variables.

Precedence: defaults < file (``--config`` or ``KASSA_CONFIG``) < environment. An env var is the
upper-cased field path joined with ``__``: ``KASSA_SERVER__PORT=9000``, ``KASSA_DATA_DIR=/var/kassa``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta, Struct, field


class RateLimits(Struct, forbid_unknown_fields=True):
    """Requests per second allowed to ONE key of each kind (a token bucket per key, burst 2 s of it); over it:
    429 with Retry-After. 0 = unlimited. A publishable key carries a whole shop's browser traffic.

    A struct, not a dict: ``rate_limits: {admin: 10}`` (or ``KASSA_SERVER__RATE_LIMITS__ADMIN=10``) replaced
    the whole dict and left publishable and secret keys unlimited, and a misspelt kind was ignored."""

    publishable: Annotated[float, Meta(ge=0)] = 5_000.0
    secret: Annotated[float, Meta(ge=0)] = 1_000.0
    admin: Annotated[float, Meta(ge=0)] = 100.0


class ServerSettings(Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65_535)] = 8000  # 0: any free port
    max_body_bytes: Annotated[int, Meta(ge=1)] = 65_536  # -1 refused every request, even an empty body (413)
    idempotency_ttl_seconds: Annotated[float, Meta(ge=0)] = 600.0
    idempotency_max_entries: Annotated[int, Meta(ge=0)] = 100_000
    cors_origins: list[str] = []
    bench_endpoints: bool = False  # POST /_bench/noop: a do-nothing endpoint for latency baselines
    # Event, order and feature timestamps sent through the API further than this from now (either way)
    # are refused naming the field: 0, -1e12 or 1e300 would otherwise break windows, joins and Parquet.
    timestamp_window_seconds: Annotated[float, Meta(gt=0)] = 7 * 86_400.0
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # GET /metrics answers only `Authorization: Bearer <token>` when set (Prometheus' `authorization`
    # credentials); unset, it answers anyone who reaches it (docs/security.md). Best from the environment:
    # KASSA_SERVER__METRICS_TOKEN.
    metrics_token: str | None = None


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


class PublishGuardSettings(Struct, forbid_unknown_fields=True):
    """Continuous learning publishes a snapshot only when OPE on recent traffic says it is not worse than what
    serves (kassa.learn.online.guard, ADR 0010). Off by default: with these settings it held every snapshot of
    `kassa demo --headless --checkouts 20000 --seed 1` (the demo then served its baseline only, 1.61x random and
    1.11x the best static list, against 2.67x and 1.67x with the guard off; measured 2026-12-06).

    Serving processes read ``enabled`` too: only then do their decisions carry every candidate's learner line
    (what the guard replays), so a `kassa learn` elsewhere with the guard on needs it on for its workers."""

    enabled: bool = False
    window: int = 3_000  # recent top slots (with their candidates) the check replays
    min_ess: float = 20.0  # below this effective sample size (of clipped weights) the snapshot is held
    z: float = 1.0  # held when worse than what serves by more than z standard errors...
    tolerance: float = 0.02  # ...and by more than this share of its value


class LearnSettings(Struct, forbid_unknown_fields=True):
    # how often the online learner publishes a model snapshot
    snapshot_every_seconds: Annotated[float, Meta(ge=0)] = 10.0
    # ...when at least this many examples were learned since the last
    snapshot_min_learns: Annotated[int, Meta(ge=0)] = 50
    # VW -l; 0.5 before ADR 0010's addendum (offer world: noisier, no faster after a drift)
    learning_rate: Annotated[float, Meta(gt=0)] = 0.1
    vw_extra_args: str = ""
    keep_snapshots: int = 5
    # Continuous learning: each snapshot is registered; with auto_publish it becomes production at once
    # (Personalizer's model export), without it it waits as a candidate for evaluate + promote.
    auto_publish: bool = True
    registry_poll_seconds: Annotated[float, Meta(gt=0)] = 1.0  # serving processes pick up registry changes this often
    keep_online_artifacts: int = 20  # archived online snapshots whose artifacts are kept
    canary: CanarySettings = field(default_factory=CanarySettings)
    guard: PublishGuardSettings = field(default_factory=PublishGuardSettings)
    drift_check_seconds: Annotated[float, Meta(ge=0)] = 60.0  # 0 disables the periodic drift check
    drift_webhook_url: str | None = None  # POSTed a JSON alert when drift is detected


class FeatureSettings(Struct, forbid_unknown_fields=True):
    online_store: Literal["memory", "redis"] = "memory"  # memory: in-process, snapshotted under data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "kassa"  # namespaces every Redis key, so several deployments can share one server
    definitions_file: str | None = None  # feature definitions (YAML/JSON/Python) applied at start
    # Who computes the stream views: "inprocess" (every `kassa serve` process, rows written before the event
    # request returns), "external" (only `kassa stream`), "auto": in process, except in a serving worker of
    # `kassa serve --workers N` on the Redis online store, where `kassa stream` writes the shared rows (several
    # aggregators writing one Redis row would each hold part of the counts).
    streaming: Literal["auto", "inprocess", "external"] = "auto"
    # Circuit breaker in front of Redis: open after this many consecutive failures, probe again after...
    breaker_failures: Annotated[int, Meta(ge=1)] = 3
    breaker_reset_seconds: Annotated[float, Meta(ge=0)] = 1.0


class MetadataSettings(Struct, forbid_unknown_fields=True):
    """Where catalog, keys and the feature and model registries live, and how changes reach processes."""

    # None: SQLite at <data_dir>/kassa.db (embedded). Production: postgresql+psycopg://user@host:5432/kassa
    url: str | None = None
    # Model files: "local" (<data_dir>/models/artifacts), "database" (rows in the metadata database, read by
    # every process; ADR 0007), "auto" = database on PostgreSQL, local on SQLite.
    artifacts: Literal["auto", "local", "database"] = "auto"
    poll_seconds: Annotated[float, Meta(gt=0)] = 0.25  # SQLite: how often the change counters are read (one tiny query)
    # PostgreSQL: changes arrive by LISTEN/NOTIFY; the counters are also re-read this often, and at once
    # after the listening connection comes back, so a notification missed while it was away is not lost.
    recheck_seconds: Annotated[float, Meta(gt=0)] = 5.0
    # PostgreSQL: the server ends a session of this process idle inside a transaction this long (rolled back, its
    # locks released): a paused learner (SIGSTOP, a VM freeze) kept the standby's takeover waiting on the lock of its
    # registry write until it resumed. Under the lease's takeover time (ADR 0009); 0 turns it off.
    idle_in_transaction_seconds: Annotated[float, Meta(ge=0, le=86400)] = 5.0


class EventSettings(Struct, forbid_unknown_fields=True):
    """Where events and decision records go (see kassa.events.jetstream and ADR 0008)."""

    backend: Literal["sqlite", "jetstream"] = "sqlite"  # sqlite: <data_dir>/events.db, embedded
    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = "kassa"  # subjects <prefix>.events|decisions, streams <PREFIX>_EVENTS|_DECISIONS
    # JetStream duplicate_window: an event_id repeated within it is dropped. At most retention_seconds (when set):
    # NATS refuses a stream whose window outlasts its messages, and every event then stayed in the spool.
    dedupe_window_seconds: Annotated[float, Meta(ge=0)] = 7200.0
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1  # stream replicas (3 on a NATS cluster; JetStream allows 1-5)
    retention_seconds: Annotated[float, Meta(ge=0)] = 0.0  # stream max_age; 0 keeps everything
    ack_timeout_seconds: Annotated[float, Meta(gt=0)] = 2.0  # a publish not acked within this is spooled
    spool_dir: str | None = None  # default <data_dir>/spool


class RoleSettings(Struct, forbid_unknown_fields=True):
    """Process roles (``kassa serve --workers N``, ``kassa learn``); see docs/deploy.md and ADR 0009."""

    # HTTP worker processes of `kassa serve`: 0 = one per core when the learner runs apart (`learner` not
    # "inprocess"), else 1 (an in-process learner sees only its own process's decisions).
    workers: Annotated[int, Meta(ge=0, le=1024)] = 0
    # Where the learner runs under `kassa serve`: "inprocess" (today's task, the embedded default), "child"
    # (serve starts `kassa learn` as a child process: still one command), "external" (`kassa learn` runs
    # elsewhere, e.g. its own Deployment/unit, with a standby).
    learner: Literal["inprocess", "child", "external"] = "inprocess"
    # How the workers share the port: "shared" (one socket bound by the supervisor, inherited by every
    # worker), "reuseport" (a socket per worker with SO_REUSEPORT; the kernel balances) or "auto" (reuseport on
    # Linux, where the kernel spreads connections by hash, shared elsewhere). ADR 0009.
    balance: Literal["auto", "shared", "reuseport"] = "auto"
    # The lease that makes one `kassa learn` active per placement: "file" (flock under data_dir: one machine),
    # "redis" (SET NX PX + renewal: any number of machines).
    lease: Literal["file", "redis"] = "file"
    redis_url: str = "redis://127.0.0.1:6379/0"
    lease_prefix: str = "kassa"
    # a dead learner's lease lapses after this; the standby takes over then
    lease_ttl_seconds: Annotated[float, Meta(gt=0)] = 5.0
    # The active learner's leases are renewed from a thread of their own while its learning loop comes round at
    # least this often; a loop stuck longer is taken for hung: renewal stops (its leases lapse, a standby takes
    # over) and it exits 75. Above the ~13 s one round can wait on a hung metadata PostgreSQL (ADR 0009).
    learner_stall_seconds: Annotated[float, Meta(gt=0)] = 60.0
    # `kassa learn` (also as `--learner child`) lowers its CPU priority by this much (os.nice) at start, so that
    # serving workers on the same cores win the CPU when it is short; the learner keeps what they leave, which
    # at 1,000 decisions/s on 2 cores is plenty (ADR 0009). 0 leaves it alone.
    learner_nice: Annotated[int, Meta(ge=0, le=19)] = 10
    # What feeds `kassa learn`: "sqlite" tails the local logs (events.db + decision_records.db, one machine);
    # "jetstream" reads the join records and events streams (needs events.backend: jetstream; serving
    # workers then publish each decision's join record to <prefix>.records). docs/deploy.md.
    learner_input: Literal["sqlite", "jetstream"] = "sqlite"
    # Events are applied this long after they were stored, so a decision record written a moment after
    # its first event is registered first; the learner closes decisions on the same delayed clock.
    input_settle_seconds: Annotated[float, Meta(ge=0)] = 0.5
    # Who writes the decision log (<data_dir>/decisions) on events.backend: jetstream, where serving workers publish
    # each decision's record instead of writing Parquet: "learner" (`kassa learn` runs the writer beside the
    # learning, one per deployment by a lease of its own; a standby learner takes it over) or "off" (the learners
    # leave it to `kassa log write`, run separately). No effect on events.backend: sqlite. docs/deploy.md.
    decision_log_writer: Literal["learner", "off"] = "learner"


class StateSettings(Struct, forbid_unknown_fields=True):
    """Per-buyer / per-request state: profiles, frequency caps, idempotency, decisions awaiting their reward
    (see kassa.state). embedded: in process, journaled to <data_dir>/state.db; redis: shared by every
    process."""

    backend: Literal["embedded", "redis"] = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "kassa:state"  # namespaces every key, so several deployments can share one server
    # most a decision waits on each Redis round trip (also bounded by its budget)
    timeout_ms: Annotated[float, Meta(gt=0)] = 20.0
    retry_seconds: float = 1.0  # after a failure, requests skip Redis (fallback) this long before trying again
    # embedded: how often the journal commits (what a kill -9 can lose at most)
    flush_ms: Annotated[float, Meta(gt=0)] = 20.0
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
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    events: EventSettings = field(default_factory=EventSettings)
    roles: RoleSettings = field(default_factory=RoleSettings)
    state: StateSettings = field(default_factory=StateSettings)
    # Parquet flush period: a kill -9 loses at most the decisions of one period plus one write (~0.1 s)
    decision_log_flush_seconds: Annotated[float, Meta(gt=0)] = 0.5
    # A decision id of the random form (made before ids carried their time) is looked for in this many days of the
    # log, newest first (GET /v1/decisions/{id}, the dashboard's explorer): what bounds the cost of any lookup
    decision_lookup_days: Annotated[float, Meta(gt=0)] = 30.0
    # uvicorn's levels (the HTTP workers of `kassa serve --workers N`); another word was a KeyError in every worker
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    # Per commerce platform (shopify, woocommerce, magento, sfcc, sap): `webhook_secret`,
    # `replay_window_seconds`, ... read by POST /v1/webhooks/{platform}; see kassa.integrations.config.
    integrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def metadata_url(self) -> str:
        """The metadata database: ``metadata.url``, else the SQLite file in the data dir."""
        return self.metadata.url or str(self.data_path / "kassa.db")

    @property
    def artifacts_in_database(self) -> bool:
        mode = self.metadata.artifacts
        return mode == "database" or (mode == "auto" and self.metadata_url.startswith("postgresql"))


def _redis_url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """Why ``url`` is not a Redis URL Kassa can connect to, or None (it was a traceback at the first use)."""
    parts = urlsplit(url)
    example = "redis://host:6379/0"
    if parts.scheme not in schemes:
        if parts.scheme in ("rediss", "unix"):
            return f"{url!r}: this connection speaks plain TCP only (no TLS, no unix socket): use {example}"
        return f"{url!r} is not a Redis URL (use {' or '.join(s + '://' for s in schemes)}, e.g. {example})"
    if parts.scheme == "unix":
        return None if parts.path else f"{url!r} names no socket path (unix:///path/to/redis.sock)"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return f"{url!r}: the port is not a number (e.g. {example})"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"{url!r}: the database after the last / must be a number (e.g. {example})"
    return None


def _metadata_url_problem(url: str) -> str | None:
    """Why ``url`` is not a metadata database URL Kassa can open, or None. A bare string (``notaurl``, a path) was
    taken as a SQLite file named that in the current directory: a fresh empty catalog that said nothing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "postgresql+psycopg://kassa@db:5432/kassa, or sqlite:////var/lib/kassa/kassa.db"
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ArgumentError:
        return f"{url!r} is not a database URL (e.g. {example}; leave it unset for <data_dir>/kassa.db)"
    except ValueError:
        return f"{url!r}: the port is not a number (e.g. {example})"
    backend, driver = parsed.get_backend_name(), parsed.drivername.partition("+")[2]
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return (f"{url!r} is an in-memory database, empty at every start and seen by no other process: name a "
                    "file (sqlite:////var/lib/kassa/kassa.db) or leave metadata.url unset")
        return None
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            return f"{url!r}: Kassa connects to PostgreSQL with psycopg 3: use postgresql+psycopg://..."
        return None
    return f"{url!r}: the metadata database is SQLite or PostgreSQL (e.g. {example})"


def _nats_url_problem(url: str) -> str | None:
    """Why ``url`` is not a NATS server URL, or None. nats-py takes a bare ``notaurl`` for a host of that name on
    port 4222, so a typo was a bus that spooled every event and said only 'no servers available'."""
    parts = urlsplit(url)
    example = "nats://host:4222"
    if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        return f"{url!r} is not a NATS URL (nats://, tls://, ws:// or wss://, e.g. {example})"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return f"{url!r}: the port is not a number (e.g. {example})"
    return None


def _error_source(message: str, path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> str:
    """Where the value a validation error points at came from: a command-line option, an environment variable
    or the settings file (`` in FILE``), so the message names what to edit."""
    at = re.search(r"at `\$((?:\.\w+)*)", message)
    keys = at.group(1).split(".")[1:] if at else []
    unknown = re.match(r"Object contains unknown field `(\w+)`", message)
    if unknown:
        keys.append(unknown.group(1))
    for key, value in overrides.items():
        if value is not None and keys and keys[: len(key.split("."))] == key.split("."):
            return f" (command-line option for {key})"
    env = {name.upper(): name for name in os.environ}
    for depth in range(len(keys), 0, -1):
        name = env.get("KASSA_" + "__".join(keys[:depth]).upper())
        if name is not None:
            return f" (environment variable {name})"
    return f" in {path}" if path else ""


def _set_path(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    try:
        node[path[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:  # not YAML (a key like `[abc`, a value with a stray `: `): the string as given
        node[path[-1]] = value


def _refuse_url(name: str, problem: str | None, path: str | os.PathLike[str] | None,
                overrides: dict[str, Any]) -> None:
    if problem is not None:
        raise SystemExit(f"invalid configuration{_error_source(f'at `$.{name}`', path, overrides)}: {name}: {problem}")


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional file, the environment and explicit overrides."""
    tree: dict[str, Any] = {}
    path = path or os.environ.get("KASSA_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as stream:  # a stream, so YAML errors name the file
                loaded = yaml.safe_load(stream) or {}
        except FileNotFoundError:
            raise SystemExit(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
            raise SystemExit(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        except yaml.YAMLError as exc:
            raise SystemExit(f"config file {path} is not valid YAML: {exc}") from None
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
    roles = tree.get("roles")
    if isinstance(roles, dict) and roles.get("decision_log_writer") is False:
        # YAML 1.1 reads the documented `decision_log_writer: off` (file or KASSA_ROLES__DECISION_LOG_WRITER=off)
        # as false: it was refused with "Expected `str`, got `bool`"
        roles["decision_log_writer"] = "off"
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid configuration{_error_source(str(exc), path, overrides)}: {exc}") from None
    from kassa.timezones import timezone_error

    problem = timezone_error(settings.store_timezone)
    if problem is not None:
        raise SystemExit(f"invalid configuration: store_timezone: {problem}")
    token = settings.server.metrics_token
    if token is not None and (len(token) < 16 or any(c.isspace() for c in token)):
        raise SystemExit("invalid configuration: server.metrics_token: use at least 16 characters without spaces "
                         "(e.g. `openssl rand -hex 24`), or leave it unset for an open /metrics")
    for name, url, schemes in (("features.redis_url", settings.features.redis_url, ("redis", "rediss", "unix")),
                               ("roles.redis_url", settings.roles.redis_url, ("redis", "rediss", "unix")),
                               # the per-buyer state speaks plain TCP itself (kassa.redisconn)
                               ("state.redis_url", settings.state.redis_url,
                                ("redis",) if settings.state.backend == "redis" else ("redis", "rediss", "unix"))):
        _refuse_url(name, _redis_url_problem(url, schemes), path, overrides)
    if settings.metadata.url is not None:
        _refuse_url("metadata.url", _metadata_url_problem(settings.metadata.url), path, overrides)
    _refuse_url("events.nats_url", _nats_url_problem(settings.events.nats_url), path, overrides)
    hook = settings.learn.drift_webhook_url
    if hook is not None and (urlsplit(hook).scheme not in ("http", "https") or not urlsplit(hook).hostname):
        # was refused only once the data dir and its database were made, with a traceback
        _refuse_url("learn.drift_webhook_url", f"{hook!r} is not an http:// or https:// URL (e.g. "
                    "https://hooks.example.com/kassa-drift)", path, overrides)
    events = settings.events
    if events.retention_seconds and events.dedupe_window_seconds > events.retention_seconds:
        raise SystemExit(f"invalid configuration{_error_source('at `$.events.retention_seconds', path, overrides)}: "
                         f"events.dedupe_window_seconds ({events.dedupe_window_seconds:g}) must not exceed "
                         f"events.retention_seconds ({events.retention_seconds:g}): JetStream refuses such a stream "
                         "(lower the dedupe window, or keep messages longer; 0 keeps everything)")
    if settings.roles.learner_input == "jetstream" and settings.events.backend != "jetstream":
        raise SystemExit("invalid configuration: roles.learner_input: jetstream needs events.backend: jetstream "
                         "(the learner reads the decisions and events the serving processes publish there)")
    return settings
