"""The ``review`` job handler: code in, a structured review out, its cost counted once.

    check input → tenant (budgets, serving model) → adapter (requested or champion, or the base model;
    domain.adapter_lookup resolves it, checks its base model and its files' sha256)
    → resident runtime → retrieved context (if an index exists) → prompt fitted to the context window
    → budget check with the job's worst case → one row of a shared generation batch → parse
    → Outcome(result, usage, commit=add the Review row)

The Review row is written by ``commit`` inside the transaction that marks the job succeeded, and the
usage is written by the job runner with a unique job id: a redelivered message can duplicate neither.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time

from sqlalchemy.orm import Session

from domain import budgets
from domain.adapter_lookup import check_base_model, resolve_adapter, verified_adapter_path
from domain.costs import Usage
from domain.errors import InvalidJob, JobFailed, JobTimeout
from domain.contract import JobContext, Outcome
from domain.feedback import suppressed_rules
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Artifact, Review, Tenant, new_id
from domain.models import ModelLoadError
from domain.review.batcher import AdapterHandle, GenerationRequest
from domain.review.decoding import DecodeControl, review_stop
from domain.review.grounded import analysis_note, analysis_stage, merge_review, output_budget, withhold_suppressed
from domain.review.findings import headline
from domain.review.parse import parse_review
from domain.prompting import fit_prompt, guess_language, shared_prefix_len
from domain.review.runtime import Runtime, get_runtime
from domain.specs import ReviewSpec

log = logging.getLogger(__name__)

RETRIEVAL_K = 4
_CONTROL = {chr(c) for c in range(32)} - {"\t", "\n", "\r", "\f", "\v"}


def check_input(spec: ReviewSpec, max_bytes: int) -> None:
    """Refuse oversized or binary input (empty and NUL-containing code are refused by ReviewSpec)."""
    size = len(spec.code.encode("utf-8"))
    if size > max_bytes:
        raise InvalidJob(f"code: input is {size} bytes, larger than the limit of {max_bytes} bytes "
                         f"(FOUNDRY_MAX_REVIEW_BYTES); split the file or the diff", field="code", code="too_large")
    sample = spec.code[:20_000]
    if sum(ch in _CONTROL for ch in sample) > 0.05 * len(sample):
        raise InvalidJob("code: looks like binary content (many control characters); only text can be reviewed",
                         field="code")


# ---- retrieval: no index is a valid case ---------------------------

def retrieve(spec: ReviewSpec, ctx) -> tuple[list, int | None, str | None]:
    """(chunks, index version, error) — an error never fails the review, it is recorded."""
    if not spec.use_retrieval:
        return [], None, None
    from domain.retrieval.service import retrieve_context  # faiss and the embedder load with the first retrieval
    query = (f"{spec.path}\n" if spec.path else "") + spec.code[:4000]
    try:
        found = retrieve_context(spec.tenant, query, k=RETRIEVAL_K)
    except Exception as exc:  # noqa: BLE001 - a broken index degrades the review, it does not fail it
        log.warning("review %s: retrieval failed: %s", ctx.job_id, exc)
        ctx.health("index", "retrieval_failed", "degraded", f"{type(exc).__name__}: {exc}")
        return [], None, f"{type(exc).__name__}: {exc}"
    return list(found.chunks or []), found.index_version, None


def _chunk_record(chunk) -> dict:
    get = (lambda k: chunk.get(k)) if isinstance(chunk, dict) else (lambda k: getattr(chunk, k, None))
    score = get("score")
    return {"id": get("id"), "score": round(float(score), 6) if score is not None else None,
            "path": get("path"), "source": get("source")}


# ---- the handler -----------------------------------------------------------------------------------

def served_base_ref(settings, artifact: Artifact | None) -> str:
    """The base model an adapter must have been trained on to run on what this tenant is served: the
    deployment's base, or a quantized artifact's source model. A distilled model is its own base."""
    if artifact is None:
        return settings.base_model_ref()
    if artifact.kind == "quantized_model" and (artifact.lineage or {}).get("source_model"):
        return artifact.lineage["source_model"]
    from domain.paths import resolve_in_data_root

    return str(resolve_in_data_root(artifact.path))


def serving(spec: ReviewSpec, settings) -> tuple[Runtime, AdapterVersion | None]:
    """The resident runtime for what this tenant is served (base model or serving artifact) and the adapter
    version the review asks for (its champion by default; None: the bare base), checked to fit that base."""
    with session_scope() as s:
        tenant = s.get(Tenant, spec.tenant)
        artifact = s.get(Artifact, tenant.serving_artifact_id) if tenant and tenant.serving_artifact_id else None
        version = resolve_adapter(s, spec.tenant, spec.adapter)  # unknown → InvalidJob(field="adapter")
    try:
        rt = get_runtime(settings, artifact)
    except ModelLoadError as exc:
        raise JobFailed(f"review model cannot be loaded: {exc}", code="model_load") from exc
    if version is not None:
        check_base_model(version, served_base_ref(settings, artifact))
    return rt, version


def handle_review(spec: ReviewSpec, ctx: JobContext) -> Outcome:
    t0 = time.perf_counter()
    settings = ctx.settings
    check_input(spec, settings.max_review_bytes)
    budgets.check_budget(spec.tenant, prices=settings.prices())  # already over: no model work at all

    rt, version = serving(spec, settings)
    chunks, index_version, retrieval_error = retrieve(spec, ctx)
    language = spec.language or guess_language(spec.path, spec.is_diff)
    suppressed = suppressed_rules(spec.tenant)
    analysis = withhold_suppressed(analysis_stage(spec.code, spec.path, language, spec.is_diff), suppressed)
    note = analysis_note(analysis, language)
    max_new = output_budget(spec.code, analysis, spec.max_new_tokens, rt.context_window)
    with rt.tokenizer_lock:
        fitted = fit_prompt(rt.tokenizer, spec.code, spec.path, language, spec.is_diff, chunks,
                            context_window=rt.context_window, max_new_tokens=max_new,
                            analysis=analysis.findings, analysis_note=note)
        prefix_len = shared_prefix_len(rt.tokenizer, fitted.input_ids)
    worst_case = Usage(prompt_tokens=len(fitted.input_ids), completion_tokens=max_new, model_id=rt.model_id)
    budgets.check_budget(spec.tenant, worst_case, settings.prices())

    handle = _adapter_handle(version, ctx) if version is not None else None
    control = DecodeControl(stop=review_stop(rt.decode))  # ends with the findings list, no repeated lines
    gen = _generate(rt, GenerationRequest(fitted.input_ids, max_new, handle, prefix_len, control=control), ctx)
    parsed = parse_review(gen.text, n_lines=len(spec.code.splitlines()))
    parsed.findings = merge_review(parsed.findings, analysis, spec.code, path=spec.path, language=language,
                                   is_diff=spec.is_diff, raw_text=gen.text, suppressed=suppressed)
    parsed.summary = f"{headline(parsed.findings)} {parsed.summary}".strip()  # the model's prose follows
    if note:
        parsed.summary = f"{parsed.summary} [{note}]".strip()

    review_id = new_id()
    adapter_id = version.id if version is not None else None
    used_chunks = [_chunk_record(c) for c in fitted.chunks]
    review = dict(id=review_id, job_id=ctx.job_id, tenant_id=spec.tenant, adapter_version_id=adapter_id,
                  model_id=rt.model_id, serving_artifact_id=rt.serving_artifact_id, language=language,
                  path=spec.path, code=spec.code, code_sha256=hashlib.sha256(spec.code.encode()).hexdigest(),
                  prompt_truncated=fitted.truncated, truncation=fitted.truncation, summary=parsed.summary,
                  findings=parsed.findings, raw_text=gen.text, context_chunks=used_chunks, index_version=index_version,
                  analysis=analysis.record())

    def commit(session: Session) -> dict:
        session.add(Review(**review))
        return {"review_id": review_id}

    usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                  wall_seconds=time.perf_counter() - t0, gpu_seconds=gen.gpu_seconds, model_id=rt.model_id,
                  adapter_version_id=adapter_id)
    result = {"review_id": review_id, "summary": parsed.summary, "findings": parsed.findings, "raw_text": gen.text,
              "adapter_version_id": adapter_id, "adapter": f"{version.name} v{version.version}" if version else None,
              "model_id": rt.model_id, "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
              "prompt_truncated": fitted.truncated, "context_chunks": [c["id"] for c in used_chunks],
              "index_version": index_version, "batch_size": gen.batch_size, "analysis": analysis.record()}
    if retrieval_error:
        result["retrieval_error"] = retrieval_error
    return Outcome(result=result, usage=usage, commit=commit)


def _adapter_handle(version: AdapterVersion, ctx) -> AdapterHandle:
    def locate():  # called by the batcher only when the adapter is not resident
        try:
            return verified_adapter_path(version)  # sha256-checked; a mismatch records its own health event
        except JobFailed as exc:
            if exc.code != "adapter_hash_mismatch":
                ctx.health("adapter", "load_failed", "fail", f"adapter version {version.id}: {exc}",
                           adapter_version_id=version.id)
            raise

    return AdapterHandle(version.id, locate)


def _generate(rt: Runtime, request: GenerationRequest, ctx):
    future = rt.batcher.submit(request)
    try:
        return future.result(timeout=max(0.1, ctx.deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise JobTimeout(f"review exceeded its time limit of {ctx.settings.time_limits.get('review')} s "
                         f"waiting for generation") from None
