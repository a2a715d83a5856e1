"""HTTP API: thin ASGI handlers that parse, call a service, encode."""
