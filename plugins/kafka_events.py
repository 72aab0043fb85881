"""``kafka-events``: one JSON event per request, produced to a Kafka topic in batches.

Requests only queue their event (:mod:`plugins.events`); a background task hands
batches to an ``aiokafka`` producer, so a slow or dead broker costs requests nothing:
the bounded queue drops and counts instead. Each record's value is the event as
compact UTF-8 JSON; its key is the request id by default (even spread over
partitions), or the route template (``key: route``: one route's events stay ordered in
one partition), or none (``key: none``).

``aiokafka`` is an optional dependency (``pip install 'octopus-gateway[kafka]'``). It
is imported only when the plugin is configured, and a missing package is a clear
configuration error rather than an import failure of the gateway.

Security is kept minimal: ``ssl: true`` (system CAs) or ``ssl: {cafile, certfile,
keyfile}``, and ``sasl: {mechanism, username, password}`` with PLAIN or SCRAM; the
security protocol (SSL, SASL_PLAINTEXT, SASL_SSL) follows from which are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from plugins.api import PluginMetadata
from plugins.events import Event, EventSinkConfig, EventSinkPlugin, EventTransport

INSTALL_HINT = "pip install 'octopus-gateway[kafka]'"


class MissingDependencyError(RuntimeError):
    """The plugin is configured but its optional client library is not installed."""


def import_aiokafka() -> Any:
    """``aiokafka``, imported on first use so the gateway runs without it."""
    try:
        import aiokafka
        import aiokafka.helpers
    except ImportError as exc:
        raise MissingDependencyError(
            f"plugin kafka-events needs the aiokafka package ({exc}); install it with "
            f"{INSTALL_HINT}"
        ) from None
    return aiokafka


class KafkaSasl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str
    password: str


class KafkaSsl(BaseModel):
    """TLS to the brokers; without ``cafile`` the system CAs are trusted."""

    model_config = ConfigDict(extra="forbid")

    cafile: str | None = None
    #: Client certificate and key, for brokers that require mutual TLS.
    certfile: str | None = None
    keyfile: str | None = None


class KafkaEventsConfig(EventSinkConfig):
    #: ``host:port`` or a list of them (comma-separated works too).
    bootstrap_servers: str | list[str]
    topic: str = Field(min_length=1)
    client_id: str = "octopus"
    #: Record key: ``request_id``, ``route`` (the route template) or ``none``.
    key: Literal["request_id", "route", "none"] = "request_id"
    #: Broker acknowledgements: 0 (none), 1 (leader), ``all`` (in-sync replicas).
    acks: Literal[0, 1, "all"] = 1
    sasl: KafkaSasl | None = None
    ssl: KafkaSsl | bool = False


def encode_record(event: Event, key: str = "request_id") -> tuple[bytes | None, bytes]:
    """The ``(key, value)`` of one event's Kafka record."""
    value = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    if key == "none":
        return None, value
    field = "route" if key == "route" else "request_id"
    return str(event.get(field) or "").encode(), value


def producer_options(config: KafkaEventsConfig) -> dict[str, Any]:
    """Keyword arguments of ``AIOKafkaProducer`` for ``config`` (builds the TLS context)."""
    servers = config.bootstrap_servers
    if isinstance(servers, str):
        servers = [part.strip() for part in servers.split(",") if part.strip()]
    options: dict[str, Any] = {
        "bootstrap_servers": servers,
        "client_id": config.client_id,
        "acks": config.acks,
        # Batches are already formed by the queue; a short linger merges the records of
        # one batch into few produce requests without adding visible delay.
        "linger_ms": 5,
        "request_timeout_ms": max(int(config.send_timeout * 1000), 1000),
    }
    use_ssl = config.ssl is not False
    if use_ssl:
        helpers = import_aiokafka().helpers
        files = config.ssl if isinstance(config.ssl, KafkaSsl) else KafkaSsl()
        options["ssl_context"] = helpers.create_ssl_context(
            cafile=files.cafile, certfile=files.certfile, keyfile=files.keyfile
        )
    if config.sasl is not None:
        options["security_protocol"] = "SASL_SSL" if use_ssl else "SASL_PLAINTEXT"
        options["sasl_mechanism"] = config.sasl.mechanism
        options["sasl_plain_username"] = config.sasl.username
        options["sasl_plain_password"] = config.sasl.password
    else:
        options["security_protocol"] = "SSL" if use_ssl else "PLAINTEXT"
    return options


class AiokafkaTransport:
    """Batches to Kafka through one ``AIOKafkaProducer`` (rebuilt after a failed start)."""

    def __init__(self, config: KafkaEventsConfig) -> None:
        self.config = config
        self.options: dict[str, Any] = {}
        self.producer: Any = None

    def _new_producer(self) -> Any:
        return import_aiokafka().AIOKafkaProducer(**self.options)

    async def prepare(self) -> None:
        """Build the producer now (no I/O) so bad TLS files or options fail startup."""
        self.options = producer_options(self.config)
        self.producer = self._new_producer()

    async def open(self) -> None:
        if self.producer is None:
            self.producer = self._new_producer()
        try:
            await self.producer.start()
        except BaseException:
            # A producer whose start failed is not reusable: close it, build anew next time.
            failed, self.producer = self.producer, None
            with contextlib.suppress(Exception):
                await failed.stop()
            raise

    async def send_batch(self, events: list[Event]) -> None:
        producer = self.producer
        topic, key = self.config.topic, self.config.key
        pending = []
        for event in events:
            record_key, value = encode_record(event, key)
            pending.append(await producer.send(topic, value=value, key=record_key))
        await asyncio.gather(*pending)

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            await producer.stop()


class KafkaEventsPlugin(EventSinkPlugin):
    """Request events to Kafka, batched through the shared non-blocking queue."""

    metadata = PluginMetadata(
        name="kafka-events",
        version="1.0.0",
        description="Publishes one JSON event per request to a Kafka topic.",
    )
    Config: ClassVar[type[BaseModel]] = KafkaEventsConfig
    config: KafkaEventsConfig

    def configure(self, config: BaseModel) -> None:
        # Fail at configuration time (``octopus check``, startup), not at the first event.
        import_aiokafka()
        super().configure(config)

    def make_transport(self) -> EventTransport:
        return AiokafkaTransport(self.config)


PLUGIN = KafkaEventsPlugin
