"""`LinearModel`: serve a Vowpal Wabbit contextual-bandit model from its exported weights, scored with numpy.

Why (ADR 0005): loading a VW workspace takes ~2 ms and freeing one ~1-3 ms, all in C++ holding the GIL, so
every model swap stalled the event loop even when the load ran on a worker thread. The models Kassa trains
(``--cb_explore_adf`` with squarecb, epsilon-greedy or softmax exploration, quadratic interactions) are
linear in hashed features, so serving needs only the weights, VW's feature hashing and the exploration
rule. A swap then reads one small file and fills a dense ``float32`` array (~0.1 ms for 20k weights); the
probabilities equal VW's own to float rounding (``tests/test_linear.py`` checks them against VW).

Learning, batch training and evaluation keep using VW itself; only the serving copy changes.

Each registered VW artifact ``X.vw`` gets a sidecar ``X.lin``: a magic line, a JSON header (bits,
interactions, exploration settings, VW's example counter, SHA-256 of the weights and of the VW file it
came from) and the non-zero weights as ``uint32`` indices and ``float32`` values. A sidecar that is
missing, corrupt or from another file is rebuilt from the (checksummed) VW artifact; a model whose
settings this scorer does not cover (e.g. ``--elim``, cubic interactions, ``--hash all``) is served by
VW as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import struct
import threading
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np
import vowpalwabbit

log = logging.getLogger("kassa.learn")

MAGIC = b"KASSA-LINEAR 1\n"
SUFFIX = ".lin"
FNV_PRIME = 16777619  # VW's interaction hashing: index = (FNV_PRIME * first) ^ second
CONSTANT = 11650396  # VW's constant-feature hash
_I64 = np.int64  # hashes are < 2**32 and FNV_PRIME < 2**25, so the crossed index fits in int64
_MAX_CACHED = 50_000


class ServingModel(Protocol):
    """What the decision engine, the shadow scorer and the model store need from a loaded model."""

    path: Path
    version: str
    meta: dict

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]: ...


class UnsupportedModel(Exception):
    """The VW settings include something `LinearModel` does not reproduce; serve with VW."""


class SidecarError(Exception):
    """The sidecar is missing, corrupt or belongs to another artifact."""


@dataclass(frozen=True, slots=True)
class LinearSpec:
    bits: int
    quadratic: tuple[tuple[str, str], ...]
    constant: bool
    policy: str  # squarecb | epsilon | softmax
    gamma_scale: float = 10.0
    gamma_exponent: float = 0.5
    counter: int = 0  # squarecb: examples learned, which sets gamma
    epsilon: float = 0.05
    lam: float = 1.0


# Options that change nothing at prediction time (training settings, I/O), and the options the spec reads.
_IGNORED = {
    "cb_adf", "cb_explore_adf", "csoaa_rank", "no_stdin", "quiet", "testonly", "initial_regressor",
    "readable_model", "final_regressor", "learning_rate", "power_t", "initial_t", "decay_learning_rate",
    "l2", "adaptive", "normalized", "invariant", "sgd", "no_predict", "random_seed", "passes", "holdout_off",
    "holdout_period", "holdout_after", "cache_file", "kill_cache", "data", "predictions", "save_resume",
    "preserve_performance_counters", "hash_seed_checked",
}
_READ = {"bit_precision", "quadratic", "noconstant", "squarecb", "gamma_scale", "gamma_exponent", "epsilon",
         "softmax", "lambda", "cb_type", "csoaa_ldf"}


def spec_from_args(arguments: str, counter: int | None) -> LinearSpec:
    """The scorer settings for a model with these VW arguments (as ``Workspace.get_arguments()`` gives
    them); raises `UnsupportedModel` for anything it would not reproduce exactly."""
    opts: dict[str, list[str]] = {}
    name: str | None = None
    for tok in shlex.split(arguments):
        if tok.startswith("--"):
            name = tok[2:]
            opts.setdefault(name, [])
        elif name is not None:
            opts[name].append(tok)
    unknown = sorted(set(opts) - _IGNORED - _READ)
    if unknown:
        raise UnsupportedModel(f"options the linear scorer does not reproduce: {', '.join(unknown)}")
    if opts.get("cb_type", ["mtr"]) != ["mtr"] or opts.get("csoaa_ldf", ["multiline"]) != ["multiline"]:
        raise UnsupportedModel("only cb_type mtr with csoaa_ldf multiline is reproduced")
    pairs = []
    for q in opts.get("quadratic", []):
        if len(q) != 2 or q[0] == q[1] or ":" in q:
            raise UnsupportedModel(f"interaction {q!r} (only two different namespaces are reproduced)")
        pairs.append((q[0], q[1]))

    def one(key: str, default: float) -> float:
        values = opts.get(key) or [str(default)]
        return float(values[-1])

    bits = int(one("bit_precision", 18))
    if "squarecb" in opts:
        if counter is None:
            raise UnsupportedModel("squarecb model without its example counter")
        policy = "squarecb"
    elif "softmax" in opts:
        if one("epsilon", 0.0) != 0.0:
            raise UnsupportedModel("softmax with an epsilon floor")
        policy = "softmax"
    else:
        policy = "epsilon"
    return LinearSpec(
        bits=bits, quadratic=tuple(pairs), constant="noconstant" not in opts, policy=policy,
        gamma_scale=one("gamma_scale", 10.0), gamma_exponent=one("gamma_exponent", 0.5),
        counter=int(counter or 0) if policy == "squarecb" else 0,
        epsilon=one("epsilon", 0.05 if policy == "epsilon" else 0.0),
        lam=abs(one("lambda", 1.0)),
    )


# --------------------------------------------------------------------------- sidecar files

def sidecar_path(vw_path: Path) -> Path:
    return Path(vw_path).with_suffix(SUFFIX)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sidecar(out: Path, spec: LinearSpec, index: np.ndarray, weight: np.ndarray, source_sha256: str) -> Path:
    index = np.ascontiguousarray(index, dtype="<u4")
    weight = np.ascontiguousarray(weight, dtype="<f4")
    payload = index.tobytes() + weight.tobytes()
    header = asdict(spec) | {"n": int(index.size), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                             "source_sha256": source_sha256}
    head = json.dumps(header, sort_keys=True).encode()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + payload)
    os.replace(tmp, out)
    return out


def read_sidecar(path: Path, source_sha256: str | None = None) -> tuple[LinearSpec, np.ndarray, np.ndarray]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SidecarError(f"{path} is missing") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise SidecarError(f"{path} is not a Kassa linear model")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + hlen])
        n = int(header.pop("n"))
        payload_sha = header.pop("payload_sha256")
        source_sha = header.pop("source_sha256")
        header["quadratic"] = tuple(tuple(p) for p in header["quadratic"])
        spec = LinearSpec(**header)
    except (ValueError, KeyError, TypeError) as exc:
        raise SidecarError(f"{path}: unreadable header ({exc})") from None
    payload = memoryview(data)[start + hlen:]
    if len(payload) != 8 * n or hashlib.sha256(payload).hexdigest() != payload_sha:
        raise SidecarError(f"{path}: weights do not match their checksum (corrupt file)")
    if source_sha256 is not None and source_sha != source_sha256:
        raise SidecarError(f"{path} was exported from another artifact")
    index = np.frombuffer(payload, dtype="<u4", count=n)
    weight = np.frombuffer(payload, dtype="<f4", count=n, offset=4 * n)
    return spec, index, weight


_COUNTER = re.compile(rb"storing example counter:\s*=\s*(\d+)")
_weights_decoder = msgspec.json.Decoder(dict[str, list[dict[str, float]]])


def _weights(ws: vowpalwabbit.Workspace) -> tuple[np.ndarray, np.ndarray]:
    rows = _weights_decoder.decode(ws.json_weights()).get("weights", [])
    index = np.fromiter((r["index"] for r in rows), dtype=np.uint32, count=len(rows))
    weight = np.fromiter((r["value"] for r in rows), dtype=np.float32, count=len(rows))
    return index, weight


def _dumping(vw_path: Path, dump: Path) -> vowpalwabbit.Workspace:
    """``vw_path`` loaded for prediction, writing its readable model to ``dump`` when finished: the only
    place VW shows squareCB's example counter."""
    return vowpalwabbit.Workspace(f"--quiet -t -i {vw_path} --readable_model {dump}", enable_logging=False)


