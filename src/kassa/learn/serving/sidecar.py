"""The ``.lin`` sidecar: a VW model's weights and exploration settings in a file Kassa reads itself (ADR 0005).

Each registered VW artifact ``X.vw`` gets a sidecar ``X.lin``: a magic line, a JSON header (bits,
interactions, exploration settings, VW's example counter, SHA-256 of the weights and of the VW file it
came from) and the non-zero weights as ``uint32`` indices and ``float32`` values, then, for a UCB model, its
per-weight counts the same way (``counts_n`` of them; `kassa.learn.serving.bonus`). This module owns the
format: the settings read back from a model's VW arguments (`LinearSpec`), writing and verifying the file,
and exporting it from a VW model file or from the learner's live workspace (the only place VW loads here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import msgspec
import numpy as np
import vowpalwabbit

from kassa import policies
from kassa.policies import UnsupportedModel

MAGIC = b"KASSA-LINEAR 1\n"
SUFFIX = ".lin"


class SidecarError(Exception):
    """The sidecar is missing, corrupt or belongs to another artifact."""


@dataclass(frozen=True, slots=True)
class LinearSpec:
    bits: int
    quadratic: tuple[tuple[str, str], ...]
    constant: bool
    policy: str  # a learned policy's name in `kassa.policies`
    gamma_scale: float = 10.0
    gamma_exponent: float = 0.5
    counter: int = 0  # squarecb: examples learned, which sets gamma
    epsilon: float = 0.05
    lam: float = 1.0
    ignore_linear: tuple[str, ...] = ()  # namespaces (first letters) with no linear terms (VW --ignore_linear)
    alpha: float = 0.0  # ucb: the uncertainty bonus's weight (the counts travel in the sidecar's payload)


# Options that change nothing at prediction time (training settings, I/O), and the options the spec reads.
_IGNORED = {
    "cb_adf", "cb_explore_adf", "csoaa_rank", "no_stdin", "quiet", "testonly", "initial_regressor",
    "readable_model", "final_regressor", "learning_rate", "power_t", "initial_t", "decay_learning_rate",
    "l2", "adaptive", "normalized", "invariant", "sgd", "no_predict", "random_seed", "passes", "holdout_off",
    "holdout_period", "holdout_after", "cache_file", "kill_cache", "data", "predictions", "save_resume",
    "preserve_performance_counters", "hash_seed_checked",
}
_READ = {"bit_precision", "quadratic", "noconstant", "gamma_scale", "gamma_exponent", "epsilon", "lambda", "cb_type",
         "csoaa_ldf", "ignore_linear"}  # plus each policy's `vw_flag` (`kassa.policies`)


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
    flags = {p.vw_flag for p in map(policies.get, policies.names()) if p.vw_flag}
    unknown = sorted(set(opts) - _IGNORED - _READ - flags)
    if unknown:
        raise UnsupportedModel(f"options the linear scorer does not reproduce: {', '.join(unknown)}")
    if opts.get("cb_type", ["mtr"]) != ["mtr"] or opts.get("csoaa_ldf", ["multiline"]) != ["multiline"]:
        raise UnsupportedModel("only cb_type mtr with csoaa_ldf multiline is reproduced")
    pairs = []
    for q in opts.get("quadratic", []):
        if len(q) != 2 or q[0] == q[1] or ":" in q:
            raise UnsupportedModel(f"interaction {q!r} (only two different namespaces are reproduced)")
        pairs.append((q[0], q[1]))
    ignored = tuple(sorted({c for arg in opts.get("ignore_linear", []) for c in arg}))

    def one(key: str, default: float) -> float:
        values = opts.get(key) or [str(default)]
        return float(values[-1])

    policy = policies.from_vw_options(opts)
    if not policy.numpy_scorer:
        raise UnsupportedModel(f"the numpy scorer does not reproduce policy {policy.name!r}")
    settings = {"gamma_scale": one("gamma_scale", 10.0), "gamma_exponent": one("gamma_exponent", 0.5), "counter": 0,
                "epsilon": one("epsilon", 0.0), "lam": abs(one("lambda", 1.0))}
    settings.update(policy.scorer_settings(one, counter))
    return LinearSpec(bits=int(one("bit_precision", 18)), quadratic=tuple(pairs), constant="noconstant" not in opts,
                      policy=policy.name, ignore_linear=ignored, **settings)  # type: ignore[arg-type]



def sidecar_path(vw_path: Path) -> Path:
    return Path(vw_path).with_suffix(SUFFIX)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


Counts = tuple[np.ndarray, np.ndarray]  # a UCB model's non-zero per-weight counts: uint32 indices, float32 sums


def write_sidecar(out: Path, spec: LinearSpec, index: np.ndarray, weight: np.ndarray, source_sha256: str,
                  counts: Counts | None = None) -> Path:
    index = np.ascontiguousarray(index, dtype="<u4")
    weight = np.ascontiguousarray(weight, dtype="<f4")
    payload = index.tobytes() + weight.tobytes()
    m = 0
    if counts is not None:
        cindex = np.ascontiguousarray(counts[0], dtype="<u4")
        cvalue = np.ascontiguousarray(counts[1], dtype="<f4")
        m = int(cindex.size)
        payload += cindex.tobytes() + cvalue.tobytes()
    header = asdict(spec) | {"n": int(index.size), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                             "source_sha256": source_sha256, "counts_n": m}
    head = json.dumps(header, sort_keys=True).encode()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + payload)
    os.replace(tmp, out)
    return out


def read_sidecar(path: Path, source_sha256: str | None = None) -> tuple[LinearSpec, np.ndarray, np.ndarray]:
    """The spec and the non-zero weights (indices, values) of a sidecar; `SidecarError` if it does not check."""
    return read_sidecar_counts(path, source_sha256)[:3]


def read_sidecar_counts(path: Path, source_sha256: str | None = None
                        ) -> tuple[LinearSpec, np.ndarray, np.ndarray, Counts | None]:
    """`read_sidecar` and the model's per-weight counts (None for a model without them)."""
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
        m = int(header.pop("counts_n", 0))  # absent before UCB models existed
        payload_sha = header.pop("payload_sha256")
        source_sha = header.pop("source_sha256")
        header["quadratic"] = tuple(tuple(p) for p in header["quadratic"])
        header["ignore_linear"] = tuple(header.get("ignore_linear", ()))  # absent before it existed
        spec = LinearSpec(**header)
    except (ValueError, KeyError, TypeError) as exc:
        raise SidecarError(f"{path}: unreadable header ({exc})") from None
    payload = memoryview(data)[start + hlen:]
    if len(payload) != 8 * (n + m) or hashlib.sha256(payload).hexdigest() != payload_sha:
        raise SidecarError(f"{path}: weights do not match their checksum (corrupt file)")
    if source_sha256 is not None and source_sha != source_sha256:
        raise SidecarError(f"{path} was exported from another artifact")
    index = np.frombuffer(payload, dtype="<u4", count=n)
    weight = np.frombuffer(payload, dtype="<f4", count=n, offset=4 * n)
    counts = None
    if m:
        counts = (np.frombuffer(payload, dtype="<u4", count=m, offset=8 * n),
                  np.frombuffer(payload, dtype="<f4", count=m, offset=8 * n + 4 * m))
    elif policies.uses_counts(spec.policy):  # a UCB model that has learned nothing yet
        counts = (np.zeros(0, dtype="<u4"), np.zeros(0, dtype="<f4"))
    return spec, index, weight, counts


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


