"""Runnable examples that live next to the gateway (``python -m examples.<name>``)."""
