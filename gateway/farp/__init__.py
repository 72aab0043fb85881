"""FARP: manifests published by services, turned into routes (see shared FARP.md)."""
