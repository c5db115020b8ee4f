"""The ``retrain`` job: the tenant's new feedback becomes a LoRA adapter version, judged by the eval gate.

    champion / last version → new feedback? (none: "nothing to train") → data set (dedup, hash, split)
    → base model (resident) + LoRA (continued from the champion when it has the same name)
    → train with checkpoints (``domain.checkpoints``; resume from the last one on redelivery)
    → gate vs champion (or base): eval loss, token accuracy and review precision on held-out feedback → save the adapter under the data root → Outcome(commit = version row + aliases)

``handle_retrain`` reads as those stages: ``_setup`` / ``_train`` / the gate / publish / ``_committer``.

Watermarks: the job trains when at least ``min_feedback`` usable feedback items arrived after the newest
version of this adapter name (``feedback_until``). It trains on all feedback after the *champion's*
``feedback_until``, continuing from the champion, so feedback behind a rejected candidate is not lost.
A resumed attempt reuses the first attempt's window and parent (kept in the checkpoint's ``extra``).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from domain import adapter_lookup, checkpoints, costs
from domain.adapters import data as fbdata
from domain.adapters import distributed, gate, review_eval, store, training
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, new_id
from domain.specs import RetrainSpec

log = logging.getLogger(__name__)

_train_lock = threading.Lock()


@contextmanager
def _training_slot(ctx):
    """Hold the process's one training slot. The resident base model is wrapped with LoRA layers in place
    for the job and unwrapped after it, so two retrains in one process (a threads-pool worker consuming
    the retrain queue) must take turns; the waiting one keeps heartbeating and still honours a soft stop."""
    announced = False
    while not _train_lock.acquire(timeout=1.0):
        if not announced:
            ctx.progress(0.0, stage="waiting for this worker's training slot", force=True)
            announced = True
        ctx.check()
    try:
        yield
    finally:
        _train_lock.release()


def _parse_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _plan(spec: RetrainSpec, resume: dict | None) -> dict:
    """Read the ledger: parent (champion), watermarks and the data set for this job."""
    with session_scope() as s:
        champion = adapter_lookup.resolve_adapter(s, spec.tenant, None)
        if resume:
            parent = s.get(AdapterVersion, resume["parent_id"]) if resume.get("parent_id") else None
            since, until = _parse_ts(resume.get("since")), _parse_ts(resume.get("until"))
            new = None
        else:
            parent = champion if champion is not None and champion.name == spec.adapter_name else None
            last = store.latest_version(s, spec.tenant, spec.adapter_name)
            new = fbdata.count_new_feedback(s, spec.tenant, fbdata.aware(last.feedback_until) if last else None)
            since, until = (fbdata.aware(parent.feedback_until) if parent else None), None
        dataset = fbdata.collect(s, spec.tenant, since, until) if new is None or new >= spec.min_feedback else None
    return {"champion": champion, "parent": parent, "new_feedback": new, "since": since, "dataset": dataset}


def handle_retrain(spec: RetrainSpec, ctx):
    """The job handler (see the module docstring): setup → train → evaluate → publish → commit; returns a
    ``domain.contract.Outcome``."""
    from domain.contract import Outcome

    t0 = time.perf_counter()
    resume = checkpoints.latest(ctx)
    plan = _plan(spec, resume.extra if resume else None)
    if plan["dataset"] is None or not plan["dataset"].examples:
        found = plan["new_feedback"] if plan["new_feedback"] is not None else 0
        return Outcome(result={"status": "nothing to train", "new_feedback": found, "min_feedback": spec.min_feedback,
                               "message": f"{found} new usable feedback item(s) since the last version; "
                                          f"{spec.min_feedback} needed"})
    job = _setup(spec, ctx, plan, resume)

    ctx.progress(0.0, stage="load", force=True)
    with _training_slot(ctx):  # one training per process: PEFT wraps the resident base in place
        loaded = training.base_model(job.base_ref, ctx.settings.device, job.cfg.qlora)
        data = _Data.encode(job.dataset, loaded.tokenizer, job.cfg, spec.eval_fraction)
        model = training.setup_model(loaded.model, job.cfg, job.parent_dir)
        try:
            result, start, procs = _train(ctx, model, job, data.train_batches)
            ctx.progress(0.95, stage="eval", step=result.steps, loss=result.final_loss, force=True)
            measure = _quality_measure(spec, loaded, data.eval_ex)
            decision = gate.run_gate(model, data.eval_batches, job.champion_dir,
                                     job.champion.id if job.champion else None, spec.promotion_margin,
                                     measure.run if measure else None)
            version_id = new_id()
            files = store.save_adapter_files(model, store.adapter_rel_dir(spec.tenant, spec.adapter_name, ctx.job_id))
        finally:
            training.cleanup(model)

    metrics = _metrics(job, data, result, start, decision)
    hyper = {**job.cfg.hyperparams(), "train_tokens_per_epoch": sum(len(e.input_ids) for e in data.train_tok),
             "procs": procs}
    wall = time.perf_counter() - t0
    usage = costs.Usage(prompt_tokens=result.tokens, completion_tokens=0, wall_seconds=wall,
                        gpu_seconds=wall if loaded.device.type == "cuda" else 0.0,
                        model_id=job.base_ref, adapter_version_id=version_id)
    summary = {"status": "promoted" if decision.promote else "kept champion", "promoted": decision.promote,
               "version_id": version_id,
               "reason": decision.reason, "adapter_name": spec.adapter_name, "parent_id": job.meta["parent_id"],
               "dataset_hash": job.dataset.dataset_hash, "dataset_size": len(job.dataset.examples),
               "tokens_trained": result.tokens, "steps": result.steps, "resumed_from_step": start,
               "train_loss_final": result.final_loss, "eval_loss": decision.candidate["loss"],
               "reference_eval_loss": decision.baseline["loss"], "reference": decision.reference,
               "review_precision": _precisions(decision),
               "artifact_path": files.rel_path, "artifact_sha256": files.sha256}
    commit = _committer(spec, ctx, job, files, version_id, decision, metrics, hyper)
    return Outcome(result=summary, usage=usage, commit=commit)


# ---- the stages -----------------------------------------------------------------------------------

@dataclass
class _Setup:
    """What the job trains on and against, decided before the base model is loaded."""

    base_ref: str
    base_hash: str
    cfg: training.TrainConfig
    champion: AdapterVersion | None
    parent: AdapterVersion | None
    champion_dir: Path | None
    parent_dir: Path | None
    since: datetime | None
    dataset: fbdata.Dataset
    resume: checkpoints.Loaded | None

    @property
    def meta(self) -> dict:
        """Kept in every checkpoint: a resumed attempt reuses this window and parent."""
        return {"parent_id": self.parent.id if self.parent else None,
                "since": self.since.isoformat() if self.since else None,
                "until": self.dataset.feedback_until.isoformat() if self.dataset.feedback_until else None,
                "dataset_hash": self.dataset.dataset_hash}


def _setup(spec: RetrainSpec, ctx, plan: dict, resume: checkpoints.Loaded | None) -> _Setup:
    """Refuse what cannot be trained on (a champion on another base model, files that changed on disk) and
    drop a checkpoint of other feedback."""
    from domain.models import model_fingerprint

    dataset: fbdata.Dataset = plan["dataset"]
    if resume and resume.extra.get("dataset_hash") != dataset.dataset_hash:
        ctx.health("adapter", "checkpoint_stale", "degraded", "feedback changed since the checkpoint; training restarts")
        resume = None
    base_ref = spec.base_model or ctx.settings.base_model_ref()
    base_hash = model_fingerprint(base_ref)
    champion, parent = plan["champion"], plan["parent"]
    champion_dir = None
    if champion is not None:
        adapter_lookup.check_base_model(champion, base_ref)
        champion_dir = adapter_lookup.verified_adapter_path(champion)
    parent_dir = adapter_lookup.verified_adapter_path(parent) if parent is not None else None
    return _Setup(base_ref=base_ref, base_hash=base_hash, cfg=training.TrainConfig.from_spec(spec), champion=champion,
                  parent=parent, champion_dir=champion_dir, parent_dir=parent_dir, since=plan["since"],
                  dataset=dataset, resume=resume)


@dataclass
class _Data:
    train_ex: list
    eval_ex: list
    train_tok: list
    eval_tok: list
    train_batches: list[training.Batch]
    eval_batches: list[training.Batch]

    @classmethod
    def encode(cls, dataset: fbdata.Dataset, tok, cfg: training.TrainConfig, eval_fraction: float) -> _Data:
        train_ex, eval_ex = dataset.split(eval_fraction)
        train_tok = [fbdata.tokenize(tok, e, cfg.max_seq_len) for e in train_ex]
        eval_tok = [fbdata.tokenize(tok, e, cfg.max_seq_len) for e in eval_ex]
        batches = lambda exs: training.make_batches(exs, cfg.batch_size, cfg.max_seq_len, cfg.packing,
                                                    tok.pad_token_id)
        return cls(train_ex, eval_ex, train_tok, eval_tok, batches(train_tok), batches(eval_tok))


def _train(ctx, model, job: _Setup, batches: list[training.Batch]) -> tuple[training.TrainResult, int, int]:
    """Train from the start or from the job's checkpoint, on one process or ``procs`` (domain/adapters/distributed.py);
    returns the result, the step it started at and the number of processes."""
    optimizer, scheduler = training.make_optimizer(model, job.cfg)
    start, losses = 0, []
    if job.resume:
        start, losses = training.resume(job.resume, model, optimizer, scheduler)
        ctx.health("adapter", "resume", "ok", f"retrain resumed from step {start}", step=start)
    hooks = _JobHooks(ctx, model, optimizer, scheduler, job.cfg, job.meta, losses)
    procs, launch = distributed.launch_for(ctx.spec, ctx, job.base_ref, job.parent_dir, job.resume)
    result = distributed.run(model, batches, job.cfg, optimizer, scheduler, procs=procs, launch=launch,
                             start_step=start, losses=losses, hooks=hooks.as_hooks())
    return result, start, procs


def _quality_measure(spec: RetrainSpec, loaded, eval_ex: list) -> review_eval.QualityMeasure | None:
    """The gate's review-quality measure on this job's held-out feedback, with the tenant's suppressions."""
    from domain.feedback import suppressed_rules

    if spec.quality_reviews <= 0:
        return None
    tok_max = getattr(loaded.tokenizer, "model_max_length", None) or 0
    window = min(loaded.context_window, tok_max) if 0 < tok_max < 10**7 else loaded.context_window
    return review_eval.QualityMeasure.prepare(loaded.tokenizer, eval_ex, window, suppressed_rules(spec.tenant),
                                              spec.quality_reviews, min(spec.quality_max_new_tokens, window // 4))


def _precisions(decision) -> dict | None:
    q = decision.quality
    return {"candidate": q["candidate"]["precision"], "reference": q["reference"]["precision"]} if q else None


def _metrics(job: _Setup, data: _Data, result: training.TrainResult, start: int, decision) -> dict:
    return {"train_loss_first": result.losses[0] if result.losses else None, "train_loss_final": result.final_loss,
            "steps": result.steps, "resumed_from_step": start, "tokens_per_s": result.tokens_per_s,
            "attention_kernels": result.attention_kernels,
            "eval": decision.candidate, "reference_eval": decision.baseline, "reference": decision.reference,
            "gate": {"promote": decision.promote, "reason": decision.reason, "margin": decision.margin,
                     "relative_improvement": decision.relative_improvement, "quality": decision.quality},
            "train_examples": len(data.train_ex), "eval_examples": len(data.eval_ex),
            "eval_on_train": len(job.dataset.examples) < 2, "dataset_skipped": job.dataset.skipped,
            "prompt_truncated": sum(e.prompt_truncated for e in data.train_tok + data.eval_tok)}


def _committer(spec: RetrainSpec, ctx, job: _Setup, files, version_id: str, decision, metrics: dict, hyper: dict):
    """The Outcome's commit: the version row, the candidate alias, and the champion alias when the gate
    promotes and the champion it was judged against is still the champion."""
    champion, parent, dataset = job.champion, job.parent, job.dataset

    def commit(session) -> dict:
        version = store.register_version(
            session, tenant=spec.tenant, name=spec.adapter_name, base_model_id=job.base_ref, base_model_hash=job.base_hash,
            files=files, parent_id=parent.id if parent else None, dataset_hash=dataset.dataset_hash,
            dataset_size=len(dataset.examples), feedback_until=dataset.feedback_until, hyperparams=hyper,
            metrics=metrics, status="candidate", created_by_job_id=ctx.job_id, version_id=version_id,
            extra_parents=[(parent.id, "retrain", None)] if parent else [])
        who = f"job:{ctx.job_id}"
        store.move_alias(session, spec.tenant, store.CANDIDATE, version.id, who, decision.reason)
        now_champion = adapter_lookup.resolve_adapter(session, spec.tenant, None)
        moved = (now_champion.id if now_champion else None) != (champion.id if champion else None)
        if decision.promote and not moved:
            store.move_alias(session, spec.tenant, store.CHAMPION, version.id, who, decision.reason)
            return {"version_id": version.id, "version": version.version}
        version.status = "rejected"
        if decision.promote:  # judged against a champion that is no longer the champion
            why = "not promoted: the champion changed while this version was trained; retrain to compare again"
            version.metrics = {**version.metrics, "gate": {**version.metrics["gate"], "promote": False, "reason": why}}
            return {"version_id": version.id, "version": version.version, "promoted": False, "status": "kept champion",
                    "reason": why}
        return {"version_id": version.id, "version": version.version}

    return commit


# ---- checkpoints through the job context ------------------------------------------------------------

class _JobHooks:
    """The training loop's hooks for a job: progress to the ledger, checkpoints through ``checkpoints.save``
    (written, recorded, pruned), soft stop through ``ctx.stopping`` / ``ctx.check``."""

    def __init__(self, ctx, model, optimizer, scheduler, cfg: training.TrainConfig, meta: dict, losses: list[float]):
        self.ctx, self.model, self.optimizer, self.scheduler, self.cfg, self.meta = ctx, model, optimizer, scheduler, cfg, meta
        self.losses = list(losses)  # every step's loss so far, resumed steps included
        self.last_loss = float("nan")

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.losses.append(loss)
        self.last_loss = loss
        self.ctx.progress(0.9 * step / self.cfg.max_steps, stage="train", step=step, loss=loss,
                          tokens_per_s=round(tokens_per_s, 1))

    def checkpoint(self, step: int, reason: str) -> None:
        checkpoints.save(self.ctx, step, training.adapter_weights(self.model), optimizer=self.optimizer,
                         scheduler=self.scheduler, config=self.cfg.hyperparams(),
                         extra={**self.meta, "losses": self.losses}, metrics={**self.meta, "loss": self.last_loss},
                         reason=reason)

    def as_hooks(self) -> training.Hooks:
        return training.Hooks(progress=self.progress, checkpoint=self.checkpoint,
                              stopping=lambda: self.ctx.stopping, check=self.ctx.check)
