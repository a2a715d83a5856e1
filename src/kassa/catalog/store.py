"""Durable catalog storage behind a small protocol, and `Catalog`, which owns the live snapshot.

Writes go to the store first, then a new immutable `CatalogSnapshot` replaces the old one with a single
reference assignment, so a decision in flight keeps the snapshot it started with. Every SQL write bumps the
``catalog`` change counter in its transaction (`kassa.db.bump`); other processes then call `Catalog.reload`
(kassa.changes.ChangeFeed, wired in app.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec
import yaml
from sqlalchemy import Engine, delete, insert, select, update

from kassa import schemas
from kassa.catalog.snapshot import CatalogSnapshot
from kassa.db import CATALOG, applied_files_table, bump, offers_table, placements_table
from kassa.timezones import timezone_error

log = logging.getLogger("kassa.catalog")
T = TypeVar("T")
_AT_PATH = re.compile(r" - at `\$(.*)`$")
_OWN_FIELD = re.compile(r"^(\w+): ")
_COUNTRY = re.compile(r"^[A-Z]{2}$")  # ISO 3166-1 alpha-2, as an order's ship_country (after upper-casing)


def check_placement(placement: schemas.Placement) -> None:
    """Checks a placement's wire type cannot express; raises `ValueError` naming the field.

    The time zone must exist in the tz database now: a placement stored with ``"Europe"`` made every
    decision on it fail. (Reading stays safe for rows stored before this check: `zone` falls back.)
    Listed offers must be distinct: ``[a, a, a]`` showed offer a in three slots of one slate (rows stored
    before this check are read once each, `CatalogSnapshot.build`).
    """
    problem = timezone_error(placement.timezone)
    if problem is not None:
        raise InvalidField(problem, "timezone")
    twice = sorted(o for o, n in Counter(placement.offers or ()).items() if n > 1)
    if twice:  # the slate would show the same offer in several slots
        raise InvalidField(f"offers lists {', '.join(map(repr, twice))} more than once", "offers")


def check_offer(offer: schemas.Offer) -> None:
    """Checks an offer's wire type cannot express; raises `InvalidField` naming the field.

    Eligibility country codes must be ISO 3166-1 alpha-2 (two letters; `Eligibility` upper-cases them): an
    order's ship_country is, so ``countries: [USA]`` matched no order and the offer was never shown, and
    ``exclude_countries: [DEU]`` excluded nothing. (Reading stays as it was for rows stored before this check:
    such a code still matches nothing.)
    """
    for name in ("countries", "exclude_countries"):
        for i, code in enumerate(getattr(offer.eligibility, name) or ()):
            if not _COUNTRY.match(code):
                raise InvalidField(f"{code!r} is not an ISO 3166-1 alpha-2 country code (two letters, such as US)",
                                   f"eligibility.{name}[{i}]")


class InvalidField(ValueError):
    """A catalog value refused at write time; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CatalogStore(Protocol):
    def load(self) -> tuple[list[schemas.Offer], list[schemas.Placement]]: ...
    def put_offer(self, offer: schemas.Offer) -> bool: ...  # True when created
    def delete_offer(self, offer_id: str) -> bool: ...
    def put_placement(self, placement: schemas.Placement) -> bool: ...
    def put_many(self, offers: list[schemas.Offer], placements: list[schemas.Placement],
                 file_stamp: str | None = None) -> None: ...
    def file_stamp(self) -> str | None: ...  # the SHA-256 of the catalog file last applied, if any


_CATALOG_FILE = "catalog_file"


class SqlCatalogStore:
    """Offers and placements as JSON bodies in two SQL tables (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> tuple[list[schemas.Offer], list[schemas.Placement]]:
        with self.engine.connect() as conn:
            offers = [
                _stored(row.body, schemas.Offer)
                for row in conn.execute(select(offers_table.c.body).order_by(offers_table.c.id))
            ]
            placements = [
                _stored(row.body, schemas.Placement)
                for row in conn.execute(select(placements_table.c.body).order_by(placements_table.c.id))
            ]
        return offers, placements

    def _upsert(self, conn, table, key: str, body: bytes) -> bool:
        now = time.time()
        text = body.decode()
        res = conn.execute(update(table).where(table.c.id == key).values(body=text, updated_at=now))
        if res.rowcount:
            return False
        conn.execute(insert(table).values(id=key, body=text, updated_at=now))
        return True

    def put_offer(self, offer: schemas.Offer) -> bool:
        with self.engine.begin() as conn:
            bump(conn, CATALOG)
            return self._upsert(conn, offers_table, offer.id, msgspec.json.encode(offer))

    def delete_offer(self, offer_id: str) -> bool:
        with self.engine.begin() as conn:
            bump(conn, CATALOG)
            return bool(conn.execute(delete(offers_table).where(offers_table.c.id == offer_id)).rowcount)

    def put_placement(self, placement: schemas.Placement) -> bool:
        with self.engine.begin() as conn:
            bump(conn, CATALOG)
            return self._upsert(conn, placements_table, placement.id, msgspec.json.encode(placement))

    def file_stamp(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(applied_files_table.c.sha256).where(
                applied_files_table.c.name == _CATALOG_FILE)).scalar()

    def put_many(self, offers: list[schemas.Offer], placements: list[schemas.Placement],
                 file_stamp: str | None = None) -> None:
        """Upsert many rows in one transaction: delete the ids, then one multi-row insert per table; with
        ``file_stamp``, record it as the catalog file applied (same transaction)."""
        now = time.time()
        with self.engine.begin() as conn:
            bump(conn, CATALOG)
            if file_stamp is not None:
                t = applied_files_table
                conn.execute(delete(t).where(t.c.name == _CATALOG_FILE))
                conn.execute(insert(t).values(name=_CATALOG_FILE, sha256=file_stamp, applied_at=now))
            for table, items in ((offers_table, offers), (placements_table, placements)):
                if not items:
                    continue
                ids = [item.id for item in items]
                for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
                    conn.execute(delete(table).where(table.c.id.in_(ids[i : i + 500])))
                rows = [{"id": item.id, "body": msgspec.json.encode(item).decode(), "updated_at": now}
                        for item in items]
                conn.execute(insert(table), rows)


def _stored(body: str | bytes, kind: type[T]) -> T:
    """A stored row, decoded. A value an older version accepted and the wire type now refuses (a negative
    budget, an exploration of 5) falls back to its default, with a warning, rather than stopping the start."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        tree = msgspec.json.decode(body)
        for _ in range(20):
            m = _AT_PATH.search(str(exc))
            parts = m.group(1).lstrip(".").split(".") if m else []
            if not parts and (own := _OWN_FIELD.match(str(exc))) and own.group(1) in tree:
                parts = [own.group(1)]  # a check of the whole row (`__post_init__`) that names its field first
            for j, part in enumerate(parts):
                if "[" in part:  # in a dict's values or a list's items (`features[...]`): the field holding them
                    parts = [*parts[:j], part[:part.index("[")]]
                    break
            node = tree
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not parts or not isinstance(node, dict) or parts[-1] not in node:
                raise
            log.warning("stored %s %r: %s is out of range (%s); using its default until it is written again",
                        kind.__name__, tree.get("id"), ".".join(parts), str(exc).split(" - at ")[0])
            del node[parts[-1]]
            try:
                return msgspec.convert(tree, kind)
            except msgspec.ValidationError as again:
                exc = again
        raise


