"""An example's terms as the numpy scorer sums them (`kassa.learn.serving.linear.LinearModel.scores`): masked
weight indices and feature values of the constant, each line's linear features (but ``ignore_linear``
namespaces) and the quadratic crosses, within a line and between the shared and the action line.

Two learners read them: UCB's counts take the action-dependent ones (`action_terms`, `kassa.learn.serving.bonus`)
and the exact-fit regression every one (`all_terms`, `kassa.learn.online.ridge`). An index may repeat (a feature
given twice, a hash collision); each occurrence is a term, which is what both sums need.
"""

from __future__ import annotations

import numpy as np

from kassa.learn.serving.hashing import CONSTANT, FNV_PRIME, I64, Hashing
from kassa.learn.serving.sidecar import LinearSpec

Features = dict[str, tuple[np.ndarray, np.ndarray]]  # namespace letter -> raw hashes (int64), values (float64)
LineTerms = tuple[Features, np.ndarray, np.ndarray]  # a line's features, and the indices and values of its own terms
LineCache = dict[str, LineTerms]


def line_terms(hashing_: Hashing, spec: LinearSpec, line: str, cache: LineCache | None = None,
               constant: bool = False) -> LineTerms:
    """One line's features by namespace, and the terms within the line: ``constant`` (the shared line's), its linear
    features and the crosses of two of its namespaces. ``cache`` keeps them by line (a shared line never equals an
    action line: it starts with ``shared``)."""
    hit = None if cache is None else cache.get(line)
    if hit is not None:
        return hit
    mask = (1 << spec.bits) - 1
    ns = {k: (np.asarray(hs, dtype=I64), np.asarray(vs, dtype=np.float64))
          for k, (hs, vs) in hashing_.parse(line).items()}
    idx: list[np.ndarray] = [np.array([CONSTANT & mask], dtype=I64)] if constant else []
    val: list[np.ndarray] = [np.ones(1)] if constant else []
    for k, (hs, vs) in ns.items():
        if k not in spec.ignore_linear:
            idx.append(hs & mask)
            val.append(vs)
    for x, y in spec.quadratic:
        a, b = ns.get(x), ns.get(y)
        if a is not None and b is not None:
            idx.append((((a[0] * FNV_PRIME)[:, None] ^ b[0][None, :]) & mask).ravel())
            val.append(np.outer(a[1], b[1]).ravel())
    out = (ns, np.concatenate(idx) if idx else np.zeros(0, dtype=I64), np.concatenate(val) if val else np.zeros(0))
    if cache is not None:
        if len(cache) >= 10_000:
            cache.clear()
        cache[line] = out
    return out


def _terms(hashing_: Hashing, spec: LinearSpec, shared: str, action: str, cache: LineCache | None,
           with_shared: bool) -> tuple[np.ndarray, np.ndarray]:
    mask = (1 << spec.bits) - 1
    sh, sh_idx, sh_val = line_terms(hashing_, spec, shared, cache, constant=spec.constant)
    ac, ac_idx, ac_val = line_terms(hashing_, spec, action, cache)
    idx = [sh_idx, ac_idx] if with_shared else [ac_idx]
    val = [sh_val, ac_val] if with_shared else [ac_val]
    for x, y in spec.quadratic:
        for a, b in ((sh.get(x), ac.get(y)), (ac.get(x), sh.get(y))):
            if a is not None and b is not None:
                idx.append((((a[0] * FNV_PRIME)[:, None] ^ b[0][None, :]) & mask).ravel())
                val.append(np.outer(a[1], b[1]).ravel())
    return np.concatenate(idx), np.concatenate(val)


def all_terms(hashing_: Hashing, spec: LinearSpec, shared: str, action: str,
              cache: LineCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every term of one (shared, action) example."""
    return _terms(hashing_, spec, shared, action, cache, with_shared=True)


def action_terms(hashing_: Hashing, spec: LinearSpec, shared: str, action: str,
                 cache: LineCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The terms that depend on the action: the action line's own and its crosses with the shared line (the shared
    line's own terms are the same for every action)."""
    return _terms(hashing_, spec, shared, action, cache, with_shared=False)
