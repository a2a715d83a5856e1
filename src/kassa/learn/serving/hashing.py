"""Vowpal Wabbit's feature hashing for the numpy scorer: action lines parsed once into padded tables.

Feature hashes come from VW's own hasher, one small workspace per bit width. VW masks hashes to the table
width before crossing them (a first version that ignored this scored ``-b 20`` models wrongly). Action
lines live in per-namespace padded tables that every model of a width shares, so a request's candidates
are one fancy index away (a per-candidate-list cache made the demo 40 % slower).
"""

from __future__ import annotations

import threading

import numpy as np
import vowpalwabbit

FNV_PRIME = 16777619  # VW's interaction hashing: index = (FNV_PRIME * first) ^ second
CONSTANT = 11650396  # VW's constant-feature hash
I64 = np.int64  # hashes are < 2**32 and FNV_PRIME < 2**25, so the crossed index fits in int64
_MAX_CACHED = 50_000


class _Table:
    """One namespace's features of every action line seen, one padded row per action (hash 0, value 0 in
    the padding, which adds nothing), so a candidate list's features are one fancy-index away."""

    __slots__ = ("h", "v", "width")

    def __init__(self) -> None:
        self.width = 1
        self.h = np.zeros((64, 1), dtype=I64)
        self.v = np.zeros((64, 1), dtype=np.float32)

    def reserve(self, rows: int, width: int = 0) -> None:
        """Room for ``rows`` actions of up to ``width`` features (rows of actions without this namespace
        stay padding)."""
        if rows > self.h.shape[0] or width > self.width:
            rows = max(rows, self.h.shape[0] * 2) if rows > self.h.shape[0] else self.h.shape[0]
            width = max(self.width, width)
            h = np.zeros((rows, width), dtype=I64)
            v = np.zeros((rows, width), dtype=np.float32)
            h[:self.h.shape[0], :self.width] = self.h
            v[:self.v.shape[0], :self.width] = self.v
            self.h, self.v, self.width = h, v, width

    def put(self, row: int, hs: list[int], vs: np.ndarray) -> None:
        self.reserve(row + 1, len(hs))
        self.h[row, :len(hs)] = hs
        self.v[row, :len(hs)] = vs


class Hashing:
    """VW's feature hashing for models of one bit width, with caches shared by every model of that width
    (so a swap starts warm). VW masks feature hashes to the weight table's bits before crossing them, so
    the hashes come from a small VW workspace of the same width: VW's own murmur3 and all-digits rule."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.ws = vowpalwabbit.Workspace(f"--quiet -b {bits}", enable_logging=False)
        self.ns: dict[str, int] = {}
        self._lock = threading.Lock()
        self.tokens: dict[int, dict[str, tuple[int, float]]] = {}
        self.action_ids: dict[str, int] = {}  # action line -> its row in the tables
        self.tables: dict[str, _Table] = {}  # namespace index -> features of every action seen
        self.generation = 0  # bumped when the tables start afresh

    def ns_hash(self, name: str) -> int:
        h = self.ns.get(name)
        if h is None:
            h = self.ns[name] = 0 if name == " " else int(self.ws.hash_space(name))
        return h

    def _token(self, cache: dict[str, tuple[int, float]], ns_hash: int, tok: str) -> tuple[int, float]:
        name, sep, value = tok.partition(":")
        hv = (int(self.ws.hash_feature(name, ns_hash)), float(np.float32(value)) if sep else 1.0)
        if len(cache) >= 200_000:
            cache.clear()
        cache[tok] = hv
        return hv

    def parse(self, line: str) -> dict[str, tuple[list[int], np.ndarray]]:
        """A VW text line's features by namespace index (the namespace's first letter): hashes and values,
        as VW computes them. The label part before the first ``|`` is ignored."""
        out: dict[str, tuple[list[int], np.ndarray]] = {}
        for seg in line.split("|")[1:]:
            if not seg or seg[0] in " \t":
                ns, toks = " ", seg.split()
            else:
                toks = seg.split()
                ns = toks.pop(0)
                if ":" in ns:
                    raise ValueError(f"namespace weights ({ns!r}) are not supported")
            if not toks:
                continue
            nsh = self.ns_hash(ns)
            cache = self.tokens.get(nsh)
            if cache is None:
                cache = self.tokens[nsh] = {}
            get, miss = cache.get, self._token
            pairs = [get(t) or miss(cache, nsh, t) for t in toks]
            hs = [p[0] for p in pairs]
            vs = np.array([p[1] for p in pairs], dtype=np.float32)
            if ns[0] in out:
                h0, v0 = out[ns[0]]
                hs, vs = h0 + hs, np.concatenate([v0, vs])
            out[ns[0]] = (hs, vs)
        return out

    def rows(self, action_lines: list[str]) -> np.ndarray:
        """The table rows of these action lines (parsed and added the first time a line is seen)."""
        ids = self.action_ids
        try:
            return np.array([ids[line] for line in action_lines], dtype=np.intp)
        except KeyError:
            pass
        with self._lock:
            new = [line for line in dict.fromkeys(action_lines) if line not in ids]
            if len(ids) + len(new) > _MAX_CACHED:  # a catalog that churns: start the tables afresh
                ids.clear()
                self.tables.clear()
                self.generation += 1
                new = list(dict.fromkeys(action_lines))
            for line in new:
                row = len(ids)
                for ns, (hs, vs) in self.parse(line).items():
                    self.tables.setdefault(ns, _Table()).put(row, hs, vs)
                ids[line] = row
            for table in self.tables.values():  # every table covers every row, so one index fits all
                table.reserve(len(ids))
            return np.array([ids[line] for line in action_lines], dtype=np.intp)


_hashing: dict[int, Hashing] = {}
_hashing_lock = threading.Lock()


def hashing(bits: int) -> Hashing:
    h = _hashing.get(bits)
    if h is None:
        with _hashing_lock:
            h = _hashing.get(bits)
            if h is None:
                h = _hashing[bits] = Hashing(bits)
    return h