def _dumped_counter(dump: Path) -> int | None:
    try:
        m = _COUNTER.search(dump.read_bytes())
    finally:
        dump.unlink(missing_ok=True)
    return int(m.group(1)) if m else None


def export(vw_path: Path, out: Path | None = None) -> Path:
    """Write the sidecar of a VW model file (loads it once with VW). Raises `UnsupportedModel`."""
    vw_path = Path(vw_path)
    out = out or sidecar_path(vw_path)
    dump = out.with_name(out.name + ".readable.tmp")
    ws = _dumping(vw_path, dump)
    try:
        arguments = ws.get_arguments()
        index, weight = _weights(ws)
    finally:
        ws.finish()
    spec = spec_from_args(arguments, _dumped_counter(dump))
    return write_sidecar(out, spec, index, weight, sha256_file(vw_path))


def export_live(ws: vowpalwabbit.Workspace, counter: int, vw_path: Path) -> Path:
    """The sidecar of ``vw_path``, just saved from the live workspace ``ws``, without loading it again."""
    spec = spec_from_args(ws.get_arguments(), counter)
    index, weight = _weights(ws)
    return write_sidecar(sidecar_path(vw_path), spec, index, weight, sha256_file(vw_path))


def model_counter(vw_path: Path) -> int:
    """VW's squarecb example counter stored in a model file (0 for other policies)."""
    try:
        return read_sidecar(sidecar_path(vw_path), sha256_file(vw_path))[0].counter
    except SidecarError:
        pass
    dump = Path(vw_path).with_name(Path(vw_path).name + ".counter.tmp")
    _dumping(Path(vw_path), dump).finish()
    return _dumped_counter(dump) or 0


