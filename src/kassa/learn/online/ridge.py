"""`RidgeRefit`: a placement's regression solved exactly at each snapshot (``regression: ridge``, ADR 0010).

VW's online learner makes one adaptive gradient step per example. On `bench/quality.py`'s offer world the
exploration rules Kassa offers reached more on an exact least-squares fit of the same features than on VW's
online one (ADR 0010's addendum of 2026-12-07 morning: squareCB 0.776 of the oracle against 0.713). This keeps
the normal equations of every example the online learner learns, over the same hashed terms VW and the numpy
scorer use (`kassa.learn.serving.terms.all_terms`: the constant, the linear terms of both lines and the quadratic
crosses), and solves ``(X'X + lambda I) w = X'y`` when a snapshot is written. The solution is
written into the VW workspace's weights before it is saved, so the ``.vw`` file, its ``.lin`` sidecar and
everything that reads either (serving, `kassa evaluate`, restarts) see one model.

The matrix is dense over the terms seen, so it is for placements with a small feature space (tens of offers
and a few context features: ~700 terms on the offer world); past ``max_terms`` it stops and VW's online
weights serve again (logged once). Its state is saved beside each snapshot (``.ridge.npz``) so a restart
continues the same fit; a model promoted or restored from elsewhere starts it afresh, and until it has seen
``warmup`` examples VW's weights serve.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kassa.learn.serving.hashing import I64, hashing
from kassa.learn.serving.sidecar import LinearSpec
from kassa.learn.serving.terms import LineCache, all_terms

log = logging.getLogger("kassa.learn")

SUFFIX = ".ridge.npz"


class RidgeRefit:
    """The normal equations of one placement's learned examples, over the terms seen so far."""

    def __init__(self, spec: LinearSpec, lam: float = 1.0, max_terms: int = 2048, warmup: int = 50,
                 half_life: float = 0.0) -> None:
        self.spec = spec
        self.half_life = half_life
        self._decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 1.0
        self.lam = lam
        self.max_terms = max_terms
        self.warmup = warmup
        self._hashing = hashing(spec.bits)
        self.terms = np.zeros(0, dtype=I64)  # term j's masked weight index
        self._slot = np.full(1 << spec.bits, -1, dtype=np.int32)  # masked weight index -> term j
        self._pending: list[tuple[np.ndarray, np.ndarray, float]] = []  # examples not yet in a and b
        self._lines: LineCache = {}
        self.a = np.zeros((0, 0))
        self.b = np.zeros(0)
        self.n = 0  # examples added
        self.overflow = False

    def add(self, shared: str, action: str, y: float) -> None:
        if self.overflow:
            return
        index, x = all_terms(self._hashing, self.spec, shared, action, self._lines)
        j = self._slot[index]
        new = j < 0
        if new.any():
            d = self.terms.size
            fresh = np.unique(index[new])
            if d + fresh.size > self.max_terms:
                self.overflow = True
                self._pending.clear()
                log.warning("ridge regression: more than %d terms; VW's online weights serve from now on",
                            self.max_terms)
                return
            self._slot[fresh] = np.arange(d, d + fresh.size, dtype=np.int32)
            j = self._slot[index]
            self.terms = np.concatenate([self.terms, fresh])
        self._pending.append((j, x, y))
        self.n += 1
        if len(self._pending) >= 1024:
            self._flush()

    def _flush(self) -> None:
        """Add the pending examples to the normal equations: every example's products of term pairs summed in
        one `bincount` (~O(terms^2) per example) instead of an indexed add per example."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        d = self.terms.size
        self._grow(d)
        # with a half-life, what came before weighs decay^m and the i-th pending example decay^(m-1-i)
        age = self._decay ** np.arange(len(pending) - 1, -1, -1, dtype=np.float64)
        if self._decay < 1.0:
            self.a[:d, :d] *= self._decay ** len(pending)
            self.b[:d] *= self._decay ** len(pending)
        flat = np.concatenate([(j[:, None] * d + j[None, :]).ravel() for j, _, _ in pending])
        prod = np.concatenate([np.outer(x, x).ravel() * w for (_, x, _), w in zip(pending, age, strict=True)])
        self.a[:d, :d] += np.bincount(flat, weights=prod, minlength=d * d).reshape(d, d)
        xy = np.concatenate([x * (y * w) for (_, x, y), w in zip(pending, age, strict=True)])
        self.b[:d] += np.bincount(np.concatenate([j for j, _, _ in pending]), weights=xy, minlength=d)

    def _grow(self, d: int) -> None:
        cap = self.a.shape[0]
        if d <= cap:
            return
        cap = max(d, 2 * cap, 64)
        a = np.zeros((cap, cap))
        b = np.zeros(cap)
        old = self.a.shape[0]
        a[:old, :old] = self.a
        b[:old] = self.b
        self.a, self.b = a, b

    def solve(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The weights (masked indices, values) of the exact fit; None while warming up or past ``max_terms``."""
        if self.overflow or self.n < self.warmup:
            return None
        self._flush()
        d = self.terms.size
        m = self.a[:d, :d] + self.lam * np.eye(d)
        return self.terms.copy(), np.linalg.solve(m, self.b[:d])

    def apply(self, ws: object) -> bool:
        """Write the exact fit into a VW workspace's weights (before it is saved). False if it did not."""
        solved = self.solve()
        if solved is None:
            return False
        set_weight = ws.set_weight  # type: ignore[attr-defined]
        for i, w in zip(solved[0].tolist(), solved[1].tolist(), strict=True):
            set_weight(i, 0, w)
        return True

    def save(self, path: Path) -> None:
        self._flush()
        d = self.terms.size
        tmp = path.with_name(path.name + ".tmp.npz")
        rows, cols = np.nonzero(np.triu(self.a[:d, :d]))  # sparse: terms meet only within examples
        np.savez(tmp, terms=self.terms, rows=rows.astype(np.int32), cols=cols.astype(np.int32),
                 values=self.a[rows, cols], b=self.b[:d], n=np.array([self.n]), overflow=np.array([self.overflow]))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, spec: LinearSpec, **kwargs: object) -> RidgeRefit:
        r = cls(spec, **kwargs)  # type: ignore[arg-type]
        with np.load(path) as f:
            terms, rows, cols, values, b = f["terms"], f["rows"], f["cols"], f["values"], f["b"]
            r.n, r.overflow = int(f["n"][0]), bool(f["overflow"][0])
        r.terms = terms.astype(I64)
        r._slot[r.terms] = np.arange(r.terms.size, dtype=np.int32)
        r._grow(terms.size)
        r.a[rows, cols] = values
        r.a[cols, rows] = values
        r.b[:terms.size] = b
        return r
