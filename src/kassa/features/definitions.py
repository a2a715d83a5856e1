"""Feature definitions in the vocabulary feature-store users know (Feast's): `Entity`, `FeatureView`,
`Field`, sources and TTLs. Definitions are written in YAML/JSON or Python and validated here.

Three kinds of view:

- ``batch``: rows from a Parquet/CSV file (``source.path``), materialized into the online store (newest row
  per key); training sets read the file's full history;
- ``stream``: windowed aggregates computed from Kassa's event log (``source.events`` plus an ``agg`` per
  field: count, sum, mean, min, max, last, last_n_distinct over a window such as 10m, 1h, 24h, 7d, 30d);
- ``request``: computed from the decision request by a named pure function (see `features.request`);
- ``push``: written only through the injection API (a customer's proprietary signals).

Example (YAML)::

    entities:
      - {name: customer, join_key: customer_id}
    views:
      - name: customer_orders
        kind: stream
        entity: customer
        source: {events: [order]}
        ttl: 30d
        fields:
          - {name: orders_30d, dtype: int, agg: count, window: 30d, default: 0}
          - {name: spend_7d, dtype: float, agg: sum, of: order.total, window: 7d, default: 0.0}
          - {name: last_categories, dtype: list[str], agg: last_n_distinct, of: order.items.category, n: 5,
             window: 365d}
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import traceback
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec import Struct, field

from kassa.schemas import FEATURE_VALUE_MAX

Dtype = Literal["int", "float", "str", "bool", "list[str]", "list[float]", "list[int]"]
ViewKind = Literal["batch", "stream", "request", "push"]
AggFunction = Literal["count", "sum", "mean", "min", "max", "last", "last_n_distinct"]
ENTITY_KINDS = ("customer", "product", "offer", "session", "order")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_NAME = r"^[a-z][a-z0-9_]{0,62}$"


def parse_duration(text: str | float | int) -> float:
    """``"10m"`` -> 600.0 seconds; numbers are seconds already."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 10m, 1h, 24h, 7d, 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


# The longest ttl, window or freshness target a definition may give: a ttl of 99999999999999d put the Redis
# online store's expiry past what PEXPIREAT takes, so every write of the view failed and the stream processor
# retried the same batch from the log without end.
MAX_DURATION_SECONDS = 36_500 * 86_400.0  # 100 years


def _bounded_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than 100 years (36500d)")
    return seconds


Name = msgspec.Meta(pattern=_NAME)


