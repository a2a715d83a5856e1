"""Decision engine: pure, no I/O of its own."""
