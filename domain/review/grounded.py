"""A grounded review: the analyzer stage before generation, and the merge after it.

    analysis = analysis_stage(code, path, language, is_diff)      # ruff/bandit/... findings, never raises
    withhold_suppressed(analysis, suppressed)                      # the tenant's suppressed rules: not prompted
    prompt carries analysis.findings (domain.prompting.analyzer_block)
    max_new_tokens = output_budget(code, analysis, requested)      # sized to the input
    findings, summary = merge_review(parsed, analysis, ...)        # analyzers + model, de-duplicated,
                                                                   # suppressed rules left out, verified fixes
"""

from __future__ import annotations

import logging
import re

from domain.errors import InvalidJob
from domain.feedback import rule_key
from domain.review import analyzers, fixes
from domain.review.findings import from_model, merge

log = logging.getLogger(__name__)

_DIFF_BLOCK = re.compile(r"```(?:diff|patch)\n(.*?)```", re.DOTALL)


def analysis_stage(code: str, path: str | None, language: str | None, is_diff: bool) -> analyzers.Analysis:
    try:
        return analyzers.analyze(code, path, language, is_diff)
    except Exception as exc:  # noqa: BLE001 - the analyzer stage degrades a review, it never fails it
        log.warning("analyzer stage failed: %s", exc)
        return analyzers.Analysis(supported=False, stages=[analyzers.Stage("analyzers", "error",
                                                                           reason=f"{type(exc).__name__}: {exc}")])


def withhold_suppressed(analysis: analyzers.Analysis, suppressed: frozenset[str]) -> analyzers.Analysis:
    """Move the findings of rules the tenant suppressed out of ``analysis.findings`` (what the prompt lists and
    the output budget counts) into ``analysis.suppressed``: the model is not asked to explain what the tenant
    asked not to see, and the review's analysis record still shows what was held back. Returns ``analysis``."""
    if suppressed:
        analysis.suppressed = [f for f in analysis.findings if rule_key(f) in suppressed]
        analysis.findings = [f for f in analysis.findings if rule_key(f) not in suppressed]
    return analysis


def analysis_note(analysis: analyzers.Analysis, language: str | None) -> str | None:
    """What the prompt and the review say when no analyzer looked at the code (None when one did)."""
    if analysis.skipped:
        return f"not analyzed ({analysis.skipped}); model-only review"
    if not analysis.supported:
        return f"no analyzer for {language or 'this language'}; model-only review"
    return None


def output_budget(code: str, analysis: analyzers.Analysis, requested: int, context_window: int) -> int:
    """New tokens for this review: room for a summary and about 40 tokens per expected finding, bounded
    by what was requested. A 10-line clean file gets ~100 tokens, not the whole request. A request that
    the context window cannot hold is refused (InvalidJob naming max_new_tokens)."""
    if requested >= context_window:
        raise InvalidJob(f"max_new_tokens: {requested} new tokens do not fit in the model's context window of "
                         f"{context_window} tokens with any prompt; lower max_new_tokens", field="max_new_tokens")
    lines = len(code.splitlines())
    expected = len(analysis.findings) + max(1, lines // 25)
    return max(1, min(requested, 64 + 40 * expected))


def merge_review(parsed_findings: list[dict], analysis: analyzers.Analysis, code: str, *, path: str | None,
                 language: str | None, is_diff: bool, raw_text: str = "",
                 suppressed: frozenset[str] = frozenset()) -> list[dict]:
    """The stored findings: analyzer findings and the model's, one per line and category, each with its
    source, severity, confidence and category; a verified fix where one exists (whole files only)."""
    merged = merge(analysis.findings + analysis.suppressed, [from_model(f) for f in parsed_findings], suppressed)
    if not is_diff and analysis.supported and not analysis.skipped:
        name = path or "code.py"

        def rerun(patched: str, finding: dict) -> list[dict]:  # the analyzer that found it (all, for the model's)
            which = [a for a in analyzers.ANALYZERS if a.name == finding.get("source")] or None
            return analyzers.analyze_file(patched, language, analyzers=which).findings

        fixes.attach_fixes(code, merged, language, rerun, name, model_diffs=_DIFF_BLOCK.findall(raw_text))
    return merged
