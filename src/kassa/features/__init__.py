"""Features: request-time features, the online store and the profiles built from the order stream."""
