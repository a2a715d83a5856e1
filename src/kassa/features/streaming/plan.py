"""Plans of stream views: how a view's definition becomes bucket operations, checked once when the engine
is built (`plan_view`; a bad definition raises `DefinitionError` naming the view and field).

Fields of one window share one series of buckets (``resolution`` buckets of width ``window /
resolution``); fields of one statistic of one path share its slots. A bucket is a flat list and each
operation owns a slot range (the layout is below). A series also gets its pruning bound: a row holds at
most ``1.5 R + lateness / w + 3`` buckets per window (R live ones, the ones a late event may still reach,
and slack that keeps pruning amortised O(1) per bucket).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from kassa import schemas
from kassa.features.definitions import DefinitionError, FeatureView, Field, check_value, parse_duration
from kassa.features.streaming.fields import FieldPlan
from kassa.features.streaming.keys import KEY_EXTRACTORS
from kassa.features.streaming.paths import Items, PathFn, compile_path

EVENT_TYPES: tuple[str, ...] = get_args(schemas.EventType)

INF = math.inf


# Bucket operations; a bucket is a flat list, each op owns a slot range.
EVCOUNT, NUM, CNT, LAST, LND = range(5)
_AGGS_NUMERIC = ("sum", "mean", "min", "max")
# Initial slots: event count | count, sum, min, max | value count | (stamp, value) | {value: stamp}
_SLOTS: dict[int, list[Any]] = {EVCOUNT: [0], NUM: [0, 0, INF, -INF], CNT: [0], LAST: [None], LND: [None]}


@dataclass(slots=True)
class SeriesPlan:
    window: float
    width: float
    limit: int = 0  # prune when a row holds this many buckets
    reach: int = 0  # buckets the lateness spans (+1 for float rounding at the edges)
    ops: list[tuple[int, int, int, int]] = field(default_factory=list)  # (op, path index, slot, cap)
    template: list[Any] = field(default_factory=list)
    fields: list[FieldPlan] = field(default_factory=list)
    lnd_slots: list[int] = field(default_factory=list)
    last_slots: list[int] = field(default_factory=list)

    @property
    def ordered(self) -> bool:
        """Whether its readers need the live buckets newest first."""
        return bool(self.lnd_slots or self.last_slots)


@dataclass(slots=True)
class ViewPlan:
    index: int
    view: FeatureView
    entity: str
    keys: Callable[[schemas.Event], list[tuple[str, Items | None]]]
    lateness: float
    paths: list[PathFn]
    series: list[SeriesPlan]
    field_order: list[str]


def _coercer(f: Field, agg: str, kind: str | None) -> Callable[[Any], Any]:
    dt = f.dtype
    where = f"field {f.name!r}"
    if agg == "last_n_distinct":
        if kind == "num" and dt == "list[int]":
            return lambda v: [round(x) for x in v]
        if kind == "num" and dt == "list[float]":
            return lambda v: [float(x) for x in v]
        if kind != "num" and dt == "list[str]":
            return lambda v: [s[: f.max_length] for s in v]
        want = "list[float] or list[int]" if kind == "num" else "list[str]"
        raise DefinitionError(f"{where}: last_n_distinct of {f.of!r} needs dtype {want}")
    if agg == "last" and kind in ("str", "list"):
        if dt != "str":
            raise DefinitionError(f"{where}: last of {f.of!r} needs dtype str")
        return lambda v: v[: f.max_length]
    if dt == "int":
        return lambda v: v if type(v) is int else round(v)
    if dt == "float":
        return float
    raise DefinitionError(f"{where}: {agg} needs dtype int or float")


def plan_view(index: int, view: FeatureView, resolution: int) -> ViewPlan:
    where = f"view {view.name!r}"
    if view.entity not in KEY_EXTRACTORS:
        raise DefinitionError(f"{where}: events carry no {view.entity} key; stream views need one of "
                              f"{', '.join(KEY_EXTRACTORS)}")
    if view.source is None or not view.source.events:
        raise DefinitionError(f"{where}: stream views need `source: {{events: [...]}}`")
    unknown = [e for e in view.source.events if e not in EVENT_TYPES]
    if unknown:  # a typo ('ordr') matched no event, so the view stayed at its defaults for ever
        raise DefinitionError(f"{where}: unknown event type {unknown[0]!r} in source.events (known: "
                              f"{', '.join(EVENT_TYPES)})")
    lateness = parse_duration(view.source.allowed_lateness)
    path_index: dict[str, int] = {}
    paths: list[PathFn] = []
    kinds: list[str] = []
    series: dict[float, SeriesPlan] = {}
    stats: dict[tuple[float, int, int], tuple[int, int]] = {}  # (window, op, path) -> (slot, op index)
    for f in view.fields:
        fw = f"{where} field {f.name!r}"
        if f.agg is None or not f.window:
            raise DefinitionError(f"{fw}: stream fields need `agg` and `window`")
        window = parse_duration(f.window)
        if window <= 0:
            raise DefinitionError(f"{fw}: window must be positive")
        pi, kind = -1, None
        if f.of:
            if f.of not in path_index:
                try:
                    fn, k = compile_path(f.of)
                except ValueError as exc:
                    raise DefinitionError(f"{fw}: {exc}") from None
                path_index[f.of] = len(paths)
                paths.append(fn)
                kinds.append(k)
            pi = path_index[f.of]
            kind = kinds[pi]
        elif f.agg != "count":
            raise DefinitionError(f"{fw}: `{f.agg}` needs `of`")
        if f.agg in _AGGS_NUMERIC and kind != "num":
            raise DefinitionError(f"{fw}: {f.agg} of {f.of!r} needs a numeric path")
        try:
            coerce = _coercer(f, f.agg, kind)
        except DefinitionError as exc:
            raise DefinitionError(f"{where} {exc}") from None
        if f.agg == "count":
            op = EVCOUNT if pi < 0 else (NUM if kind == "num" else CNT)
        elif f.agg in _AGGS_NUMERIC:
            op = NUM
        else:
            op = LAST if f.agg == "last" else LND
        sp = series.setdefault(window, SeriesPlan(window, window / resolution))
        skey = (window, op, pi)
        n = min(f.n, f.max_length)
        if skey not in stats:
            off = len(sp.template)
            sp.template.extend(_SLOTS[op])
            stats[skey] = (off, len(sp.ops))
            sp.ops.append((op, pi, off, n))
            (sp.lnd_slots if op == LND else sp.last_slots if op == LAST else []).append(off)
        off, oi = stats[skey]
        if op == LND and n > sp.ops[oi][3]:
            o = sp.ops[oi]
            sp.ops[oi] = (o[0], o[1], o[2], n)
        if f.agg in ("count", "sum"):
            empty: Any = coerce(0)
        elif f.agg == "last_n_distinct":
            empty = [] if f.default is None else f.default
        else:
            empty = f.default
        try:
            empty = check_value(f, empty)
        except ValueError as exc:
            raise DefinitionError(f"{fw}: default {exc}") from None
        sp.fields.append(FieldPlan(f.name, f.agg, off, n, coerce, empty))
    for sp in series.values():
        # Live and not-yet-prunable buckets: R + lateness / w + 1; half a window of slack amortises pruning.
        sp.reach = math.ceil(lateness / sp.width) + 1
        sp.limit = resolution + sp.reach + 1 + resolution // 2
    return ViewPlan(
        index=index,
        view=view,
        entity=view.entity,
        keys=KEY_EXTRACTORS[view.entity],
        lateness=lateness,
        paths=paths,
        series=sorted(series.values(), key=lambda s: s.window),
        field_order=[f.name for f in view.fields],
    )
