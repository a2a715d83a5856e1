"""Catalog sync: page a platform's products into Kassa's offer catalog, resumably.

Owns ``sync_catalog`` and the sync cursor file. Each page from ``Connector.iter_products`` becomes
``product`` offers (the product's price, category and stock, with ``price`` and ``category_root`` as offer
features for the learner) written in ONE transaction per page (``CatalogStore.put_many``); only after that
commit is the page's resume cursor written (atomically) to ``<data_dir>/integrations/<platform>.cursor.json``.
A sync killed at any point therefore resumes at the first page whose cursor was not saved: at most one page
is fetched twice, and an upsert by offer id means no product ever lands twice. A finished run leaves the
platform's incremental cursor (updated-since) so the next run only fetches what changed.

Rate limits are the connector's ``HttpClient``'s business (429 ``Retry-After``, Shopify's cost bucket); the
time spent waiting is reported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kassa import schemas
from kassa.catalog.store import CatalogStore
from kassa.integrations.base import Connector, Product


@dataclass
class SyncReport:
    platform: str
    products: int = 0  # offers written by this run
    pages: int = 0
    skipped: int = 0  # platform products that could not be parsed (see `skipped_examples`)
    skipped_examples: list[str] = field(default_factory=list)
    waited_seconds: float = 0.0  # time spent honouring rate limits
    seconds: float = 0.0
    resumed: bool = False  # this run continued an interrupted one...
    previously_written: int = 0  # ...which had written this many products
    complete: bool = False
    cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SyncCursor:
    """The resume point of one platform's sync, in a small JSON file replaced atomically."""

    def __init__(self, data_dir: Path, platform: str) -> None:
        self.path = Path(data_dir) / "integrations" / f"{platform}.cursor.json"

    def load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # a torn file cannot happen (atomic replace); an edited one restarts the sync
        return state if isinstance(state, dict) else {}

    def save(self, cursor: str | None, complete: bool, products: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"cursor": cursor, "complete": complete, "products": products, "saved_at": time.time()})
        with open(tmp, "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def product_offer(product: Product, prefix: str = "") -> schemas.Offer:
    offer = product.to_offer(f"{prefix}{product.sku}" if prefix else None)
    if product.category_path:
        offer.features["category_root"] = product.category_path[0][:64]
    return offer


def sync_catalog(
    connector: Connector,
    store: CatalogStore,
    data_dir: Path,
    *,
    reset: bool = False,
    offer_id_prefix: str = "",
    on_page: Callable[[SyncReport, int | None], None] | None = None,
    max_pages: int | None = None,
) -> SyncReport:
    """Sync products into ``store``; ``on_page(report, total_hint)`` after each committed page.

    ``max_pages`` stops early (the cursor is kept, as after a kill): used by tests and the benchmark.
    """
    started = time.perf_counter()
    cursor_file = SyncCursor(data_dir, connector.platform)
    if reset:
        cursor_file.reset()
    state = cursor_file.load()
    cursor = state.get("cursor")
    report = SyncReport(connector.platform, resumed=bool(cursor) and not state.get("complete", False))
    written_before = report.previously_written = int(state.get("products", 0)) if report.resumed else 0
    skipped_before = len(getattr(connector, "skipped", []))
    waited_before = _waited(connector)
    count: Callable[[str | None], int | None] | None = getattr(connector, "count_products", None)
    # The progress bar's total (connector.total_hint) is asked once the first page is in: asked first, a host
    # that cannot be reached had the hint's request retried to the end (and shrugged off: only a hint) before
    # the page's was, twice the wait (31 s) for the same refusal.
    hint, start = count if on_page is not None and callable(count) else None, cursor
    complete = False
    for products, next_cursor in connector.iter_products(cursor):
        if hint is not None:
            hint(start)  # sets connector.total_hint for the progress bar
            hint = None
        if products:
            store.put_many([product_offer(p, offer_id_prefix) for p in products], [])
        report.products += len(products)
        report.pages += 1
        cursor = next_cursor
        complete = _is_final(next_cursor, connector)
        cursor_file.save(cursor, complete, written_before + report.products)
        report.waited_seconds = round(_waited(connector) - waited_before, 3)
        if on_page is not None:
            on_page(report, getattr(connector, "total_hint", None))
        if max_pages is not None and report.pages >= max_pages and not complete:
            break
    else:
        complete = True
        cursor_file.save(cursor, True, written_before + report.products)
    skipped = list(getattr(connector, "skipped", []))[skipped_before:]
    report.skipped, report.skipped_examples = len(skipped), skipped[:5]
    report.waited_seconds = round(_waited(connector) - waited_before, 3)
    report.complete = complete
    report.cursor = cursor
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _is_final(cursor: str | None, connector: Connector) -> bool:
    # The generator is only known to be done when it stops; a connector may say so earlier through its
    # cursor shape (an updated-since cursor with no in-run position), which keeps the saved state honest
    # if the process dies right after the last page.
    if cursor is None:
        return True
    try:
        state = json.loads(cursor)
    except ValueError:
        return False
    return isinstance(state, dict) and set(state) <= {"since"}


def _waited(connector: Connector) -> float:
    """Seconds the connector has spent waiting on rate limits (``HttpConnector.waited_seconds``; 0 if untracked)."""
    return float(getattr(connector, "waited_seconds", 0.0))
