"""Scale profiles: a buyer's traffic, request mix, payload shapes and SLO, as one YAML file.

Owns :class:`Profile` (and its parts), :func:`load_profile` and :class:`ProfileError`. A profile says
how busy the store is (``traffic``: checkout sessions a day, the busiest hour's share of them and the
busiest minute's multiplier over that hour — or an explicit request rate), how each checkout turns
into requests (``mix``: decisions, impression/click/accept beacons, order webhooks, feature pushes, per
checkout), what the requests look like (``payload``), how many idle keep-alive browsers to hold open
(``connections``) and what "fast enough" means (``slo``). Every validation error names the file and
the field and says what was expected, so a typo in a profile costs one read of the message.

Built-in profiles ship in ``kassa/loadtest/profiles/`` and are found by file name without ``.yaml``
(``--profile black-friday-peak``).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct, field

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"

REQUEST_TYPES = ("decision", "impression", "click", "accept", "webhook", "feature_push", "noop")
"""Request types of a mix. ``noop`` is ``POST /_bench/noop`` (the framework floor; bench servers only)."""

Share = Annotated[float, Meta(ge=0, le=1000)]
Positive = Annotated[float, Meta(gt=0)]


class ProfileError(ValueError):
    """A profile file that cannot be used, with a message that names the file and the field."""


class Traffic(Struct, forbid_unknown_fields=True, omit_defaults=True):
    daily_sessions: Annotated[float, Meta(gt=0)] | None = None  # checkout sessions on the modelled day
    peak_hour_share: Annotated[float, Meta(gt=0, le=1)] = 0.1  # share of the day's sessions in its busiest hour
    peak_multiplier: Annotated[float, Meta(ge=1, le=100)] = 2.0  # busiest minute vs. that hour's average
    rate: Positive | None = None  # explicit requests/s (all types together); overrides the above


class Mix(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Requests of each type per checkout session (shares of the rate after normalising); unlisted: 0."""

    decision: Share = 0.0
    impression: Share = 0.0
    click: Share = 0.0
    accept: Share = 0.0
    webhook: Share = 0.0
    feature_push: Share = 0.0
    noop: Share = 0.0

    def per_session(self) -> float:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, float]:
        return {t: float(getattr(self, t)) for t in REQUEST_TYPES}

    def fractions(self) -> dict[str, float]:
        total = self.per_session()
        return {t: v / total for t, v in self.as_dict().items() if v > 0}


class FeaturePushShape(Struct, forbid_unknown_fields=True):
    view: str = "customer_signals"  # a push view the server knows
    values: dict[str, Any] = field(default_factory=lambda: {"segment": "loadtest"})
    rows: Annotated[int, Meta(ge=1, le=1000)] = 1


class WebhookShape(Struct, forbid_unknown_fields=True):
    platform: Literal["shopify", "woocommerce"] = "shopify"


class Payload(Struct, forbid_unknown_fields=True):
    placement: str = "order_confirmation"
    items_per_order: Annotated[list[Annotated[int, Meta(ge=1, le=500)]], Meta(min_length=2, max_length=2)] = field(
        default_factory=lambda: [1, 4]
    )  # [min, max], uniform
    candidates: Annotated[int, Meta(ge=0, le=1000)] = 0  # 0: the placement's own candidates
    offer_ids: list[str] = []  # where `candidates` are drawn from
    customers: Annotated[int, Meta(ge=1)] = 100_000  # distinct buyers (returning buyers repeat)
    products: Annotated[int, Meta(ge=1)] = 5_000  # distinct products in the generated orders
    categories: Annotated[int, Meta(ge=1, le=10_000)] = 30
    currency: Annotated[str, Meta(pattern="^[A-Z]{3}$")] = "USD"
    countries: Annotated[list[Annotated[str, Meta(pattern="^[A-Z]{2}$")]], Meta(min_length=1)] = field(
        default_factory=lambda: ["US", "US", "US", "CA", "GB", "DE", "FR", "AU"]
    )
    item_price: Annotated[list[Annotated[float, Meta(ge=0)]], Meta(min_length=2, max_length=2)] = field(
        default_factory=lambda: [5.0, 150.0]
    )  # [min, max], uniform
    feature_push: FeaturePushShape = field(default_factory=FeaturePushShape)
    webhook: WebhookShape = field(default_factory=WebhookShape)