def read_catalog_file(path: str | Path, raw: bytes | None = None) -> schemas.CatalogFile:
    """Parse a YAML or JSON catalog file, with a message naming the failing field."""
    raw = Path(path).read_bytes() if raw is None else raw
    try:
        if str(path).endswith(".json"):
            catalog = msgspec.json.decode(raw, type=schemas.CatalogFile)
        else:
            # libyaml's C loader when present: the pure-Python one takes ~40 s for 10,000 offers.
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            stream = io.BytesIO(raw)
            stream.name = str(path)  # YAML errors name the file, not "<byte string>"
            catalog = msgspec.convert(yaml.load(stream, Loader=loader) or {}, schemas.CatalogFile)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    known = {o.id for o in catalog.offers}
    for i, offer in enumerate(catalog.offers):
        try:
            check_offer(offer)
        except InvalidField as exc:
            raise ValueError(f"{path}: offers[{i}].{exc.field}: {exc}") from None
    for i, placement in enumerate(catalog.placements):
        try:
            check_placement(placement)
        except InvalidField as exc:
            raise ValueError(f"{path}: placements[{i}].{exc.field}: {exc}") from None
        for offer_id in placement.offers or ():
            if offer_id not in known:
                raise ValueError(f"{path}: placement {placement.id!r} lists unknown offer {offer_id!r}")
    return catalog


class Catalog:
    """The live catalog: a store plus the current immutable snapshot."""

    def __init__(self, store: CatalogStore) -> None:
        self.store = store
        offers, placements = store.load()
        self.snapshot = CatalogSnapshot.build(offers, placements)

    def _rebuild(self) -> None:
        offers, placements = self.store.load()
        self.snapshot = CatalogSnapshot.build(offers, placements, previous=self.snapshot)

    def reload(self) -> None:
        """Rebuild the snapshot from the store: another process changed the catalog (blocking: SQL)."""
        self._rebuild()

    def load_file(self, path: str | Path, stamp_dir: Path | None = None) -> int:
        """Upsert a catalog file's offers and placements; returns how many were loaded.

        With ``stamp_dir`` (the data dir), a file whose bytes were already applied to this metadata store
        is skipped: a restart, or another process on the same PostgreSQL, reads the catalog from the store
        instead of re-parsing the file and reverting offers changed over the API since. The stamp lives in
        the store (``applied_files``); a data dir's older ``catalog_file.sha256`` is adopted once when the
        store holds a catalog but no stamp yet.
        """
        raw = Path(path).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if stamp_dir is not None:
            applied = self.store.file_stamp()
            legacy = stamp_dir / "catalog_file.sha256"
            if applied is None and legacy.exists() and legacy.read_bytes().strip() == digest.encode() and (
                    self.snapshot.offers or self.snapshot.placements):
                self.store.put_many([], [], file_stamp=digest)  # adopt the data dir's stamp
                applied = digest
            if applied == digest:
                # Applied by another process, maybe after this snapshot was read (processes starting at once):
                # read what it stored, or this one serves, or learns, an empty catalog.
                self._rebuild()
                return 0
        catalog = read_catalog_file(path, raw)
        self.store.put_many(catalog.offers, catalog.placements, file_stamp=digest if stamp_dir is not None else None)
        self._rebuild()
        return len(catalog.offers) + len(catalog.placements)

    def put_offer(self, offer: schemas.Offer) -> bool:
        check_offer(offer)
        created = self.store.put_offer(offer)
        self._rebuild()
        return created

    def delete_offer(self, offer_id: str) -> bool:
        deleted = self.store.delete_offer(offer_id)
        if deleted:
            self._rebuild()
        return deleted

    def put_placement(self, placement: schemas.Placement) -> bool:
        check_placement(placement)
        unknown = [o for o in placement.offers or () if o not in self.snapshot.offers]
        if unknown:
            raise KeyError(unknown[0])
        created = self.store.put_placement(placement)
        self._rebuild()
        return created
