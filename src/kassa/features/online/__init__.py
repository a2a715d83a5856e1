"""Online feature stores: one protocol, an in-process backend (embedded) and later Redis."""

from kassa.features.online.memory import InMemoryOnlineStore, OnlineStore

__all__ = ["InMemoryOnlineStore", "OnlineStore"]
