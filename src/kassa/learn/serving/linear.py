"""`LinearModel`: serve a Vowpal Wabbit contextual-bandit model from its exported weights, scored with numpy.

Why (ADR 0005): loading a VW workspace takes ~2 ms and freeing one ~1-3 ms, all in C++ holding the GIL, so
every model swap stalled the event loop even when the load ran on a worker thread. The models Kassa trains
(``--cb_explore_adf`` with squarecb, epsilon-greedy or softmax exploration, quadratic interactions) are
linear in hashed features, so serving needs only the weights, VW's feature hashing and the exploration
rule. A swap then reads one small file and fills a dense ``float32`` array (~0.1 ms for 20k weights); the
probabilities equal VW's own to float rounding (``tests/test_linear.py`` checks them against VW).

Learning and batch training keep using VW itself; serving and `kassa evaluate` use this copy.

The weights come from the ``.lin`` sidecar (`kassa.learn.serving.sidecar`), the hashes from
`kassa.learn.serving.hashing`, and the exploration rule from the placement's policy (`kassa.policies`).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from kassa import policies
from kassa.learn.serving.hashing import CONSTANT, FNV_PRIME, I64, Hashing, hashing
from kassa.learn.serving.sidecar import Counts, LinearSpec, read_sidecar_counts, sidecar_path

_free_tables: dict[int, list[np.ndarray]] = {}
_MAX_FREE_TABLES = 4


def _take_table(bits: int) -> np.ndarray:
    """A zeroed dense weight table. Retired models' tables are reused: zeroing a fresh 4 MB table (at
    ``-b 20``) costs ~0.2 ms holding the GIL, and clearing a used one at its non-zero entries costs ~N."""
    free = _free_tables.get(bits)
    if free:
        try:
            return free.pop()
        except IndexError:
            pass
    return np.zeros(1 << bits, dtype=np.float32)


def _give_table(bits: int, table: np.ndarray, touched: np.ndarray) -> None:
    free = _free_tables.setdefault(bits, [])
    if len(free) < _MAX_FREE_TABLES:
        table[touched] = 0.0
        free.append(table)


class LinearModel:
    """A published model for prediction only; immutable once loaded."""

    def __init__(self, path: Path, version: str, meta: dict | None, spec: LinearSpec, index: np.ndarray,
                 weight: np.ndarray, counts: Counts | None = None) -> None:
        self.path = Path(path)
        self.version = version
        self.meta = meta or {}
        self.spec = spec
        size = 1 << spec.bits
        self.mask = size - 1
        touched = index.astype(np.intp) & (size - 1)
        w = _take_table(spec.bits)
        w[touched] = weight
        self.w = w
        weakref.finalize(self, _give_table, spec.bits, w, touched)
        self._const = float(w[CONSTANT & (size - 1)]) if spec.constant else 0.0
        self._hashing = hashing(spec.bits)
        self._lin = np.zeros(0, dtype=np.float64)  # per action row, see _linear
        self._lin_generation = -1
        self._explore = policies.get(spec.policy).explore  # looked up once per model, not per request
        self.n: np.ndarray | None = None  # ucb: per-weight counts (`kassa.learn.serving.bonus`)
        self._bonus_cache = np.zeros(0, dtype=np.float64)  # per action row, see _action_bonus
        self._bonus_generation = -1
        if counts is not None:
            counted = counts[0].astype(np.intp) & (size - 1)
            n = _take_table(spec.bits)
            n[counted] = counts[1]
            self.n = n
            weakref.finalize(self, _give_table, spec.bits, n, counted)

    @classmethod
    def open(cls, vw_path: Path, version: str, meta: dict | None = None,
             source_sha256: str | None = None) -> LinearModel:
        spec, index, weight, counts = read_sidecar_counts(sidecar_path(vw_path), source_sha256)
        return cls(vw_path, version, meta, spec, index, weight, counts)

    def scores(self, shared: str, action_lines: list[str]) -> np.ndarray:
        """VW's cost estimate for each action (lower is better)."""
        hashing_ = self._hashing
        ids = hashing_.rows(action_lines)
        w, mask, fnv = self.w, self.mask, FNV_PRIME
        out = self._linear(hashing_)[ids]  # every action feature, linearly
        base = self._const
        sh = {}
        ignored = self.spec.ignore_linear
        for ns, (hs, vs) in hashing_.parse(shared).items():
            ha = np.array(hs, dtype=I64)
            sh[ns] = (ha, vs)
            if ns not in ignored:
                base += float(w.take(ha & mask) @ vs)
        tables = hashing_.tables
        for x, y in self.spec.quadratic:
            tx, ty = tables.get(x), tables.get(y)
            sx, sy = sh.get(x), sh.get(y)
            ax = (tx.h[ids], tx.v[ids]) if tx is not None else None
            ay = (ty.h[ids], ty.v[ids]) if ty is not None else None
            if sx is not None and ay is not None:  # shared x action: (tokens, actions x features)
                yh, yv = ay
                g = w.take(((sx[0] * fnv)[:, None] ^ yh.reshape(1, -1)) & mask)
                out += ((sx[1] @ g).reshape(yh.shape) * yv).sum(axis=1)
            if ax is not None and sy is not None:  # action x shared
                g = w.take(((ax[0] * fnv)[:, :, None] ^ sy[0][None, None]) & mask)
                out += ((g @ sy[1]) * ax[1]).sum(axis=1)
            if sx is not None and sy is not None:
                base += float(sx[1] @ w.take(((sx[0] * fnv)[:, None] ^ sy[0]) & mask) @ sy[1])
            if ax is not None and ay is not None:  # both in the action lines
                g = w.take(((ax[0] * fnv)[:, :, None] ^ ay[0][:, None, :]) & mask)
                out += ((g @ ay[1][:, :, None])[:, :, 0] * ax[1]).sum(axis=1)
        return (out + base).astype(np.float32)

    def _linear(self, hashing_: Hashing) -> np.ndarray:
        """Each known action line's linear terms under this model, extended as new lines appear."""
        n, generation = len(hashing_.action_ids), hashing_.generation
        lin = self._lin
        if lin.size < n or self._lin_generation != generation:
            start = lin.size if self._lin_generation == generation else 0
            part = np.zeros(n - start, dtype=np.float64)
            ignored = self.spec.ignore_linear
            for ns, t in list(hashing_.tables.items()):
                if ns in ignored:
                    continue
                h, v = t.h[start:n], t.v[start:n]
                part += (self.w.take(h & self.mask) * v).sum(axis=1)
            lin = self._lin = np.concatenate([lin[:start], part]) if start else part
            self._lin_generation = generation
        return lin

    def bonus(self, shared: str, action_lines: list[str]) -> np.ndarray:
        """UCB's uncertainty bonus for each action, ``sqrt(sum x^2 / (1 + n))`` over its action-dependent terms
        (`kassa.learn.serving.bonus`, which counts the same terms when learning); zeros without counts."""
        n = self.n
        if n is None:
            return np.zeros(len(action_lines))
        hashing_ = self._hashing
        ids = hashing_.rows(action_lines)
        mask, fnv = self.mask, FNV_PRIME
        out = self._action_bonus(hashing_, n)[ids]  # the action lines' own terms, cached per line
        tables = hashing_.tables
        sh = {ns: (np.array(hs, dtype=I64), np.square(vs)) for ns, (hs, vs) in hashing_.parse(shared).items()}
        for x, y in self.spec.quadratic:
            sx, sy = sh.get(x), sh.get(y)
            if sx is not None and (ty := tables.get(y)) is not None:  # shared x action
                yh, yv = ty.h[ids], np.square(ty.v[ids])
                u = 1.0 / (1.0 + n.take(((sx[0] * fnv)[:, None] ^ yh.reshape(1, -1)) & mask))
                out += ((sx[1] @ u).reshape(yh.shape) * yv).sum(axis=1)
            if sy is not None and (tx := tables.get(x)) is not None:  # action x shared
                u = 1.0 / (1.0 + n.take(((tx.h[ids] * fnv)[:, :, None] ^ sy[0][None, None]) & mask))
                out += ((u @ sy[1]) * np.square(tx.v[ids])).sum(axis=1)
        return np.sqrt(out)

    def _action_bonus(self, hashing_: Hashing, n: np.ndarray) -> np.ndarray:
        """Each known action line's squared bonus from its own terms (linear, and action x action crosses),
        which no request changes; extended as new lines appear, like `_linear`."""
        count, generation = len(hashing_.action_ids), hashing_.generation
        cached = self._bonus_cache
        if cached.size >= count and self._bonus_generation == generation:
            return cached
        start = cached.size if self._bonus_generation == generation else 0
        rows = np.arange(start, count)
        part = np.zeros(count - start, dtype=np.float64)
        mask, fnv, tables = self.mask, FNV_PRIME, dict(hashing_.tables)
        for ns, t in tables.items():
            if ns not in self.spec.ignore_linear:
                part += (np.square(t.v[rows]) / (1.0 + n.take(t.h[rows] & mask))).sum(axis=1)
        for x, y in self.spec.quadratic:
            tx, ty = tables.get(x), tables.get(y)
            if tx is not None and ty is not None:
                u = 1.0 / (1.0 + n.take(((tx.h[rows] * fnv)[:, :, None] ^ ty.h[rows][:, None, :]) & mask))
                part += ((u @ np.square(ty.v[rows])[:, :, None])[:, :, 0] * np.square(tx.v[rows])).sum(axis=1)
        self._bonus_cache = np.concatenate([cached[:start], part]) if start else part
        self._bonus_generation = generation
        return self._bonus_cache

    def ranked(self, shared: str, action_lines: list[str]) -> tuple[list[float], list[float]]:
        """`pmf` and the costs it came from (for UCB, the optimistic ones): where the pmf ties (ε-greedy gives
        every action but the best ε/k), later slots follow the costs (`kassa.decide.policy.PmfPolicy`)."""
        s = self.scores(shared, action_lines)
        if self.n is not None:
            s = s - self.spec.alpha * self.bonus(shared, action_lines)
        costs = s.tolist()
        return (self._explore(costs, self.spec) if costs else []), costs

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]:
        """The policy's probability for each action, in the order given (VW's exploration rule; for UCB, on the
        costs less ``alpha`` x the uncertainty bonus)."""
        return self.ranked(shared, action_lines)[0]

