"""Start-up checks of the data directory: a damaged file stops the start with a message naming it, and a
command that only reads Kassa's data refuses a data dir that holds none (`missing_data`).

Without these a damaged data dir either started "ready" and wrong (a ``kassa.db`` truncated to 0 bytes
became a fresh empty database, and the catalog file's checksum stamp said the catalog was already
loaded, so every decision was a 404) or died in a ~500-line traceback that never named the file.

`check_data_dir` runs before anything opens the files. SQLite files get a header check (cheap whatever
their size: one ``PRAGMA schema_version``); the metadata DB, which is small, also a ``quick_check``.
The online-store snapshot is checked where it is decoded (`kassa.features.online.factory`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.engine import Engine

from kassa.config import Settings
from kassa.db import make_engine

SQLITE_HEADER = b"SQLite format 3\x00"


class DamagedDataDir(SystemExit):
    """A file of the data dir that Kassa cannot use; the message says which and what to do."""

    def __init__(self, path: Path, problem: str, remedy: str) -> None:
        super().__init__(f"cannot start: {path} {problem}.\n  What to do: {remedy}")
        self.path = path


class UnusableStartFile(SystemExit):
    """A file the settings name (``catalog_file``, ``features.definitions_file``) that is missing, unreadable
    or invalid: one line naming it and the setting, not the loader's traceback."""

    def __init__(self, what: str, setting: str, path: str | Path, exc: Exception) -> None:
        if isinstance(exc, OSError):
            problem = f"{path}: {exc.strerror or exc}"
            if isinstance(exc, FileNotFoundError) and not Path(path).is_absolute():
                # `kassa serve --settings shop/kassa.yaml` from outside shop/ reads catalog.yaml from here.
                problem += f" (relative paths are read from the current directory, {Path.cwd()})"
        else:  # the loaders' messages already start with the path
            problem = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        super().__init__(f"cannot start: {what} ({setting}) {problem}")


class MetadataUnreachable(SystemExit):
    """The metadata PostgreSQL did not answer when a command opened it: one line naming it (password hidden)."""

    def __init__(self, url: str, exc: BaseException) -> None:
        from sqlalchemy.engine import make_url

        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        shown = make_url(url).render_as_string(hide_password=True)
        super().__init__(f"cannot reach the metadata database {shown}: {reason}")


def metadata_engine(settings: Settings) -> Engine:
    """The metadata database of ``settings``, migrated to the newest schema, with its session limits
    (`metadata.idle_in_transaction_seconds`): what every command and process that opens it uses. A PostgreSQL that
    cannot be reached ends the command with one line (`MetadataUnreachable`), not a ~300-line traceback: `kassa
    serve|learn|stream` wait for it first (`kassa.db.wait_for_database`), a one-shot command stops."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    url = settings.metadata_url
    try:
        return make_engine(url, idle_in_transaction=settings.metadata.idle_in_transaction_seconds)
    except (OperationalError, InterfaceError) as exc:
        if not url.startswith("postgresql"):
            raise
        raise MetadataUnreachable(url, exc) from None


def missing_data(settings: Settings) -> Path | None:
    """The data dir, when the metadata is the SQLite file in it and that file does not exist: what a command
    that only reads (`kassa models list`, `kassa features get`, `kassa stream`) must refuse rather than make a
    fresh empty database in a mistyped --data-dir and answer as if the store had nothing. A data dir that is a
    file is left to the one-line "cannot use ... as the data dir" of opening it."""
    data = settings.data_path
    if settings.metadata.url is None and not data.is_file() and not (data / "kassa.db").exists():
        return data
    return None


def shown_path(path: Path) -> str:
    """A data dir as a message names it: a relative one with where it resolves, since it is read from the current
    folder, not from the settings file's (``--settings shop/kassa.yaml`` run from elsewhere said "no Kassa data in
    .kassa")."""
    return str(path) if path.is_absolute() else f"{path} (that is {path.resolve()}, from the current folder)"


def _sqlite_problem(path: Path, full_check: bool) -> str | None:
    """Why ``path`` is not a usable SQLite database, or None."""
    with path.open("rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        return f"is not an SQLite database (it starts with {head[:16]!r})"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            if full_check:
                result = [row[0] for row in conn.execute("PRAGMA quick_check")]
                if result != ["ok"]:
                    return f"fails SQLite's integrity check ({'; '.join(result[:3])})"
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"is a damaged SQLite database ({exc})"
    return None


def check_data_dir(settings: Settings) -> None:
    """Raise `DamagedDataDir` for the first file of ``settings.data_dir`` that cannot be used."""
    data = settings.data_path
    meta = data / "kassa.db"
    restore = (f"restore {meta.name} from a backup, or move {data} away to start with an empty data dir "
               "(the catalog file, if configured, is loaded again; keys must be created again)")
    if meta.exists():
        if meta.stat().st_size == 0:
            # SQLite would treat it as a new database: an empty catalog that says it is ready.
            raise DamagedDataDir(meta, "is empty (0 bytes): the metadata DB (catalog, placements, keys, "
                                       "model registry) was truncated", restore)
        problem = _sqlite_problem(meta, full_check=True)
        if problem:
            raise DamagedDataDir(meta, problem, restore)
    elif (data / "catalog_file.sha256").exists():
        # A fresh metadata DB must load the catalog file whatever the stamp of the old one says.
        (data / "catalog_file.sha256").unlink()
    events = data / "events.db"
    if events.exists() and events.stat().st_size > 0:
        problem = _sqlite_problem(events, full_check=False)  # may be large: the header check only
        if problem:
            raise DamagedDataDir(events, problem, f"restore {events.name} from a backup; without it the "
                                 "acknowledged events since the backup are lost (move it away to start "
                                 "with an empty event log)")
