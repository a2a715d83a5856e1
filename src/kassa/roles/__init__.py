"""Process roles: the `kassa serve` worker supervisor and the `kassa learn` process (ADR 0009)."""
