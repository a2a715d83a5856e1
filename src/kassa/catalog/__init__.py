"""Offers and placements: the durable store and the in-memory snapshot the hot path reads."""

from kassa.catalog.snapshot import CatalogSnapshot, PlacementView
from kassa.catalog.store import Catalog, CatalogStore, SqlCatalogStore

__all__ = ["Catalog", "CatalogSnapshot", "CatalogStore", "PlacementView", "SqlCatalogStore"]
