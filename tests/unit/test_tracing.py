"""OpenTelemetry spans (FOUNDRY_OTEL_ENABLED): one trace from the producer's enqueue through the worker's
claim, handler (its progress reports as events) and finish, exported to the SDK's in-memory exporter."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra (opentelemetry-sdk) is not installed")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from domain import jobs, tracing  # noqa: E402
from domain.config import reset_settings  # noqa: E402
from tests.conftest import add_tenant  # noqa: E402


@pytest.fixture
def spans(sqlite_ledger, monkeypatch):
    add_tenant(sqlite_ledger, "acme")
    monkeypatch.setenv("FOUNDRY_OTEL_ENABLED", "1")
    reset_settings()
    exporter = InMemorySpanExporter()
    tracing.setup(exporter=exporter, service_name="foundry-test")
    yield exporter
    tracing.reset()


def _by_name(exporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_off_by_default_nothing_is_traced(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    tracing.reset()
    assert not tracing.enabled() and tracing.headers() == {}
    with tracing.span("foundry.enqueue") as s:
        assert s is None


def test_enqueue_claim_handler_finish_form_one_trace(spans, tmp_path):
    """The client sends the enqueue span's traceparent in the message headers (embedded broker: the message
    file); the task, run from those headers, continues the trace."""
    from worker import tasks
    from worker.client import enqueue

    job_id = enqueue("noop", {"tenant": "acme", "sleep_s": 0.01})
    [message] = [json.loads(p.read_text()) for p in (tmp_path / "broker" / "queue").glob("*.msg")]
    assert message["headers"]["traceparent"].startswith("00-")
    backend = tasks.app.conf.result_backend  # a worker's start-up makes its result folder; this runs in process
    if backend.startswith("file://"):
        Path(backend.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    result = tasks.JOB_TASKS["noop"].apply(args=[message_body(message)], task_id=job_id,
                              headers={"traceparent": message["headers"]["traceparent"]}).get()
    assert result["status"] == "succeeded"

    got = _by_name(spans)
    assert {"foundry.enqueue", "foundry.job", "foundry.claim", "foundry.handler", "foundry.finish"} <= set(got)
    trace_ids = {s.context.trace_id for s in got.values()}
    assert len(trace_ids) == 1
    job = got["foundry.job"]
    assert job.parent.span_id == got["foundry.enqueue"].context.span_id
    assert job.attributes["job_id"] == job_id and job.attributes["kind"] == "noop"
    for child in ("foundry.claim", "foundry.handler", "foundry.finish"):
        assert got[child].parent.span_id == job.context.span_id, child
    assert got["foundry.claim"].end_time <= got["foundry.handler"].start_time <= got["foundry.finish"].start_time
    assert job.resource.attributes["service.name"] == "foundry-test"


def message_body(message: dict) -> dict:
    import base64

    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return args[0]


def test_progress_reports_are_events_of_the_handler_span(spans):
    from domain.contract import JobContext

    with tracing.span("foundry.handler"):
        ctx = JobContext(job_id=uuid.uuid4().hex, kind="noop", spec=jobs.parse_spec("noop", {"tenant": "acme"}),
                         attempt=1, worker="w", settings=jobs.get_settings(), deadline=1e18)
        ctx.progress(0.5, force=True, stage="generate", tokens=12)
    [handler] = spans.get_finished_spans()
    [ev] = handler.events
    assert ev.name == "progress" and ev.attributes["stage"] == "generate" and ev.attributes["fraction"] == 0.5