# --------------------------------------------------------------------------- feature hashing

class _Table:
    """One namespace's features of every action line seen, one padded row per action (hash 0, value 0 in
    the padding, which adds nothing), so a candidate list's features are one fancy-index away."""

    __slots__ = ("h", "v", "width")

    def __init__(self) -> None:
        self.width = 1
        self.h = np.zeros((64, 1), dtype=_I64)
        self.v = np.zeros((64, 1), dtype=np.float32)

    def reserve(self, rows: int, width: int = 0) -> None:
        """Room for ``rows`` actions of up to ``width`` features (rows of actions without this namespace
        stay padding)."""
        if rows > self.h.shape[0] or width > self.width:
            rows = max(rows, self.h.shape[0] * 2) if rows > self.h.shape[0] else self.h.shape[0]
            width = max(self.width, width)
            h = np.zeros((rows, width), dtype=_I64)
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


# --------------------------------------------------------------------------- the model

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
                 weight: np.ndarray) -> None:
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

    @classmethod
    def open(cls, vw_path: Path, version: str, meta: dict | None = None,
             source_sha256: str | None = None) -> LinearModel:
        spec, index, weight = read_sidecar(sidecar_path(vw_path), source_sha256)
        return cls(vw_path, version, meta, spec, index, weight)

    def scores(self, shared: str, action_lines: list[str]) -> np.ndarray:
        """VW's cost estimate for each action (lower is better)."""
        hashing_ = self._hashing
        ids = hashing_.rows(action_lines)
        w, mask, fnv = self.w, self.mask, FNV_PRIME
        out = self._linear(hashing_)[ids]  # every action feature, linearly
        base = self._const
        sh = {}
        for ns, (hs, vs) in hashing_.parse(shared).items():
            ha = np.array(hs, dtype=_I64)
            sh[ns] = (ha, vs)
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
            for t in list(hashing_.tables.values()):
                h, v = t.h[start:n], t.v[start:n]
                part += (self.w.take(h & self.mask) * v).sum(axis=1)
            lin = self._lin = np.concatenate([lin[:start], part]) if start else part
            self._lin_generation = generation
        return lin

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]:
        """The policy's probability for each action, in the order given (VW's exploration rule)."""
        return explore(self.spec, self.scores(shared, action_lines))


def explore(spec: LinearSpec, scores: np.ndarray) -> list[float]:
    """VW's exploration rule on the scores (in double precision; VW's float32 differs by ~1e-7)."""
    s = scores.tolist()
    k = len(s)
    if k == 0:
        return []
    lo = min(s)
    best = s.index(lo)  # the first of equal minima, as VW's ranking by (score, action) does
    if spec.policy == "squarecb":
        gamma = float(np.float32(spec.gamma_scale) * np.float32(float(spec.counter) ** spec.gamma_exponent))
        p = [1.0 / (k + gamma * (x - lo)) for x in s]
        p[best] = 0.0
        p[best] = 1.0 - sum(p)
    elif spec.policy == "softmax":
        lam = spec.lam
        e = [math.exp(-lam * (x - lo)) for x in s]
        total = sum(e)
        p = [x / total for x in e]
    else:
        eps = spec.epsilon
        tied = s.count(lo)
        p = [eps / k + ((1.0 - eps) / tied if x == lo else 0.0) for x in s]
    return p


# --------------------------------------------------------------------------- loading for serving

def load_serving(vw_path: Path, version: str, meta: dict | None = None,
                 source_sha256: str | None = None) -> ServingModel:
    """The serving copy of a (verified) VW artifact: its `LinearModel`, exporting the sidecar first when it
    is missing or stale (one VW load, logged); VW itself when the settings are not covered."""
    try:
        return LinearModel.open(vw_path, version, meta, source_sha256)
    except SidecarError as why:
        log.info("rebuilding the linear model of %s: %s", version, why)
    try:
        export(vw_path)
        return LinearModel.open(vw_path, version, meta, source_sha256)
    except UnsupportedModel as why:
        log.warning("serving %s with Vowpal Wabbit itself (%s); swaps of it pause requests for a few ms",
                    version, why)
    from kassa.learn.vw import VWModel

    return VWModel(Path(vw_path), version, meta)
