"""A grounded review job end to end (SQLite ledger, tiny model, real ruff/bandit): analyzer findings in the
prompt and in the stored review with their source and a verified fix, the analyzer stage recorded, an
unsupported language reviewed model-only and saying so, and a tenant's suppressed rule left out."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from domain import jobs
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import Review, RuleSuppression
from domain.review import runtime
from tests.fixtures.review import save_lively_tiny_model
from tests.conftest import add_tenant

CODE = "import yaml\n\n\ndef load(text):\n    data = yaml.load(text)\n    return eval(data)\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_lively_tiny_model(tmp_path_factory.mktemp("review-grounded") / "base")


@pytest.fixture
def ledger(sqlite_ledger, base_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(base_dir))
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    yield sqlite_ledger
    runtime.reset_runtimes()


def review(body: dict) -> tuple[dict, Review]:
    out = jobs.execute("review", uuid.uuid4().hex, {"tenant": "acme", "max_new_tokens": 24, **body}, "test:1")
    assert out["status"] == "succeeded", out
    with session_scope() as s:
        row = s.scalar(select(Review).where(Review.id == out["result"]["review_id"]))
        s.expunge(row)
    return out["result"], row


def test_analyzer_findings_are_stored_with_source_and_verified_fixes(ledger):
    res, row = review({"code": CODE, "path": "load.py"})
    by_rule = {f["rule_id"]: f for f in row.findings if f["source"] != "model"}
    assert by_rule["B506"]["line"] == 5 and by_rule["B506"]["category"] == "insecure_deserialization"
    assert by_rule["B307"]["line"] == 6 and by_rule["B307"]["source"] == "bandit"
    assert "safe_load" in by_rule["B506"]["fix"] and "ast.literal_eval" in by_rule["B307"]["fix"]
    stages = {s["name"]: s["status"] for s in row.analysis["stages"]}
    assert stages["ruff"] == stages["bandit"] == "ok" and row.analysis["supported"] is True
    assert res["analysis"] == row.analysis and res["findings"] == row.findings


def test_an_unsupported_language_is_reviewed_model_only_and_says_so(ledger):
    res, row = review({"code": "fn main() { let x = 1; }\n", "path": "main.rs"})
    assert row.analysis["supported"] is False
    assert "model-only review" in row.summary and all(f["source"] == "model" for f in row.findings)


def test_a_suppressed_rule_is_left_out_of_the_tenants_reviews(ledger):
    with session_scope() as s:
        s.add(RuleSuppression(tenant_id="acme", rule_id="B307", rejections=3, active=True))
    _, row = review({"code": CODE, "path": "load.py"})
    rules = {f["rule_id"] for f in row.findings}
    assert "B307" not in rules and "B506" in rules
    assert row.analysis["suppressed"] == [{"rule_id": "B307", "line": 6, "source": "bandit"}]  # held back, on record


def test_a_suppressed_rules_findings_are_withheld_from_the_prompt_and_the_output_budget(base_dir):
    """What the tenant suppressed is not put to the model to explain (its summary would bring it back)."""
    from domain.prompting import fit_prompt
    from domain.review.grounded import analysis_stage, output_budget, withhold_suppressed
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    full = analysis_stage(CODE, "load.py", "python", False)
    held = withhold_suppressed(analysis_stage(CODE, "load.py", "python", False), frozenset({"B307"}))
    assert [f["rule_id"] for f in held.suppressed] == ["B307"] and "B307" not in {f["rule_id"] for f in held.findings}
    assert {f["rule_id"] for f in full.findings} == {f["rule_id"] for f in held.findings} | {"B307"}
    assert output_budget(CODE, held, 512, 2048) == output_budget(CODE, full, 512, 2048) - 40

    def prompt(analysis):
        ids = fit_prompt(tok, CODE, "load.py", "python", False, [], context_window=2048, max_new_tokens=64,
                         analysis=analysis.findings, analysis_note=None).input_ids
        return tok.decode(ids)

    # the tiny model's prompt lists the most severe finding and counts the rest ("... and 1 more")
    assert "B506" in prompt(full) and ("B307" in prompt(full) or "and 1 more" in prompt(full))
    assert "B506" in prompt(held) and "B307" not in prompt(held) and "more of lower severity" not in prompt(held)
    assert withhold_suppressed(full, frozenset()).suppressed == []