class Connections(Struct, forbid_unknown_fields=True):
    idle: Annotated[int, Meta(ge=0, le=1_000_000)] = 0  # idle keep-alive browsers held open during the run
    refresh_seconds: Annotated[float, Meta(ge=0)] = 25.0  # each idle one sends GET /healthz this often (0: never)
    active: Annotated[int, Meta(ge=1, le=10_000)] = 64  # keep-alive connections carrying the load, per worker


class Slo(Struct, forbid_unknown_fields=True):
    p99_ms: Positive = 200.0
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.001
    p50_ms: Positive | None = None
    p999_ms: Positive | None = None
    max_ms: Positive | None = None
    min_throughput_ratio: Annotated[float, Meta(ge=0, le=1)] = 0.95  # 2xx answers / requests scheduled in the window


class Capacity(Struct, forbid_unknown_fields=True):
    headroom: Annotated[float, Meta(ge=0, lt=1)] = 0.3  # share of a node's SLO-meeting rate kept spare
    spare_nodes: Annotated[int, Meta(ge=0)] = 1  # on top, so one node can fail at peak


class Profile(Struct, forbid_unknown_fields=True):
    name: str
    description: str = ""
    traffic: Traffic = field(default_factory=Traffic)
    ramp_seconds: Annotated[float, Meta(ge=0, le=86_400)] = 10.0
    duration_seconds: Annotated[float, Meta(gt=0, le=86_400)] = 60.0
    schedule: Literal["fixed", "poisson"] = "poisson"
    mix: Mix = field(default_factory=lambda: Mix(decision=1.0))  # no mix given: decisions only
    payload: Payload = field(default_factory=Payload)
    connections: Connections = field(default_factory=Connections)
    slo: Slo = field(default_factory=Slo)
    capacity: Capacity = field(default_factory=Capacity)
    source: str = ""  # the file it came from (set by load_profile)

    # -- derived figures
    def peak_sessions_per_second(self) -> float | None:
        t = self.traffic
        if t.daily_sessions is None:
            return None
        return t.daily_sessions * t.peak_hour_share / 3600.0 * t.peak_multiplier

    def peak_rate(self) -> float:
        """Requests/s at the profile's peak (all request types)."""
        if self.traffic.rate is not None:
            return float(self.traffic.rate)
        sessions = self.peak_sessions_per_second()
        assert sessions is not None  # validate() guarantees one of the two
        return sessions * self.mix.per_session()

    def rate_derivation(self) -> str:
        t = self.traffic
        if t.rate is not None:
            return f"explicit rate {t.rate:,.6g} requests/s"
        sessions = self.peak_sessions_per_second() or 0.0
        return (
            f"{t.daily_sessions:,.0f} checkouts/day x {t.peak_hour_share:.0%} in the peak hour / 3600 s "
            f"x {t.peak_multiplier:g} peak multiplier = {sessions:,.1f} checkouts/s x "
            f"{self.mix.per_session():.2f} requests per checkout = {self.peak_rate():,.1f} requests/s"
        )

    def validate(self) -> None:
        """Cross-field checks msgspec cannot express; raises ``ProfileError`` naming the field."""
        where = self.source or self.name
        if self.traffic.rate is None and self.traffic.daily_sessions is None:
            raise ProfileError(f"{where}: traffic: give either `daily_sessions` (with `peak_hour_share` and "
                               f"`peak_multiplier`) or an explicit `rate` in requests/s")
        if self.mix.per_session() <= 0:
            raise ProfileError(f"{where}: mix: at least one request type needs a share above 0 "
                               f"(types: {', '.join(REQUEST_TYPES)})")
        lo, hi = self.payload.items_per_order
        if lo > hi:
            raise ProfileError(f"{where}: payload.items_per_order: [min, max] with min <= max, got [{lo}, {hi}]")
        plo, phi = self.payload.item_price
        if plo > phi:
            raise ProfileError(f"{where}: payload.item_price: [min, max] with min <= max, got [{plo}, {phi}]")
        if self.payload.candidates and len(self.payload.offer_ids) < self.payload.candidates:
            raise ProfileError(
                f"{where}: payload.candidates: {self.payload.candidates} candidates per decision need at least "
                f"that many `payload.offer_ids` (got {len(self.payload.offer_ids)}); set candidates: 0 to let the "
                f"placement choose its own"
            )
        rate = self.peak_rate()
        if not math.isfinite(rate) or rate <= 0:
            raise ProfileError(f"{where}: traffic: the peak rate works out to {rate}, not a positive number")


