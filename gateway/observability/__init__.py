"""Metrics (``metrics``), structured logs (``logging``) and OpenTelemetry traces
(``tracing``, imported only when ``observability.tracing.enabled``)."""
