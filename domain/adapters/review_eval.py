"""The eval gate's quality measure: precision of located findings on the tenant's own held-out feedback.

Items are the retrain's eval split (domain/adapters/data.py: accepted reviews, accepted findings, corrections),
grouped by the reviewed code; an item's labels are the lines of the findings its feedback teaches (read with the
review parser). Each side of the gate reviews every item the way the service does — analyzer stage, analyzer
findings in the prompt, greedy decoding with the stop rule, merge leaving out the tenant's suppressed rules — and
``domain.review.quality.score`` scores the findings. Analyzer findings are the same for both sides; only the
model's part differs, so the measure moves when the adapter changes what the model reports.

    measure = QualityMeasure.prepare(tokenizer, examples, context_window, suppressed, max_items, max_new_tokens)
    measure.run(peft_model)   # with the candidate active, then with the reference active (domain/adapters/gate.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from domain.errors import InvalidJob
from domain.prompting import fit_prompt, guess_language
from domain.review import quality
from domain.review.analyzers import Analysis
from domain.review.decoding import review_stop
from domain.review.findings import from_model, merge
from domain.review.grounded import analysis_note, analysis_stage, output_budget, withhold_suppressed
from domain.review.parse import parse_review

MEASURE = "precision of located findings (±1 line) on the tenant's held-out feedback"


@dataclass(frozen=True)
class Item:
    code: str
    path: str | None
    language: str | None
    labels: tuple[int, ...]


def items_from(examples, limit: int) -> list[Item]:
    """One item per reviewed file of the eval split (whole files only), labels = lines its feedback teaches."""
    groups: dict[tuple, set[int]] = {}
    for e in examples:
        if e.is_diff:
            continue
        key = (e.code, e.path, e.language or guess_language(e.path))
        parsed = parse_review(e.completion, n_lines=len(e.code.splitlines()))
        groups.setdefault(key, set()).update(f["line"] for f in parsed.findings if f.get("line"))
    return [Item(code, path, lang, tuple(sorted(lines))) for (code, path, lang), lines in groups.items()][:limit]


@dataclass
class _Prepared:
    item: Item
    analysis: Analysis
    input_ids: list[int]
    budget: int


def _fit(tokenizer, it: Item, analysis: Analysis, context_window: int, budget: int):
    """The item's prompt, with the output budget halved (down to 32 tokens) when the prompt does not fit."""
    while True:
        try:
            return fit_prompt(tokenizer, it.code, it.path, it.language, False, [], context_window=context_window,
                              max_new_tokens=budget, analysis=analysis.findings,
                              analysis_note=analysis_note(analysis, it.language)), budget
        except InvalidJob:
            if budget <= 32:
                return None, budget
            budget = max(32, budget // 2)


@dataclass
class QualityMeasure:
    tokenizer: object
    prepared: list[_Prepared]
    suppressed: frozenset[str]

    @classmethod
    def prepare(cls, tokenizer, examples, context_window: int, suppressed: frozenset[str], max_items: int,
                max_new_tokens: int) -> QualityMeasure | None:
        """None when there is nothing to measure (no items, or ``max_items`` 0)."""
        items = items_from(examples, max_items) if max_items > 0 else []
        prepared = []
        for it in items:
            analysis = withhold_suppressed(analysis_stage(it.code, it.path, it.language, False), suppressed)
            fitted, budget = _fit(tokenizer, it, analysis, context_window,
                                  output_budget(it.code, analysis, max_new_tokens, context_window))
            if fitted is None:  # the prompt cannot fit this model's window: the item is not measured
                continue
            prepared.append(_Prepared(it, analysis, fitted.input_ids, budget))
        return cls(tokenizer, prepared, suppressed) if prepared else None

    def reviews(self, model) -> list[list[dict]]:
        """Each item's findings, reviewed with the model's active adapter (in eval mode)."""
        was_training = model.training
        model.eval()
        try:
            return [self._review(model, p) for p in self.prepared]
        finally:
            model.train(was_training)

    def run(self, model) -> dict:
        """The items' reviews scored: precision, recall and F1 of located findings, with their counts."""
        return {**quality.score([p.item.labels for p in self.prepared], self.reviews(model)), "measure": MEASURE}

    def _review(self, model, p: _Prepared) -> list[dict]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        stop, n = review_stop(decode), len(p.input_ids)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([stop(input_ids[0, n:].tolist())], device=input_ids.device)

        device = next(model.parameters()).device
        ids = torch.tensor([p.input_ids], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.budget,
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([_Stop()]))
        text = decode(out[0, n:].tolist())
        parsed = parse_review(text, n_lines=len(p.item.code.splitlines()))
        # the service's merge (domain.review.grounded.merge_review) without its fix verification, which
        # changes no finding
        return merge(p.analysis.findings + p.analysis.suppressed, [from_model(f) for f in parsed.findings],
                     self.suppressed)
