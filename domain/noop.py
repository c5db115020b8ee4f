"""The noop kind: benchmarks, smoke tests and fault injection."""

from __future__ import annotations

import os
import time

from domain import costs
from domain.contract import JobContext, Outcome
from domain.errors import InvalidJob, TransientError
from domain.specs import NoopSpec


def handle_noop(spec: NoopSpec, ctx: JobContext) -> Outcome:
    if spec.crash and ctx.attempt <= spec.crash_times:
        if not ctx.settings.allow_fault_injection:
            raise InvalidJob("crash: fault injection is disabled (FOUNDRY_ALLOW_FAULT_INJECTION)", field="crash")
        if spec.crash == "exit":
            os._exit(137)  # the worker dies mid-job, like an OOM kill
        if spec.crash == "transient":
            raise TransientError("injected transient fault")
        raise RuntimeError("injected fault")
    end = time.monotonic() + spec.sleep_s
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        ctx.check()
        ctx.progress(1 - (end - time.monotonic()) / spec.sleep_s if spec.sleep_s else 1.0)
    usage = costs.Usage(prompt_tokens=spec.cost_tokens, model_id="noop") if spec.cost_tokens else None
    return Outcome(result={"slept": spec.sleep_s}, usage=usage)
