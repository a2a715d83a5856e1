"""Output files written whole or not at all: the one way a command replaces a file a user or a later job reads.

`replacing` hands the writer a temporary name in the target's directory (``.NAME.PID.tmp``, a dot name that
``*.parquet`` / ``*.html`` globs skip); once the writer returns, the file is fsynced and renamed over the target,
then the directory is fsynced so the rename survives a crash. If the writer raises (a full disk, a bad value
half-way through a Parquet table) or the command is stopped (Ctrl-C; SIGTERM, which ``kassa`` turns into
``SystemExit(143)``), the temporary file is removed and the previous file is left as it was. Before, `kassa
features training-set --out`, `kassa evaluate --report` and `kassa loadtest run --report` wrote straight into
the target: a stop or a failure mid-write left a truncated file where the last good one had been.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` (fsynced), on an error it is
    removed and ``path`` keeps its previous contents. Creates ``path``'s folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def write_atomic(path: str | Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through `replacing` and return the path. ``mode`` (e.g. 0o600
    for a file holding keys) is set before any data is written."""
    out = Path(path)
    with replacing(out) as tmp:
        if mode is not None:
            tmp.touch(mode)
            tmp.chmod(mode)  # touch's mode is filtered by the umask
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return out


def fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwritable(path: str | Path) -> str | None:
    """Why a command could not write ``path`` (a folder, a place it may not create files in), or None: checked
    before the work whose result it is to hold. Creates ``path``'s folder, as `replacing` would."""
    out = Path(path)
    if out.is_dir():
        return f"{out} is a folder; give the file to write"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        return f"cannot write to {out.parent}: {exc.strerror or exc}"
    return None
