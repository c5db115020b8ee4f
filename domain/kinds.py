"""The job kinds: one table, and every list about kinds derived from it.

Each kind names its spec (the message body, ``domain/specs.py``), its handler as ``"module:function"``
(imported on first use, so a review worker never imports training code), the Celery queue it is routed
to, its default time limit (``FOUNDRY_TIME_LIMITS`` overrides it), whether it writes checkpoints, which
worker flavour runs it, an optional failure hook ``"module:function"(ctx, error)`` called after a
failed job (the review circuit breaker), and for a kind that trains on several processes (its spec's
``procs``) the entry its helper ranks run (``domain/data_parallel.py``). Adding a kind: a spec, a handler
module, one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from domain.errors import InvalidJob
from domain.specs import (DistillSpec, IndexSpec, JobSpec, NoopSpec, QuantizeSpec, RetrainSpec, ReviewSpec,
                          validate_body)

CONTROL_QUEUE = "control"  # noop/benchmark jobs, beat's schedule ticks and sweeps


@dataclass(frozen=True)
class JobKind:
    name: str
    spec: type[JobSpec]
    handler: str  # "module:function" taking (spec, ctx) and returning an Outcome
    queue: str
    time_limit_s: float
    checkpoints: bool = False  # its checkpoints are removed once it succeeds (domain/checkpoints.py)
    gpu: bool = False  # runs on the GPU workers; else on the CPU ones
    ml: bool = False  # a worker of its queue imports the ML libraries before its first job
    solo: bool = False  # long: run one at a time by the "long" worker flavour (solo pool)
    on_failure: str | None = None  # "module:function"(ctx, error) after the job failed
    rank_entry: str | None = None  # "module:function"(args, data, rank, world, device): a helper rank's loop


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("review", ReviewSpec, "domain.review.service:handle_review", "review", 600, gpu=True, ml=True,
            on_failure="domain.circuit:on_review_failure"),
    JobKind("retrain", RetrainSpec, "domain.adapters.retrain:handle_retrain", "retrain", 4 * 3600, checkpoints=True,
            gpu=True, ml=True, solo=True, rank_entry="domain.adapters.distributed:rank_main"),
    JobKind("quantize", QuantizeSpec, "domain.quantization:handle_quantize", "quantize", 2 * 3600, gpu=True, ml=True,
            solo=True),
    JobKind("distill", DistillSpec, "domain.distillation:handle_distill", "distill", 4 * 3600, checkpoints=True,
            gpu=True, ml=True, solo=True, rank_entry="domain.distillation:rank_main"),
    JobKind("index", IndexSpec, "domain.retrieval.service:handle_index", "index", 3600, ml=True),
    JobKind("noop", NoopSpec, "domain.noop:handle_noop", CONTROL_QUEUE, 300),
)}

# ---- derived ------------------------------------------------------------------------------------
SPECS: dict[str, type[JobSpec]] = {k.name: k.spec for k in KINDS.values()}
HANDLERS: dict[str, str] = {k.name: k.handler for k in KINDS.values()}  # tests swap an entry
QUEUES: tuple[str, ...] = tuple(dict.fromkeys([*(k.queue for k in KINDS.values()), CONTROL_QUEUE]))
GPU_QUEUES: tuple[str, ...] = tuple(dict.fromkeys(k.queue for k in KINDS.values() if k.gpu))
CPU_QUEUES: tuple[str, ...] = tuple(q for q in QUEUES if q not in GPU_QUEUES)
LONG_QUEUES: tuple[str, ...] = tuple(dict.fromkeys(k.queue for k in KINDS.values() if k.solo))
ML_QUEUES: frozenset[str] = frozenset(k.queue for k in KINDS.values() if k.ml)
CHECKPOINTING_KINDS: frozenset[str] = frozenset(k.name for k in KINDS.values() if k.checkpoints)


def default_time_limits() -> dict[str, float]:
    return {k.name: k.time_limit_s for k in KINDS.values()}


def queue_for(kind: str) -> str:
    return KINDS[kind].queue if kind in KINDS else CONTROL_QUEUE


def parse_spec(kind: str, payload: Any) -> JobSpec:
    """Validate a message body of ``kind``. Raises InvalidJob naming the field at fault."""
    if kind not in KINDS:
        raise InvalidJob(f"kind: unknown job kind {kind!r}; known: {', '.join(KINDS)}", field="kind")
    return validate_body(KINDS[kind].spec, payload)


def json_schema(kind: str) -> dict:
    schema = KINDS[kind].spec.model_json_schema()
    schema["$id"] = f"https://foundry.dev/schemas/{kind}.json"
    schema["title"] = f"foundry.{kind} job"
    return schema
