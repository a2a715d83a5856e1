"""What serves a model: the `ServingModel` interface and its one loader, the `.lin` sidecar format, VW's feature
hashing, the numpy scorer, the VW fallback, and the in-memory store of what each placement serves now."""