def export_live(ws: vowpalwabbit.Workspace, counter: int, vw_path: Path,
                ucb: tuple[float, Counts] | None = None) -> Path:
    """The sidecar of ``vw_path``, just saved from the live workspace ``ws``, without loading it again. ``ucb``
    (the bonus weight and the counts) makes it a UCB model's (`kassa.policies.UCB`)."""
    spec = spec_from_args(ws.get_arguments(), counter)
    return _write_ucb(sidecar_path(vw_path), spec, *_weights(ws), sha256_file(vw_path), ucb)


def _write_ucb(out: Path, spec: LinearSpec, index: np.ndarray, weight: np.ndarray, source_sha256: str,
               ucb: tuple[float, Counts] | None) -> Path:
    if ucb is None:
        return write_sidecar(out, spec, index, weight, source_sha256)
    if spec.policy != "epsilon":
        raise UnsupportedModel(f"a UCB model's VW arguments read as {spec.policy!r}, not ε-greedy")
    alpha, counts = ucb
    spec = replace(spec, policy="ucb", alpha=float(alpha))
    return write_sidecar(out, spec, index, weight, source_sha256, counts)


def export_ucb(vw_path: Path, alpha: float, counts: Counts, out: Path | None = None) -> Path:
    """The sidecar of a UCB model file (batch training: VW wrote the file, Kassa counted the examples)."""
    vw_path = Path(vw_path)
    ws = vowpalwabbit.Workspace(f"--quiet -t -i {vw_path}", enable_logging=False)
    try:
        arguments = ws.get_arguments()
        index, weight = _weights(ws)
    finally:
        ws.finish()
    spec = spec_from_args(arguments, None)
    return _write_ucb(out or sidecar_path(vw_path), spec, index, weight, sha256_file(vw_path), (alpha, counts))


def model_counter(vw_path: Path) -> int:
    """VW's squarecb example counter stored in a model file (0 for other policies)."""
    try:
        return read_sidecar(sidecar_path(vw_path), sha256_file(vw_path))[0].counter
    except SidecarError:
        pass
    dump = Path(vw_path).with_name(Path(vw_path).name + ".counter.tmp")
    _dumping(Path(vw_path), dump).finish()
    return _dumped_counter(dump) or 0