def _field_path(msg: str) -> tuple[str, str]:
    """Split msgspec's "... - at `$.a.b[0]`" into (``a.b[0]``, the message)."""
    m = re.search(r" - at `\$\.?([^`]*)`$", msg)
    if not m:
        return "", msg
    return m.group(1), msg[: m.start()]


def _known_fields(path: str) -> list[str]:
    struct: Any = Profile
    for part in [p for p in re.sub(r"\[\d+\]", "", path).split(".") if p]:
        hints = msgspec.structs.fields(struct)
        nxt = next((f.type for f in hints if f.name == part), None)
        if nxt is None or not (isinstance(nxt, type) and issubclass(nxt, Struct)):
            return []
        struct = nxt
    return [f.name for f in msgspec.structs.fields(struct)]


_WORDS = {"`float`": "a number", "`int`": "a whole number", "`str`": "text", "`array`": "a list",
          "`object`": "a mapping", "`bool`": "true or false", "`null`": "nothing", "`float | null`": "a number"}


_CHOICES = {"schedule": "fixed, poisson", "payload.webhook.platform": "shopify, woocommerce"}


def _plain(msg: str) -> str:
    """msgspec's type names in words a profile author uses (the value given is appended separately)."""
    msg = re.sub(r", got `[^`]+`$", "", msg)
    for word, plain in _WORDS.items():
        msg = msg.replace(word, plain)
    return msg[:1].lower() + msg[1:]


def _given(data: Any, path: str) -> str:
    node = data
    for part in re.findall(r"[^.\[\]]+", path):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return ""
    text = repr(node)
    return f", got {text if len(text) <= 60 else text[:57] + '...'}"


def parse_profile(data: Any, source: str = "<profile>") -> Profile:
    """Validate a loaded YAML/JSON mapping into a :class:`Profile`."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a mapping (name:, traffic:, mix:, ...), got {type(data).__name__}")
    try:
        profile = msgspec.convert(data, Profile, strict=False)
    except msgspec.ValidationError as exc:
        path, msg = _field_path(str(exc))
        unknown = re.match(r"Object contains unknown field `([^`]+)`", msg)
        if unknown:
            known = _known_fields(path)
            near = difflib.get_close_matches(unknown.group(1), known, n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else (f"; known: {', '.join(known)}" if known else "")
            where = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise ProfileError(f"{source}: {where}: unknown field{hint}") from None
        missing = re.match(r"Object missing required field `([^`]+)`", msg)
        if missing:
            where = f"{path}.{missing.group(1)}" if path else missing.group(1)
            raise ProfileError(f"{source}: {where}: required field is missing") from None
        if msg.startswith("Invalid enum value") and path in _CHOICES:
            msg = f"must be one of {_CHOICES[path]}"
        raise ProfileError(f"{source}: {path or '(top level)'}: {_plain(msg)}{_given(data, path)}") from None
    profile.source = source
    profile.validate()
    return profile


def builtin_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a built-in profile (``black-friday-peak``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    builtin = builtin_profiles()
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    names = ", ".join(builtin) or "none"
    raise ProfileError(f"{name_or_path}: no such file, and not a built-in profile (built-in: {names})")


def load_profile(name_or_path: str | Path) -> Profile:
    """Read and validate a profile file (or a built-in profile by name)."""
    path = resolve_profile_path(name_or_path)
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_profile(data, str(path))


def default_profile(rate: float, duration: float) -> Profile:
    """What ``kassa loadtest --rate R --duration S`` runs without a profile: decisions only, no ramp."""
    return parse_profile(
        {"name": "decisions", "description": "decisions only", "traffic": {"rate": rate},
         "ramp_seconds": 0, "duration_seconds": duration, "schedule": "fixed", "mix": {"decision": 1}},
        "<command line>",
    )
