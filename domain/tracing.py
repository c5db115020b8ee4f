"""Optional OpenTelemetry traces of a job: ``foundry.enqueue`` (producer) → ``foundry.job`` (worker) with
children ``foundry.claim``, ``foundry.handler`` (each progress report an event: the handler's stages) and
``foundry.finish``.

Off unless ``FOUNDRY_OTEL_ENABLED=1``; then spans go to an OTLP/HTTP collector configured the standard way
(``OTEL_EXPORTER_OTLP_ENDPOINT``, default http://localhost:4318; ``OTEL_EXPORTER_OTLP_HEADERS``...), with
service name ``FOUNDRY_OTEL_SERVICE_NAME``. The producer puts the W3C ``traceparent`` of its enqueue span
in the message headers, so the worker's job span continues the same trace. Needs the ``opentelemetry-sdk``
and ``opentelemetry-exporter-otlp-proto-http`` packages (the ``otel`` extra); while off, nothing of
OpenTelemetry is imported and each call costs one settings lookup.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

_lock = threading.Lock()
_tracer = None  # set by setup()


def enabled() -> bool:
    from domain.config import get_settings

    return _tracer is not None or get_settings().otel_enabled


def setup(exporter=None, service_name: str | None = None):
    """Install a tracer provider (once per process). ``exporter``: any SpanExporter (tests pass the SDK's
    InMemorySpanExporter, exported synchronously); default: OTLP over HTTP, batched."""
    global _tracer
    with _lock:
        if _tracer is not None and exporter is None:
            return _tracer
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from domain.config import get_settings

        name = service_name or get_settings().otel_service_name
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        _tracer = provider.get_tracer("foundry")
        return _tracer


def reset() -> None:
    """Forget the tracer (tests)."""
    global _tracer
    with _lock:
        _tracer = None


def _get():
    if _tracer is not None:
        return _tracer
    from domain.config import get_settings

    return setup() if get_settings().otel_enabled else None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span (child of the current one), or nothing when tracing is off. Yields the span or None."""
    tracer = _get()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=_attrs(attributes)) as s:
        yield s


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (a handler stage, a progress report); nothing when tracing is off."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, _attrs(attributes))


def headers() -> dict:
    """The current trace context as message headers (``traceparent``); empty when tracing is off."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    carrier: dict = {}
    inject(carrier)
    return carrier


@contextlib.contextmanager
def continued(carrier: dict | None) -> Iterator[None]:
    """Run the block inside the trace context the producer sent (``traceparent`` in ``carrier``)."""
    if _get() is None or not carrier or "traceparent" not in carrier:
        yield
        return
    from opentelemetry import context
    from opentelemetry.propagate import extract

    token = context.attach(extract({k: carrier[k] for k in ("traceparent", "tracestate") if carrier.get(k)}))
    try:
        yield
    finally:
        context.detach(token)


def _attrs(attributes: dict) -> dict:
    """OpenTelemetry takes str/bool/int/float attributes: others are shown as text, None is left out."""
    return {k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in attributes.items() if v is not None}
