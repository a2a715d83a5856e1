"""Candidate retrieval for product cross-sells.

This module owns the in-memory signals that turn an order into a short list of candidate
products: time-decayed co-purchase neighbours, each customer's replenishment history and a
time-decayed popularity floor. It is fed from the order stream (:meth:`ProductRetriever.observe_order`)
and read on the decision hot path: :meth:`ProductRetriever.retrieve_scored` (what the engine uses since issue
14) merges the sources by a retrieval score and tags every candidate with why it was retrieved
(`kassa.decide.retrieval.signals`); :meth:`ProductRetriever.retrieve` lists each source's picks in a fixed order.

Design notes
------------
* Time decay uses the growing-scale trick: a weight ``w`` observed at time ``ts`` is stored as
  ``w * exp((ts - t0) / tau)``. Every stored weight then decays at the same rate implicitly, so
  an update is one addition and comparing two stored weights compares their decayed values.
  When the scale would get large we renormalise everything to a new ``t0`` (rare: once every
  ``_RENORM_EXPONENT`` time constants).
* Memory is bounded: neighbour lists keep the top ``neighbours_per_product`` entries and are
  pruned when they pass twice that; per-customer history is capped; customers are evicted
  least-recently-seen first past ``max_customers``.
* The hot path never sorts the catalog. Neighbour lists and the popularity top list are cached
  sorted and rebuilt lazily at most once per ``refresh_seconds`` after they change (popularity
  also every ``_POPULAR_REFRESH_ORDERS`` orders, on the write path). Their age is measured on the
  ``clock`` the retriever is given (Kassa's clock, `kassa.app.Kassa`), not the machine's monotonic clock:
  which list a decision reads then depends only on the stream and its timestamps, so a seeded run on a
  simulated clock makes the same decisions every time (issue 14). A clock that steps back counts as stale.
  Cached neighbour lists are small numpy arrays over dense product ids, so summing several items' lists is a
  few vector ops.
* Pure and single-threaded: no I/O, no locks. Callers that observe and retrieve from different
  threads must serialise access themselves.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Collection, Sequence
from operator import itemgetter
from typing import Any, Protocol

import numpy as np

from kassa import schemas
from kassa.decide.retrieval import signals

SOURCES = ("co_purchase", "history", "popular")

# Renormalise once exp((ts - t0) / tau) passes e^40 (~2e17): far from float overflow, and
# small enough that adding a fresh increment to a long-decayed weight loses no useful precision.
_RENORM_EXPONENT = 40.0
# Recompute the popularity top list at least this often on the write path.
_POPULAR_REFRESH_ORDERS = 1000
# Co-purchase pairs are quadratic in order size; bulk orders (up to 500 lines) would cost
# 250k updates and say little about complements, so only the first N distinct products pair up.
_MAX_PAIR_ITEMS = 50
# Same bound on the read path: seeds beyond this add cost and little signal.
_MAX_SEED_ITEMS = 20
# Two purchases of a product closer than this are one purchase occasion (split or replayed
# orders), not a replenishment interval.
_SAME_OCCASION_SECONDS = 3600.0
# A repeat-bought product is "due" when the time since its last purchase is within
# [_DUE_FROM, _DUE_UNTIL] x its mean repeat interval. Past _DUE_UNTIL the habit has likely lapsed.
_DUE_FROM = 0.75
_DUE_UNTIL = 3.0
_RECENT_FACTOR = 10.0

_by_weight = itemgetter(1)
_by_score = itemgetter(0)


def _history_order(item: tuple[str, list[float]]) -> tuple[float, float]:
    return item[1][0], item[1][1]  # (count, last purchase)


class _Keyed(Protocol):
    @property
    def sku(self) -> str | None: ...

    @property
    def product_id(self) -> str | None: ...


def product_key(obj: _Keyed) -> str | None:
    """Product key of an order item or a product offer: its ``product_id`` if set, else its ``sku``."""
    return obj.product_id or obj.sku


class ProductRetriever:
    """Retrieves cross-sell candidate products from co-purchase, history and popularity signals.

    Parameters
    ----------
    neighbours_per_product
        Co-purchase neighbours kept per product (top by decayed weight). A list is pruned back
        to this size when it grows past twice it.
    history_per_customer
        Distinct products remembered per customer; past it the least-bought, least-recent
        product is forgotten.
    popular_size
        Length of the popularity top list used as the floor.
    half_life_days
        Half-life of co-purchase and popularity weights.
    max_customers
        Customers tracked; the least recently seen one is forgotten past it.
    refresh_seconds
        Minimum age before a cached sorted list (a product's neighbours, the popularity top list)
        is rebuilt after it changed. 0 rebuilds on every read after a change (tests).
    clock
        Seconds; what ``refresh_seconds`` is measured on. Kassa passes its own clock (unix seconds, or a
        simulated one), so cache refreshes follow the stream rather than the machine's speed.

    Notes
    -----
    Keys are product keys (see :func:`product_key`). Not thread-safe.
    """

    def __init__(
        self,
        neighbours_per_product: int = 50,
        history_per_customer: int = 50,
        popular_size: int = 200,
        half_life_days: float = 30.0,
        *,
        max_customers: int = 1_000_000,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if neighbours_per_product < 1 or history_per_customer < 1 or popular_size < 1:
            raise ValueError("neighbours_per_product, history_per_customer and popular_size must be >= 1")
        if half_life_days <= 0 or max_customers < 1 or refresh_seconds < 0:
            raise ValueError("half_life_days and max_customers must be positive, refresh_seconds >= 0")
        self.neighbours_per_product = neighbours_per_product
        self.history_per_customer = history_per_customer
        self.popular_size = popular_size
        self.half_life_days = half_life_days
        self.max_customers = max_customers
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._tau = half_life_days * 86_400.0 / math.log(2.0)
        # "Recent" popularity decays ten times faster (3 days at the default 30-day half-life).
        self._tau_recent = self._tau / _RECENT_FACTOR
        self._t0: float | None = None  # reference time of the stored scale; set by the first order
        self._t_latest = -math.inf  # latest order time seen

        # product -> {neighbour: scaled weight}
        self._nb: dict[str, dict[str, float]] = {}
        self._n_pairs = 0
        # Read-side cache, product -> (build time on `clock`, top-N neighbour ids, their weights), in
        # descending weight order. Contiguous arrays rather than dicts: merging several seeds'
        # lists is the dominant retrieve() cost and is memory-bound, so numpy halves it.
        self._nb_top: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
        self._nb_dirty: set[str] = set()
        # Dense ids for products that appear in a cached list, and a zeroed accumulator over them.
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._acc = np.zeros(1024)
        self._conf = np.zeros(1024)

        # customer -> {product: [count, last_ts, mean_interval, n_intervals]}. Outer dict order is
        # least-recently-seen customer first; each inner dict is kept most-bought, most-recent first.
        self._hist: dict[str, dict[str, list[float]]] = {}
        self._n_hist = 0  # entries across all customers

        # Popularity: scaled weights of every product, plus an exact incremental top-K. Scaled
        # weights only grow, so the true top-K is always inside (last top-K) + (products whose
        # weight passed the last K-th weight since); the pool holds exactly those.
        self._pop: dict[str, float] = {}
        # The pool is a dict, not a set: equal weights then rank by first arrival, where a set's order (string
        # hashes, salted per process) made one seeded stream retrieve other products in another run (issue 14).
        self._pop_pool: dict[str, None] = {}
        self._pop_threshold = -1.0  # K-th weight at the last rebuild; -1 while fewer than K
        self._pop_top: list[str] = []
        self._pop_built = -math.inf
        self._pop_pending = 0  # orders since the last rebuild
        # Recent popularity on its own (faster) scale, and its running maximum (scaled weights only grow).
        self._pop_recent: dict[str, float] = {}
        self._pop_recent_max = 0.0
        self._inc_recent = 1.0

        self._orders = 0

    # ------------------------------------------------------------------ write path
    def observe_order(self, order: schemas.Order, customer_id: str | None, ts: float) -> None:
        """Fold one placed order into the co-purchase, history and popularity signals.

        Parameters
        ----------
        order
            The order; each distinct product key counts once whatever its quantity.
        customer_id
            The buyer, or None for a guest (history is then not updated).
        ts
            Order time, unix seconds. Out-of-order times are accepted.
        """
        keys = list(dict.fromkeys(k for k in map(product_key, order.items) if k))
        self._orders += 1
        if not keys:
            return
        inc = self._scale(ts)

        # Co-purchase: every ordered pair of distinct products, in both directions.
        pair_keys = keys[:_MAX_PAIR_ITEMS]
        if len(pair_keys) > 1:
            nb_all = self._nb
            cap = 2 * self.neighbours_per_product
            dirty = self._nb_dirty
            for a in pair_keys:
                nb = nb_all.get(a)
                if nb is None:
                    nb = nb_all[a] = {}
                for b in pair_keys:
                    if b == a:
                        continue
                    old = nb.get(b)
                    if old is None:
                        nb[b] = inc
                        self._n_pairs += 1
                    else:
                        nb[b] = old + inc
                if len(nb) > cap:
                    self._prune(a, nb)
                dirty.add(a)

        # Popularity.
        pop = self._pop
        pool = self._pop_pool
        threshold = self._pop_threshold
        recent = self._pop_recent
        inc_r = self._inc_recent
        top_r = self._pop_recent_max
        for k in keys:
            w = pop.get(k, 0.0) + inc
            pop[k] = w
            if w > threshold:
                pool[k] = None
            wr = recent.get(k, 0.0) + inc_r
            recent[k] = wr
            if wr > top_r:
                top_r = wr
        self._pop_recent_max = top_r
        self._pop_pending += 1
        if self._pop_pending >= _POPULAR_REFRESH_ORDERS or self._stale(self._pop_built, self._clock()):
            self._rebuild_popular()

        if customer_id is not None:
            self._observe_history(customer_id, keys, ts)

    def _scale(self, ts: float) -> float:
        """Scaled weight of one unit observed at ``ts``, renormalising first if the scale got large."""
        if self._t0 is None:
            self._t0 = ts
        if ts > self._t_latest:
            self._t_latest = ts
        x = (ts - self._t0) / self._tau_recent  # the faster scale grows first
        if x > _RENORM_EXPONENT:
            self._renormalise(ts)
            x = 0.0
        # Very old (replayed) events underflow to 0.0, which is their correct decayed weight.
        self._inc_recent = math.exp(max(x, -700.0))
        return math.exp(max(x / _RECENT_FACTOR, -700.0))

    def _renormalise(self, ts: float) -> None:
        assert self._t0 is not None
        f = math.exp(-(ts - self._t0) / self._tau)
        for nb in self._nb.values():
            for k in nb:
                nb[k] *= f
        for k in self._pop:
            self._pop[k] *= f
        if self._pop_threshold > 0:
            self._pop_threshold *= f
        fr = math.exp(-(ts - self._t0) / self._tau_recent)
        for k in self._pop_recent:
            self._pop_recent[k] *= fr
        self._pop_recent_max *= fr
        # Cached lists hold old-scale weights; rebuild them on next read.
        self._nb_top.clear()
        self._nb_dirty.clear()
        self._t0 = ts

    def _prune(self, key: str, nb: dict[str, float]) -> None:
        keep = sorted(nb.items(), key=_by_weight, reverse=True)[: self.neighbours_per_product]
        self._n_pairs -= len(nb) - len(keep)
        self._nb[key] = dict(keep)

    def _rebuild_popular(self) -> None:
        pop = self._pop
        top = heapq.nlargest(self.popular_size, self._pop_pool, key=pop.__getitem__)
        self._pop_top = top
        self._pop_pool = dict.fromkeys(top)
        self._pop_threshold = pop[top[-1]] if len(top) >= self.popular_size else -1.0
        self._pop_built = self._clock()
        self._pop_pending = 0

    def _observe_history(self, customer_id: str, keys: list[str], ts: float) -> None:
        hist_all = self._hist
        # Pop and reinsert so dict order is least-recently-seen first.
        hist = hist_all.pop(customer_id, None)
        if hist is None:
            hist = {}
            if len(hist_all) >= self.max_customers:
                self._n_hist -= len(hist_all.pop(next(iter(hist_all))))
        before = len(hist)
        changed = False
        for k in keys:
            e = hist.get(k)
            if e is None:
                hist[k] = [1.0, ts, 0.0, 0.0]
                changed = True
                continue
            count, last, mean, n = e
            if abs(ts - last) < _SAME_OCCASION_SECONDS:
                continue
            if ts > last:
                n += 1.0
                mean += (ts - last - mean) / n
                e[1] = ts
                e[2] = mean
                e[3] = n
            # An older, out-of-order purchase still counts, but its interval is unknown.
            e[0] = count + 1.0
            changed = True
        if changed:
            # Keep each history sorted most-bought, then most-recent first: the read path then only
            # scans the (leading) repeat-bought entries for due ones and takes the rest in order,
            # and the cap drops the least-bought, least-recent products: repeat purchases are the
            # signal history exists for.
            hist = dict(sorted(hist.items(), key=_history_order, reverse=True)[: self.history_per_customer])
            self._n_hist += len(hist) - before
        hist_all[customer_id] = hist

    # ------------------------------------------------------------------ state
    def dump(self) -> dict[str, Any]:
        """The learned state, for `kassa.events.replay_state` (shares the live objects: encode it at once).
        Read-side caches are left out: `load` rebuilds them lazily."""
        return {"t0": self._t0, "t_latest": self._t_latest, "nb": self._nb, "n_pairs": self._n_pairs,
                "hist": self._hist, "n_hist": self._n_hist, "pop": self._pop, "orders": self._orders}

    def load(self, state: dict[str, Any]) -> None:
        self._t0, self._t_latest = state["t0"], state["t_latest"]
        self._nb, self._n_pairs = state["nb"], state["n_pairs"]
        self._hist, self._n_hist = state["hist"], state["n_hist"]
        self._pop, self._orders = state["pop"], state["orders"]
        self._nb_top, self._nb_dirty = {}, set(self._nb)
        self._pop_pool = dict.fromkeys(self._pop)
        if self._pop:
            self._rebuild_popular()

    # ------------------------------------------------------------------ read path
    def retrieve(
        self,
        order_product_keys: Sequence[str],
        customer_id: str | None,
        now: float,
        co_purchase: int,
        history: int,
        popular: int,
        max_candidates: int,
        exclude: Collection[str] = (),
    ) -> list[tuple[str, str]]:
        """Candidate products for an order, each tagged with the source that found it.

        Parameters
        ----------
        order_product_keys
            Product keys already in the order; they seed co-purchase and are never returned.
        customer_id
            The buyer, or None (history is then skipped).
        now
            Decision time, unix seconds; used to judge which history products are due.
        co_purchase, history, popular
            Most candidates to take from each source (0 disables it), counted after dedupe.
        max_candidates
            Most candidates returned in total.
        exclude
            Product keys never to return (out of stock, capped, ...).

        Returns
        -------
        list of (product_key, source)
            Co-purchase candidates first (strongest first), then history, then popular.
            No key appears twice, and none is in ``order_product_keys`` or ``exclude``.
        """
        out: list[tuple[str, str]] = []
        if max_candidates <= 0:
            return out
        # `taken`: the order and everything picked so far. `exclude` is checked in place rather than
        # copied, as callers may pass large sets (out-of-stock lists).
        taken = set(order_product_keys)
        excl: Collection[str] = exclude if not exclude or isinstance(exclude, set | frozenset) else set(exclude)
        at = self._clock()

        # The loops below run once per candidate (~50 per call), so they avoid len() and bound methods
        # lookups: they are a measurable share of the call.
        append = out.append
        take = taken.add
        room = max_candidates

        if co_purchase > 0 and self._nb:
            need = min(co_purchase, room)
            seeds = list(dict.fromkeys(order_product_keys))[:_MAX_SEED_ITEMS]
            names = self._names
            for i in self._ranked_neighbours(seeds, at)[0]:
                k = names[i]
                if k in taken or k in excl:
                    continue
                append((k, "co_purchase"))
                take(k)
                need -= 1
                if not need:
                    break
            room = max_candidates - len(out)

        if history > 0 and customer_id is not None and room > 0:
            hist = self._hist.get(customer_id)
            if hist:
                for k in self._history_rank(hist, taken, excl, now, min(history, room)):
                    append((k, "history"))
                    take(k)
                room = max_candidates - len(out)

        if popular > 0 and room > 0:
            if self._pop_pending and self._stale(self._pop_built, at):
                self._rebuild_popular()
            need = min(popular, room)
            for k in self._pop_top:
                if k in taken or k in excl:
                    continue
                append((k, "popular"))
                need -= 1
                if not need:
                    break
        return out

    def retrieve_scored(
        self,
        order_product_keys: Sequence[str],
        customer_id: str | None,
        now: float,
        co_purchase: int,
        history: int,
        popular: int,
        max_candidates: int,
        exclude: Collection[str] = (),
    ) -> list[tuple[str, float, str]]:
        """Candidates from every source merged by score, each with why it was retrieved.

        Each source contributes up to its own quota (``co_purchase``, ``history``, ``popular``; 0 disables
        it); a product found by several sources is one candidate carrying all of them. Candidates are
        scored as `kassa.decide.retrieval.signals.score` defines (co-purchase confidence with this order, log
        co-purchases, history strength, popularity share; inlined here) and the best ``max_candidates`` are
        returned, with learner suffixes built for those only.

        Returns
        -------
        list of (product_key, retrieval score, learner suffix)
            Highest score first. The suffix is the candidate's ``|r`` namespace
            (`kassa.decide.retrieval.signals.suffix`), to append to its action line.
        """
        if max_candidates <= 0:
            return []
        taken = set(order_product_keys)
        excl: Collection[str] = exclude if not exclude or isinstance(exclude, set | frozenset) else set(exclude)
        at = self._clock()
        # key -> [sources, co-purchase confidence with this order, co-purchases with it (decayed orders)]
        found: dict[str, list[float]] = {}

        unit = self._unit(now)
        if co_purchase > 0 and self._nb:
            need = co_purchase
            seeds = list(dict.fromkeys(order_product_keys))[:_MAX_SEED_ITEMS]
            names = self._names
            ids, weights, confs = self._ranked_neighbours(seeds, at, unit * signals.CONF_PRIOR)
            inv_unit = 1.0 / unit
            for i, w, cf in zip(ids, weights, confs, strict=True):
                k = names[i]
                if k in taken or k in excl or k in found:
                    continue
                found[k] = [signals.CO_PURCHASE, cf, w * inv_unit]
                need -= 1
                if not need:
                    break

        hist = self._hist.get(customer_id) if customer_id is not None else None
        if history > 0 and hist:
            for k in self._history_rank(hist, taken, excl, now, history):
                e = found.get(k)
                if e is None:
                    found[k] = [signals.HISTORY, 0.0, 0.0]
                else:
                    e[0] = int(e[0]) | signals.HISTORY

        if popular > 0:
            if self._pop_pending and self._stale(self._pop_built, at):
                self._rebuild_popular()
            need = popular
            for k in self._pop_top:
                if k in taken or k in excl:
                    continue
                e = found.get(k)
                if e is None:
                    found[k] = [signals.POPULAR, 0.0, 0.0]
                else:
                    e[0] = int(e[0]) | signals.POPULAR
                need -= 1
                if not need:
                    break
        if not found:
            return []

        pop, recent = self._pop, self._pop_recent
        pop_top = pop[self._pop_top[0]] if self._pop_top else 0.0
        pop_scale = 1.0 / pop_top if pop_top > 0 else 0.0
        recent_scale = 1.0 / self._pop_recent_max if self._pop_recent_max > 0 else 0.0
        hist_get = hist.get if hist else None
        pop_get, recent_get = pop.get, recent.get
        strength, due_class, ratio_bucket = signals.history_strength, signals.due_class, signals.ratio_bucket
        w_lc, w_pop, log1p = signals.W_LOG_CO, signals.W_POP, math.log1p
        # Score every candidate (the merge), then build learner suffixes for the ones returned only.
        rows: list[tuple[float, str]] = []
        append = rows.append
        for k, (_, cf, co) in found.items():
            sc = cf + w_pop * pop_get(k, 0.0) * pop_scale
            if co > 0.0:
                sc += w_lc * log1p(co)
            e = hist_get(k) if hist_get is not None else None
            if e is not None:
                sc += strength(e[0], now - e[1], e[2])
            append((sc, k))
        rows.sort(key=_by_score, reverse=True)
        key_of, line = signals.quantise, signals.suffix
        out = []
        for rank, (sc, k) in enumerate(rows[:max_candidates]):
            src, cf, co = found[k]
            pg = pop_get(k, 0.0) * pop_scale
            pr = recent_get(k, 0.0) * recent_scale
            e = hist_get(k) if hist_get is not None else None
            if e is None:
                q = key_of(int(src), cf, co, 0.0, 0.0, -1, pg, pr, sc)
            else:
                due, ratio = (due_class(now - e[1], e[2]), ratio_bucket(now - e[1], e[2])) if e[2] > 0.0 else (-1, -1)
                q = key_of(int(src), cf, co, e[0], (now - e[1]) / 86_400.0, due, pg, pr, sc, ratio)
            out.append((k, sc, line(q, rank)))
        return out

    def _neighbours(self, key: str, at: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Top neighbours of ``key`` as (ids, weights) in descending weight order; None if unknown."""
        cached = self._nb_top.get(key)
        if cached is not None and (key not in self._nb_dirty or not self._stale(cached[0], at)):
            return cached[1], cached[2]
        nb = self._nb.get(key)
        if nb is None:
            # Unknown product: cache nothing, or request keys could grow memory without bound.
            return None
        top = sorted(nb.items(), key=_by_weight, reverse=True)[: self.neighbours_per_product]
        ids = np.fromiter((self._id(k) for k, _ in top), dtype=np.intp, count=len(top))
        weights = np.fromiter((w for _, w in top), dtype=np.float64, count=len(top))
        self._nb_top[key] = (at, ids, weights)
        self._nb_dirty.discard(key)
        return ids, weights

    def _stale(self, built: float, now: float) -> bool:
        """A cache built at ``built`` is due for a rebuild at ``now`` (also when the clock stepped back)."""
        return now - built >= self.refresh_seconds or now < built

    def _id(self, key: str) -> int:
        i = self._ids.get(key)
        if i is None:
            i = self._ids[key] = len(self._names)
            self._names.append(key)
            if i >= len(self._acc):
                self._acc = np.zeros(2 * len(self._acc))
        return i

    def _ranked_neighbours(self, seeds: list[str], at: float, prior: float = 0.0
                           ) -> tuple[list[int], list[float], list[float]]:
        """Ids of the seeds' neighbours by descending summed weight, with those weights and each one's
        co-purchase confidence (the largest over the seeds of weight / (the seed's popularity + ``prior``),
        a smoothed P(neighbour | seed)); may repeat an id, not yet filtered."""
        pop = self._pop
        lists = []
        for s in seeds:
            nb = self._neighbours(s, at)
            if nb is not None:
                lists.append((nb[0], nb[1], 1.0 / (pop.get(s, 0.0) + prior) if prior > 0 else 0.0))
        if not lists:
            return [], [], []
        if len(lists) == 1:
            ids, weights, inv = lists[0]
            w = weights.tolist()
            return ids.tolist(), w, (weights * inv).tolist()  # already ranked
        # Sum through a dense accumulator (ids are unique within one list, so fancy += is exact),
        # read back, and zero it again for the next call; the confidences' maximum likewise.
        acc, conf = self._acc, self._conf
        if len(conf) < len(acc):
            conf = self._conf = np.zeros(len(acc))
        for ids, weights, inv in lists:
            acc[ids] += weights
            conf[ids] = np.maximum(conf[ids], weights * inv)
        all_ids = np.concatenate([ids for ids, _, _ in lists])
        summed = acc[all_ids]
        confs = conf[all_ids]
        acc[all_ids] = 0.0
        conf[all_ids] = 0.0
        # A shared neighbour appears once per list with the same summed value; the caller's
        # `taken` check drops the repeats.
        order = (-summed).argsort()
        return all_ids[order].tolist(), summed[order].tolist(), confs[order].tolist()

    def _unit(self, now: float) -> float:
        """The stored (scaled) weight of one order placed at ``now``."""
        if self._t0 is None:
            return 1.0
        return math.exp(min(max((now - self._t0) / self._tau, -700.0), 700.0))

    @staticmethod
    def _history_rank(
        hist: dict[str, list[float]], taken: set[str], excl: Collection[str], now: float, n: int
    ) -> list[str]:
        """Up to ``n`` history products: due ones first, then the rest, each most-bought first."""
        lo, hi = _DUE_FROM, _DUE_UNTIL
        due: list[str] = []
        for k, (count, last, mean, _) in hist.items():
            if count < 2.0:
                break  # sorted by count: no more repeat-bought products
            if mean > 0.0 and lo * mean <= now - last <= hi * mean and k not in taken and k not in excl:
                due.append(k)
                if len(due) >= n:
                    return due
        picked = due
        skip = set(due)
        for k in hist:
            if k in taken or k in excl or k in skip:
                continue
            picked.append(k)
            if len(picked) >= n:
                break
        return picked

    def popularity(self, key: str, now: float | None = None) -> float:
        """Time-decayed number of orders containing ``key`` (0.0 if never seen).

        Parameters
        ----------
        key
            Product key.
        now
            Time to decay to, unix seconds; defaults to the latest order seen.
        """
        w = self._pop.get(key)
        if w is None or self._t0 is None:
            return 0.0
        at = self._t_latest if now is None else now
        return w * math.exp(-(at - self._t0) / self._tau)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, int]:
        """Sizes of the tracked state.

        Returns
        -------
        dict
            ``products`` seen, ``pairs`` (stored directed neighbour entries), ``customers``
            tracked, ``history_entries`` across customers and ``orders`` observed.
        """
        return {
            "products": len(self._pop),
            "pairs": self._n_pairs,
            "customers": len(self._hist),
            "history_entries": self._n_hist,
            "orders": self._orders,
        }

