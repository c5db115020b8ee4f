"""The labelled review set's files with no defect (bench/data/review_quality/cases.py, ``NOISE``): the tenant's
own code that analyzers flag anyway. Checked with the real analyzers: every such file draws at least one finding
(else it adds nothing to the false-alarm count), only of the three idioms the set documents, and each idiom
occurs in both halves, so what the tenant's feedback on the tuning half teaches can show on the held-out half."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "data" / "review_quality"))

from cases import CASES, NOISE, load, load_noise  # noqa: E402

from domain.review.grounded import analysis_stage  # noqa: E402

IDIOMS = {"B104", "B311", "BLE001"}  # bind all interfaces, random for non-secrets, log-and-go-on worker loops


@pytest.fixture(scope="module")
def rules_found() -> dict[str, list[str]]:
    return {n["id"]: [f["rule_id"] for f in analysis_stage(n["code"], "module.py", "python", False).findings]
            for n in load_noise()}


def test_every_file_with_no_defect_parses_has_no_label_and_draws_only_the_documented_idioms(rules_found):
    assert len(NOISE) == len(load_noise("tune")) + len(load_noise("held")) >= 12
    for n in load_noise():
        ast.parse(n["code"])
        assert "# DEFECT" not in n["code"]
        assert rules_found[n["id"]], f"{n['id']} ({n['name']}) draws no analyzer finding"
        assert set(rules_found[n["id"]]) <= IDIOMS, (n["id"], rules_found[n["id"]])


def test_each_idiom_occurs_in_both_halves_and_the_ids_are_unique(rules_found):
    per_half = {s: Counter(r for n in load_noise(s) for r in rules_found[n["id"]]) for s in ("tune", "held")}
    for rule in IDIOMS:
        assert per_half["tune"][rule] >= 3, per_half  # enough rejections for the default suppression threshold
        assert per_half["held"][rule] >= 2, per_half
    ids = [n["id"] for n in load_noise()] + [c["id"] for c in load()]
    assert len(ids) == len(set(ids)) == len(NOISE) + len(CASES)
