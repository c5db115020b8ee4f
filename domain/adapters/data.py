"""The retraining data set: a tenant's feedback on reviews, turned into (prompt, completion) pairs.

- An **accepted** review teaches the review the model wrote (``reviews.raw_text``).
- A **rejected** review with a correction teaches the correction; one without a correction teaches nothing.
- Feedback on findings (``finding_index``): a review whose findings were judged teaches **that review as the
  tenant would keep it**: its summary and its findings in the review format, minus the rejected ones (the
  newest verdict on a finding counts); when every finding was rejected it teaches "no findings". So a
  rejection is learnt too (the adapter learns not to report what the tenant keeps rejecting, on clean code as
  much as on faulty code), besides counting towards the rule's suppression (domain.feedback). A finding's
  correction teaches the correction.
- The prompt is the review prompt the service uses (``domain.prompting.build_messages``, without
  retrieved context, which is not stored with the review), rendered with the model's chat template; for a
  grounded review it carries the analyzer findings the served prompt carried (``analyzer_findings``), so
  the adapter learns on the prompt it will serve.
- Examples are deduplicated by the sha256 of (messages, completion) and sorted by it, so the same feedback
  always gives the same data set and the same ``dataset_hash``.
- The train/eval split is fixed by each example's hash (``eval_fraction`` of the hash space), so it does not
  move when feedback is added or a job is redelivered.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.errors import InvalidJob
from domain.ledger.models import Feedback, Review, RuleSuppression, aware
from domain.prompting import build_messages as review_messages
from domain.prompting import encode, fit_prompt
from domain.feedback import rule_key
from domain.review.findings import headline

IGNORE = -100  # label of a token that carries no loss (prompt, padding)


@dataclass(frozen=True)
class FeedbackExample:
    code: str
    path: str | None
    language: str | None
    is_diff: bool
    completion: str
    source: str  # "accepted" (a review accepted) | "judged" (a review's findings judged) | "correction"
    feedback_at: datetime
    analysis: tuple | None = None  # the analyzer findings the review's prompt carried; None: no analyzer stage

    @property
    def sha256(self) -> str:
        fields = [self.code, self.path, self.language, self.is_diff, self.completion]
        body = json.dumps(fields + ([list(self.analysis)] if self.analysis is not None else []), ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class Dataset:
    examples: list[FeedbackExample]  # deduplicated, sorted by hash
    dataset_hash: str
    feedback_rows: int  # feedback rows read (including rejects without a correction and duplicates)
    feedback_until: datetime | None  # newest feedback row read: the next retrain starts after it
    skipped: dict = field(default_factory=dict)

    def split(self, eval_fraction: float) -> tuple[list[FeedbackExample], list[FeedbackExample]]:
        """(train, eval) by hash. With at least two examples both sides are non-empty; a single example is
        both trained and evaluated on (recorded as ``eval_on_train`` by the caller)."""
        if len(self.examples) < 2:
            return list(self.examples), list(self.examples)
        cut = int(eval_fraction * 2**32)
        train = [e for e in self.examples if int(e.sha256[:8], 16) >= cut]
        held = [e for e in self.examples if int(e.sha256[:8], 16) < cut]
        if not held:
            held, train = [train[-1]], train[:-1]
        if not train:
            train, held = [held[0]], held[1:]
        return train, held



def looks_like_diff(code: str, language: str | None) -> bool:
    if language == "diff":
        return True
    head = code.lstrip()[:200]
    return head.startswith(("diff --git", "--- ", "@@ ", "Index: "))


def _feedback_query(tenant: str, since: datetime | None, until: datetime | None):
    q = (select(Feedback, Review).join(Review, Review.id == Feedback.review_id)
         .where(Feedback.tenant_id == tenant, Review.tenant_id == tenant))
    if since is not None:
        q = q.where(Feedback.created_at > since)
    if until is not None:
        q = q.where(Feedback.created_at <= until)
    return q


def usable(fb: Feedback) -> bool:
    """Whether this row teaches on its own: an accept, a correction, or a verdict on one finding (which
    reshapes its review's target)."""
    return (fb.verdict == "accept" or bool((fb.correction or "").strip())
            or (fb.verdict == "reject" and fb.finding_index is not None))


def count_new_feedback(session: Session, tenant: str, since: datetime | None) -> int:
    """Feedback rows after ``since`` that would become training examples (accepts, corrections, verdicts on
    findings)."""
    q = (select(func.count()).select_from(Feedback).join(Review, Review.id == Feedback.review_id)
         .where(Feedback.tenant_id == tenant, Review.tenant_id == tenant)
         .where((Feedback.verdict == "accept") | Feedback.correction.is_not(None) | Feedback.finding_index.is_not(None)))
    if since is not None:
        q = q.where(Feedback.created_at > since)
    return int(session.scalar(q) or 0)


def collect(session: Session, tenant: str, since: datetime | None = None, until: datetime | None = None) -> Dataset:
    """The tenant's training examples from feedback created in (since, until]."""
    seen: dict[str, FeedbackExample] = {}
    rows, newest = 0, None
    skipped = {"rejected_without_correction": 0, "duplicates": 0}
    judged: dict[str, tuple[Review, dict[int, str], datetime]] = {}  # review id -> (review, index -> verdict, newest)
    suppressed = frozenset(session.scalars(select(RuleSuppression.rule_id).where(
        RuleSuppression.tenant_id == tenant, RuleSuppression.active.is_(True))))

    def add(review: Review, completion: str, source: str, at: datetime) -> None:
        ex = FeedbackExample(code=review.code, path=review.path, language=review.language,
                             is_diff=looks_like_diff(review.code, review.language), completion=completion.strip(),
                             source=source, feedback_at=at, analysis=analyzer_findings(review, suppressed))
        if not ex.completion:
            skipped["rejected_without_correction"] += 1
            return
        if ex.sha256 in seen:
            skipped["duplicates"] += 1
        seen[ex.sha256] = ex

    for fb, review in session.execute(_feedback_query(tenant, since, until).order_by(Feedback.created_at, Feedback.id)):
        rows += 1
        at = aware(fb.created_at)
        newest = at if newest is None or at > newest else newest
        if not usable(fb):
            skipped["rejected_without_correction"] += 1
            continue
        corrected = bool((fb.correction or "").strip())
        if corrected:
            add(review, fb.correction, "correction", at)
        if fb.finding_index is not None:
            _, verdicts, _ = judged.get(review.id, (review, {}, at))
            verdicts[fb.finding_index] = fb.verdict  # rows come oldest first: the newest verdict (and time) stays
            judged[review.id] = (review, verdicts, at)
        elif not corrected:
            add(review, review.raw_text or "", "accepted", at)
    for review, verdicts, at in judged.values():
        add(review, kept_review(review, verdicts), "judged", at)
    examples = [seen[h] for h in sorted(seen)]
    digest = hashlib.sha256("\n".join(sorted(seen)).encode()).hexdigest()
    return Dataset(examples=examples, dataset_hash=digest, feedback_rows=rows, feedback_until=newest, skipped=skipped)


NO_FINDINGS = "Summary: no issues found.\nFindings: none"


def kept_review(review: Review, verdicts: dict[int, str]) -> str:
    """The review as the tenant would keep it, in the review format: its findings (1-based ``verdicts``:
    index -> accept | reject) without the rejected ones; "no findings" when none is left."""
    findings = review.findings or []
    kept = [f for n, f in enumerate(findings, start=1) if verdicts.get(n) != "reject"]
    if not kept:
        return NO_FINDINGS
    lines = []
    for f in kept:
        where = f"line {f['line']}: " if f.get("line") else ""
        lines.append(f"- [{f.get('severity') or 'medium'}] {where}{f.get('message', '')}")
    summary = model_summary(review) or headline(kept)
    return f"Summary: {summary}\nFindings:\n" + "\n".join(lines)


_GUTTER = re.compile(r"(?<![\w|])\d+\|(?:\s|$)")  # "12| " : the prompt's line-number gutter


def model_summary(review: Review) -> str:
    """The stored summary without the headline the service puts first (``domain.review.findings.headline``,
    counted from findings the tenant may have rejected since): what the model wrote as its summary, less its
    sentences that echo the prompt's line-number gutter ("The `2| 1| 1` is a syntax error."): no code has
    those, so they are the model copying the prompt's layout, which an adapter must not learn."""
    summary = (review.summary or "").removeprefix(headline(review.findings or [])).strip()
    sentences = re.split(r"(?<=[.!?])\s+", summary)
    return " ".join(x for x in sentences if not _GUTTER.search(x)).strip()


def analyzer_findings(review: Review, suppressed: frozenset[str] = frozenset()) -> tuple | None:
    """The analyzer findings a grounded review's prompt would carry now, so a training prompt is the serving
    prompt: the review's stored findings that no model wrote (after the merge: duplicates and the rules
    suppressed then are gone), less the tenant's rules ``suppressed`` now (the service withholds those from
    the prompt, domain.review.grounded.withhold_suppressed). None when no analyzer stage ran (older reviews,
    unsupported languages, skipped files)."""
    record = review.analysis or {}
    if not record.get("supported") or record.get("skipped"):
        return None
    keep = ("rule_id", "line", "severity", "category", "message")
    return tuple({k: f.get(k) for k in keep} for f in review.findings or []
                 if f.get("source") != "model" and rule_key(f) not in suppressed)


# ---- tokenization -------------------------------------------------------------------------------

@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: the loss is on the completion only
    prompt_truncated: bool = False

    @property
    def completion_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def default_prompt_builder(code: str, path: str | None, language: str | None, is_diff: bool,
                           analysis: tuple | None = None) -> list[dict]:
    return review_messages(code, path, language, is_diff, [], analysis=list(analysis) if analysis is not None else None)


def tokenize(tokenizer, example: FeedbackExample, max_seq_len: int, build_messages=default_prompt_builder) -> TokenizedExample:
    """Prompt (chat template, generation prompt) + completion + end-of-turn token, at most ``max_seq_len``
    tokens. A long prompt is cut by the review prompt's own fitting rule (middle lines of the code); a
    completion longer than half the window is cut at its end."""
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    completion = completion[: max(1, max_seq_len // 2) - 1] + [tokenizer.eos_token_id]
    if build_messages is default_prompt_builder:
        messages = default_prompt_builder(example.code, example.path, example.language, example.is_diff, example.analysis)
    else:
        messages = build_messages(example.code, example.path, example.language, example.is_diff)
    prompt = encode(tokenizer, messages)
    truncated = False
    if len(prompt) + len(completion) > max_seq_len:
        if build_messages is default_prompt_builder:
            try:
                fitted = fit_prompt(tokenizer, example.code, example.path, example.language, example.is_diff, [],
                                    context_window=max_seq_len, max_new_tokens=len(completion),
                                    analysis=list(example.analysis) if example.analysis is not None else None)
                prompt = fitted.input_ids
            except InvalidJob:
                prompt = prompt[-(max_seq_len - len(completion)):]
        else:
            prompt = prompt[-(max_seq_len - len(completion)):]
        truncated = True
    prompt = prompt[: max_seq_len - len(completion)]
    return TokenizedExample(input_ids=prompt + completion, labels=[IGNORE] * len(prompt) + completion,
                            prompt_truncated=truncated)
