"""Online feature stores: one protocol (`base.OnlineStore`), the embedded in-process backend and Redis."""

from kassa.features.online.base import OnlineStore, Row, ViewValues, WriteItem
from kassa.features.online.memory import InMemoryOnlineStore

__all__ = ["InMemoryOnlineStore", "OnlineStore", "Row", "ViewValues", "WriteItem"]
