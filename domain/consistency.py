"""Ledger consistency checker: the invariants every fault (killed workers, outages, redeliveries) must keep.

``check(url)`` reads the ledger and returns a ``Report`` listing every broken invariant:

- a succeeded job has exactly one succeeded attempt; a job that did not succeed has none;
- usage (cost) rows: at most one per job, only for succeeded jobs, with the job's tenant;
- ``jobs.attempts`` equals its attempt rows (the dead-letter marker row excepted), numbered 1..n;
- a finished job has no attempt still open; a running job has exactly one;
- reviews, adapter versions and artifacts were made by succeeded jobs; checkpoints belong to a job;
- aliases point at existing versions of the same tenant; feedback points at a review of its tenant;
- files of live artifacts and aliased adapter versions exist under the data root and match their sha256.

Errors break an invariant (``foundry ledger check`` exits 1); warnings need a look but can be transient
(a running job whose heartbeat is stale is normal for a few seconds after a worker dies).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import (
    FINAL_STATUSES, AdapterAlias, AdapterVersion, Artifact, Checkpoint, Feedback, Job, JobAttempt, Review, UsageCost, aware,
)
from domain.paths import UnsafePath, resolve_in_data_root, sha256_file, sha256_tree

LIVE_ARTIFACT_STATUSES = ("ready", "active")  # superseded snapshots may be pruned from disk


@dataclass
class Issue:
    check: str
    severity: str  # error | warning
    message: str
    ids: list[str] = field(default_factory=list)


@dataclass
class Report:
    issues: list[Issue] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    checked_at: str = ""

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked_at": self.checked_at, "counts": self.counts,
                "errors": len(self.errors), "warnings": len(self.warnings), "issues": [asdict(i) for i in self.issues]}

    def add(self, check: str, message: str, ids=(), severity: str = "error") -> None:
        self.issues.append(Issue(check, severity, message, [str(i) for i in ids][:50]))



def check(url: str | None = None, *, stale_after_s: float | None = None, check_files: bool = True,
          tenant: str | None = None) -> Report:
    """Check the whole ledger (or one tenant's rows). Never writes."""
    if stale_after_s is None:
        from domain.config import get_settings

        stale_after_s = get_settings().stale_after_s
    now = datetime.now(timezone.utc)
    report = Report(checked_at=now.isoformat())
    with session_scope(url) as s:
        jobs_q = select(Job.id, Job.status, Job.attempts, Job.tenant_id, Job.heartbeat_at)
        if tenant:
            jobs_q = jobs_q.where(Job.tenant_id == tenant)
        jobs = {r.id: r for r in s.execute(jobs_q)}
        attempts: dict[str, list] = defaultdict(list)
        for a in s.execute(select(JobAttempt.job_id, JobAttempt.attempt, JobAttempt.outcome)):
            if a.job_id in jobs:
                attempts[a.job_id].append(a)
        _check_attempts(report, jobs, attempts, now, stale_after_s)
        _check_usage(report, s, jobs, tenant)
        _check_made_by_succeeded_jobs(report, s, jobs, tenant)
        _check_aliases_and_feedback(report, s, tenant)
        if check_files:
            _check_files(report, s, tenant)
        report.counts = {"jobs": len(jobs), "by_status": dict(Counter(j.status for j in jobs.values())),
                         "attempts": sum(len(v) for v in attempts.values())}
    return report


def _check_attempts(report: Report, jobs: dict, attempts: dict, now: datetime, stale_after_s: float) -> None:
    problems: dict[str, list[str]] = defaultdict(list)
    stale = []
    for jid, job in jobs.items():
        rows = attempts.get(jid, [])
        succeeded = sum(1 for a in rows if a.outcome == "succeeded")
        if job.status == "succeeded" and succeeded != 1:
            problems["succeeded_once"].append(jid)
        if job.status != "succeeded" and succeeded:
            problems["success_without_succeeded_job"].append(jid)
        counted = sorted(a.attempt for a in rows if a.outcome != "dead")
        if counted != list(range(1, job.attempts + 1)):
            problems["attempt_count"].append(jid)
        if sum(1 for a in rows if a.outcome == "dead") > (1 if job.status == "dead" else 0):
            problems["dead_marker"].append(jid)
        open_rows = sum(1 for a in rows if a.outcome is None)
        if job.status in FINAL_STATUSES and open_rows:
            problems["open_attempt_on_final_job"].append(jid)
        if job.status == "running":
            if open_rows != 1:
                problems["running_without_one_open_attempt"].append(jid)
            beat = aware(job.heartbeat_at)
            if beat is None or now - beat > timedelta(seconds=stale_after_s):
                stale.append(jid)
    texts = {
        "succeeded_once": "succeeded jobs without exactly one succeeded attempt",
        "success_without_succeeded_job": "jobs not succeeded that have a succeeded attempt",
        "attempt_count": "jobs whose attempts counter differs from their attempt rows (1..n)",
        "dead_marker": "jobs with a dead-letter attempt row but not dead (or several)",
        "open_attempt_on_final_job": "finished jobs with an attempt still open",
        "running_without_one_open_attempt": "running jobs without exactly one open attempt",
    }
    for name, ids in problems.items():
        report.add(name, f"{len(ids)} {texts[name]}", ids)
    if stale:
        report.add("stale_running", f"{len(stale)} running jobs with a heartbeat older than {stale_after_s:.0f} s "
                   "(their worker is probably dead; the broker redelivers them)", stale, severity="warning")


def _check_usage(report: Report, s, jobs: dict, tenant: str | None) -> None:
    q = select(UsageCost.job_id, func.count(), func.min(UsageCost.tenant_id)).group_by(UsageCost.job_id)
    if tenant:
        q = q.where(UsageCost.tenant_id == tenant)
    twice, not_succeeded, wrong_tenant = [], [], []
    for job_id, n, usage_tenant in s.execute(q):
        if n > 1:
            twice.append(job_id)
        job = jobs.get(job_id)
        if job is None:
            job = s.get(Job, job_id)
        if job is None or job.status != "succeeded":
            not_succeeded.append(job_id)
        elif job.tenant_id != usage_tenant:
            wrong_tenant.append(job_id)
    if twice:
        report.add("usage_once", f"{len(twice)} jobs with more than one usage row (cost counted twice)", twice)
    if not_succeeded:
        report.add("usage_for_unsucceeded_job", f"{len(not_succeeded)} usage rows for jobs that did not succeed",
                   not_succeeded)
    if wrong_tenant:
        report.add("usage_tenant", f"{len(wrong_tenant)} usage rows whose tenant differs from their job's", wrong_tenant)


def _check_made_by_succeeded_jobs(report: Report, s, jobs: dict, tenant: str | None) -> None:
    def status_of(job_id: str) -> str | None:
        job = jobs.get(job_id) or s.get(Job, job_id)
        return job.status if job is not None else None

    for model, label, tenant_col in ((Review, "reviews", Review.tenant_id),
                                     (AdapterVersion, "adapter versions", AdapterVersion.tenant_id),
                                     (Artifact, "artifacts", Artifact.tenant_id)):
        job_col = Review.job_id if model is Review else model.created_by_job_id
        q = select(model.id, job_col).where(job_col.is_not(None))
        if tenant:
            q = q.where(tenant_col == tenant)
        bad = [rid for rid, jid in s.execute(q) if status_of(jid) != "succeeded"]
        if bad:
            report.add(f"{label.replace(' ', '_')}_from_succeeded_jobs",
                       f"{len(bad)} {label} made by a job that did not succeed", bad)
    dup = [jid for jid, n in s.execute(select(Review.job_id, func.count()).group_by(Review.job_id)) if n > 1]
    if dup:
        report.add("review_once", f"{len(dup)} jobs with more than one review", dup)
    q = select(Checkpoint.id, Checkpoint.job_id)
    orphans = [cid for cid, jid in s.execute(q) if status_of(jid) is None]
    if orphans:
        report.add("checkpoint_job", f"{len(orphans)} checkpoints of unknown jobs", orphans)


def _check_aliases_and_feedback(report: Report, s, tenant: str | None) -> None:
    q = select(AdapterAlias)
    if tenant:
        q = q.where(AdapterAlias.tenant_id == tenant)
    bad = []
    for alias in s.scalars(q):
        version = s.get(AdapterVersion, alias.version_id)
        if version is None or version.tenant_id != alias.tenant_id:
            bad.append(f"{alias.tenant_id}/{alias.alias}")
    if bad:
        report.add("alias_target", f"{len(bad)} aliases pointing at a missing version or another tenant's", bad)
    q = select(Feedback.id, Feedback.tenant_id, Review.tenant_id).outerjoin(Review, Review.id == Feedback.review_id)
    if tenant:
        q = q.where(Feedback.tenant_id == tenant)
    bad = [fid for fid, ft, rt in s.execute(q) if rt is None or rt != ft]
    if bad:
        report.add("feedback_review", f"{len(bad)} feedback rows without a review of the same tenant", bad)


def file_matches(rel_path: str, expected: str | None) -> tuple[bool, str]:
    """Does the file or folder at ``rel_path`` exist under the data root and match ``expected``?
    A folder matches by its tree digest (``paths.sha256_tree``) or by one of its top-level files
    (adapters record the weights file, index snapshots their manifest)."""
    try:
        full = resolve_in_data_root(rel_path)
    except UnsafePath as exc:
        return False, f"unsafe path: {exc}"
    if not full.exists():
        return False, "missing"
    if not expected:
        return True, "no sha256 recorded"
    if full.is_file():
        return (sha256_file(full) == expected), "sha256 mismatch"
    digests = {sha256_tree(full)}
    digests |= {sha256_file(p) for p in full.iterdir() if p.is_file()}
    return (expected in digests), "sha256 mismatch"


def _check_files(report: Report, s, tenant: str | None) -> None:
    bad = []
    q = select(Artifact).where(Artifact.status.in_(LIVE_ARTIFACT_STATUSES))
    if tenant:
        q = q.where(Artifact.tenant_id == tenant)
    for art in s.scalars(q):
        ok, why = file_matches(art.path, art.sha256)
        if not ok:
            bad.append(f"artifact {art.id} ({art.kind} {art.path}): {why}")
    q = select(AdapterVersion).join(AdapterAlias, AdapterAlias.version_id == AdapterVersion.id)
    if tenant:
        q = q.where(AdapterVersion.tenant_id == tenant)
    for version in set(s.scalars(q)):
        if version.artifact_path:
            ok, why = file_matches(version.artifact_path, version.artifact_sha256)
            if not ok:
                bad.append(f"adapter version {version.id} ({version.artifact_path}): {why}")
    if bad:
        report.add("artifact_files", f"{len(bad)} live artifacts or aliased adapter versions whose files are missing "
                   "or do not match their sha256", bad)
