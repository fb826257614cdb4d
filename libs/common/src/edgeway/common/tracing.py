"""OpenTelemetry tracing.

Exporting is opt-in: OTLP/HTTP to a collector, or one JSON span per line to a file (what tests
read to follow one message across processes). With an exporter, FastStream's telemetry
middleware (installed by `edgeway.common.broker`) records a span per publish and per delivery
and carries the W3C `traceparent` in AMQP headers. Without one, nothing is recorded (the sampler
drops every span, so instrumented code costs next to nothing) and the envelope passes an
incoming `traceparent` on unchanged.
"""

from __future__ import annotations

from typing import IO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from edgeway.common.settings import CommonSettings


def _one_line(span: ReadableSpan) -> str:
    line: str = span.to_json(indent=None)
    return line + "\n"


def configure_tracing(settings: CommonSettings, *, service: str) -> TracerProvider:
    """Install this process's tracer provider, with the configured exporter if any."""
    resource = Resource.create({"service.name": f"edgeway-{service}"})
    if settings.otel_exporter == "none":
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    else:
        provider = TracerProvider(resource=resource)
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(settings.otel_endpoint)))
    elif settings.otel_exporter == "jsonl":
        if settings.otel_file is None:
            raise ValueError("EDGEWAY_OTEL_FILE is required with EDGEWAY_OTEL_EXPORTER=jsonl")
        settings.otel_file.parent.mkdir(parents=True, exist_ok=True)
        out: IO[str] = settings.otel_file.open("a", buffering=1, encoding="utf-8")
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=_one_line))
        )
    trace.set_tracer_provider(provider)
    return provider
