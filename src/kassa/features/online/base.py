"""The online-store protocol every backend implements (embedded memory, Redis).

A *row* is everything stored for one entity key (``("customer", "c-123")``): for each feature view, the
event time of its newest values and the values themselves. A decision reads all the rows it needs with
one `read` call (one round trip on a remote store). Values are validated against the view's fields
before they are written (`features.definitions.check_value`); backends store them compactly in field
order and return them as ``{field: value}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from kassa.features.definitions import FeatureView

EntityKey = tuple[str, str]  # (entity name, key), e.g. ("customer", "c-123")


class ViewValues(NamedTuple):
    ts: float  # event time of the newest values (unix seconds)
    values: dict[str, Any]


Row = dict[str, ViewValues]  # view name -> its values


class WriteItem(NamedTuple):
    key: str
    values: dict[str, Any]
    ts: float


class OnlineStore(Protocol):
    async def read(self, keys: Sequence[EntityKey], views: Sequence[FeatureView] | None = None) -> list[Row | None]:
        """Rows for ``keys`` in order (None when missing); only ``views`` when given. One round trip."""
        ...

    async def write(self, view: FeatureView, key: str, values: dict[str, Any], ts: float) -> None:
        """Replace ``view``'s values for one entity key (values newer than what is stored win)."""
        ...

    async def write_many(self, view: FeatureView, items: Iterable[WriteItem]) -> int:
        """Bulk write (materialization); returns rows written. Pipelined on remote stores."""
        ...

    async def delete(self, entity: str, key: str) -> None: ...

    async def close(self) -> None: ...