class Entity(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    join_key: str
    description: str = ""


class Field(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    dtype: Dtype
    default: Any = None
    max_length: int = 256  # strings: characters; lists: items
    description: str = ""
    # stream views only:
    agg: AggFunction | None = None
    of: str | None = None  # event path of the aggregated value: value, order.total, order.items.category, ...
    window: str | None = None  # e.g. 1h, 7d
    n: int = 5  # last_n_distinct

    @property
    def window_seconds(self) -> float:
        return parse_duration(self.window) if self.window else 0.0


class Source(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Where a view's values come from: a file for batch views, event types for stream views."""

    # batch views
    path: str | None = None  # Parquet or CSV file, or a glob of them
    timestamp_field: str = "event_timestamp"
    # When each row was written: breaks ties on event time (the later write wins) and lets training sets
    # ignore versions written after their entity time. Unset: a `created_timestamp` column if there is one.
    created_timestamp_field: str | None = None
    # stream views
    events: list[str] | None = None  # order, impression, click, accept, dismiss, conversion, refund
    allowed_lateness: str = "10m"  # events older than the watermark minus this are dropped (and counted)


class FeatureView(Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    kind: ViewKind
    entity: str
    fields: list[Field]
    ttl: str | None = None  # values older than this are stale: served as defaults
    source: Source | None = None
    function: str | None = None  # request views: the request feature function's name
    freshness_target: str = "1m"
    description: str = ""
    online: bool = True
    offline: bool = True

    @property
    def ttl_seconds(self) -> float | None:
        return parse_duration(self.ttl) if self.ttl else None

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def schema_hash(self) -> str:
        """Changes whenever the stored encoding of this view's values would change."""
        shape = [(f.name, f.dtype) for f in self.fields]
        return hashlib.sha256(msgspec.json.encode([self.name, shape])).hexdigest()[:12]


class FeatureRepo(Struct, forbid_unknown_fields=True):
    entities: list[Entity] = field(default_factory=list)
    views: list[FeatureView] = field(default_factory=list)

    def view(self, name: str) -> FeatureView | None:
        for v in self.views:
            if v.name == name:
                return v
        return None

    def buyer_views(self, names: list[str] | None = None) -> list[FeatureView]:
        """The online customer/session views a placement reads: those ``names`` (a placement's
        ``features`` list), else all of them. The decision engine and the model schema hash both use
        this, so what a model was trained on and what serving reads cannot drift apart."""
        views = [v for v in self.views if v.online and v.entity in ("customer", "session") and v.kind != "request"]
        if names is not None:
            wanted = set(names)
            views = [v for v in views if v.name in wanted]
        return views

    def placement_problem(self, features: list[str] | None,
                          context_features: list[str] | None) -> tuple[str, str] | None:
        """What a placement's ``features`` / ``context_features`` name that these definitions do not have, as
        (message, field); None when all is known. An unknown view or ``view.field`` was stored and read as
        nothing: the placement's learner went without it, silently."""
        known = {v.name: v for v in self.buyer_views()}
        for i, name in enumerate(features or ()):
            if name not in known:
                return (f"unknown feature view {name!r}; the customer/session views are "
                        f"{', '.join(sorted(known)) or 'none'}", f"features[{i}]")
        readable = {n: known[n] for n in features} if features is not None else known
        for i, name in enumerate(context_features or ()):
            view_name, dot, field_name = name.partition(".")
            if not dot:
                continue  # a request feature: the wire type checks those
            view = readable.get(view_name)
            if view is None:
                where = "in this placement's `features`" if view_name in known else "defined"
                return f"context feature {name!r}: no view {view_name!r} {where}", f"context_features[{i}]"
            if view.field(field_name) is None:
                return f"context feature {name!r}: view {view_name!r} has no field {field_name!r}", \
                    f"context_features[{i}]"
        return None

    def offer_views(self) -> list[FeatureView]:
        """The online views of the offer entity (bucketed into the learner's action lines)."""
        return [v for v in self.views if v.online and v.entity == "offer"]


class DefinitionError(ValueError):
    """A definition that cannot be applied; the message names the view and field."""


def validate(repo: FeatureRepo) -> None:
    names = re.compile(_NAME)
    entities = {e.name for e in repo.entities}
    seen_views: set[str] = set()
    for e in repo.entities:
        if e.name not in ENTITY_KINDS:
            raise DefinitionError(f"entity {e.name!r}: must be one of {', '.join(ENTITY_KINDS)}")
    for view in repo.views:
        where = f"view {view.name!r}"
        if not names.match(view.name):
            raise DefinitionError(f"{where}: name must match {_NAME}")
        if view.name in seen_views:
            raise DefinitionError(f"{where}: defined twice")
        seen_views.add(view.name)
        if view.entity not in entities:
            raise DefinitionError(f"{where}: unknown entity {view.entity!r}")
        if not view.fields:
            raise DefinitionError(f"{where}: has no fields")
        for label, text in (("ttl", view.ttl), ("freshness_target", view.freshness_target)):
            if text:
                try:
                    seconds = _bounded_duration(text)
                except ValueError as exc:
                    raise DefinitionError(f"{where}: {label}: {exc}") from None
                if label == "ttl" and seconds <= 0:  # every value would be stale the moment it is written
                    raise DefinitionError(f"{where}: ttl {text!r} keeps no value; leave ttl out for values "
                                          "that never go stale")
        seen_fields: set[str] = set()
        for f in view.fields:
            fw = f"{where} field {f.name!r}"
            if not names.match(f.name):
                raise DefinitionError(f"{fw}: name must match {_NAME}")
            if f.name in seen_fields:
                raise DefinitionError(f"{fw}: defined twice")
            seen_fields.add(f.name)
            if f.default is not None:
                try:
                    check_value(f, f.default)
                except ValueError as exc:
                    raise DefinitionError(f"{fw}: default {exc}") from None
            if view.kind == "stream":
                if f.agg is None or f.window is None:
                    raise DefinitionError(f"{fw}: stream fields need `agg` and `window`")
                try:
                    _bounded_duration(f.window)
                except ValueError as exc:
                    raise DefinitionError(f"{fw}: window: {exc}") from None
                if f.agg != "count" and not f.of:
                    raise DefinitionError(f"{fw}: `{f.agg}` needs `of` (the event value to aggregate)")
            elif f.agg is not None:
                raise DefinitionError(f"{fw}: `agg` is only for stream views")
        if view.kind == "stream" and (view.source is None or not view.source.events):
            raise DefinitionError(f"{where}: stream views need `source: {{events: [...]}}`")
        if view.kind == "batch" and (view.source is None or not view.source.path):
            raise DefinitionError(f"{where}: batch views need `source: {{path: ...}}`")
        if view.kind == "request" and not view.function:
            raise DefinitionError(f"{where}: request views need `function`")


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}


def check_value(f: Field, value: Any) -> Any:
    """Validate (and normalise) one value against its field; raises ValueError naming the problem."""
    if value is None:
        return None
    dtype = f.dtype
    if dtype.startswith("list["):
        inner = dtype[5:-1]
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {inner}, got {type(value).__name__}")
        if len(value) > f.max_length:
            raise ValueError(f"list of {len(value)} items exceeds max_length {f.max_length}")
        return [_scalar(inner, v, f.max_length) for v in value]
    return _scalar(dtype, value, f.max_length)


def _scalar(dtype: str, value: Any, max_length: int) -> Any:
    kinds = _SCALARS[dtype]
    if isinstance(value, bool) and dtype != "bool":
        raise ValueError(f"expected {dtype}, got bool")
    if not isinstance(value, kinds):
        raise ValueError(f"expected {dtype}, got {type(value).__name__}")
    if isinstance(value, (int, float)) and not -FEATURE_VALUE_MAX <= value <= FEATURE_VALUE_MAX:  # also NaN
        raise ValueError(f"{value!r} is outside ±{FEATURE_VALUE_MAX:.0e}, what the learner can take")
    if dtype == "float" and isinstance(value, (int, float)):
        return float(value)
    if dtype == "str" and isinstance(value, str) and len(value) > max_length:
        raise ValueError(f"string of {len(value)} characters exceeds max_length {max_length}")
    return value


def load_repo(path: str | Path) -> FeatureRepo:
    """Read definitions from YAML/JSON, or from a Python file defining ``repo = FeatureRepo(...)``
    (or module-level `Entity` / `FeatureView` objects)."""
    path = Path(path)
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"kassa_features_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise DefinitionError(f"{path}: cannot import")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except OSError:
            raise  # missing, a directory, unreadable: the callers name the file and the setting
        except Exception as exc:  # the file's own code failed: one line naming it, not a traceback
            # a SyntaxError's text has the file and line already; otherwise the file's innermost frame
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__)
                     if Path(f.filename).resolve() == path.resolve()]
            where = f", line {lines[-1]}" if lines and not isinstance(exc, SyntaxError) else ""
            raise DefinitionError(f"{path}{where}: importing it raised {type(exc).__name__}: {exc}") from None
        repo = getattr(module, "repo", None)
        if not isinstance(repo, FeatureRepo):
            values = vars(module).values()
            repo = FeatureRepo(
                entities=[v for v in values if isinstance(v, Entity)],
                views=[v for v in values if isinstance(v, FeatureView)],
            )
    else:
        import yaml

        try:
            with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file
                tree = yaml.safe_load(stream) or {}
            repo = msgspec.convert(tree, FeatureRepo)
        except yaml.YAMLError as exc:
            raise DefinitionError(f"{path}: not valid YAML/JSON: {exc}") from None
        except msgspec.ValidationError as exc:
            raise DefinitionError(f"{path}: {exc}") from None
        except UnicodeDecodeError as exc:  # a binary or non-UTF-8 file: was a traceback from `kassa features apply`
            raise DefinitionError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    validate(repo)
    return repo
