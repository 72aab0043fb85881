"""Service discovery: one module per backend, each a stream of whole snapshots."""
