"""The analyzer stage with the real ruff and bandit: normalised findings mapped to categories, secrets
masked, diffs analyzed on their added lines only, bad input skipped with a reason, a crashing or hanging
analyzer recorded without failing the stage, unsupported languages marked model-only."""

from __future__ import annotations

import time

import pytest

from domain.review import analyzers
from domain.review.analyzers import Analyzer, Limits, analyze, analyze_file, run_tool, screen

BAD = '''import subprocess
import yaml


def load(path, seen=[]):
    password = "hunter2-very-secret"
    try:
        data = yaml.load(open(path).read())
    except:
        data = None
    subprocess.call("cat " + path, shell=True)
    return eval(data), seen
'''


def by_rule(findings):
    return {f["rule_id"]: f for f in findings}


def test_ruff_and_bandit_findings_are_normalised_and_categorised():
    result = analyze(BAD, "load.py", "python")
    assert result.supported and result.skipped is None
    stages = {s.name: s for s in result.stages}
    assert stages["ruff"].status == "ok" and stages["bandit"].status == "ok"
    assert stages["semgrep"].status == "skipped" and "not installed" in stages["semgrep"].reason
    rules = by_rule(result.findings)
    expected = {"B006": ("mutable_default", 5), "E722": ("bare_except", 9), "SIM115": ("resource_leak", 8),
                "B506": ("insecure_deserialization", 8), "B105": ("hardcoded_secret", 6),
                "B602": ("command_injection", 11), "B307": ("code_injection", 12)}
    for rule, (category, line) in expected.items():
        assert (rules[rule]["category"], rules[rule]["line"]) == (category, line), rule
    for f in result.findings:
        assert set(f) >= {"rule_id", "line", "end_line", "severity", "category", "message", "source", "confidence"}
        assert f["severity"] in ("high", "medium", "low") and f["source"] in ("ruff", "bandit", "foundry-rules")


def test_secrets_in_findings_are_masked():
    result = analyze(BAD, "load.py", "python")
    secret = by_rule(result.findings)["B105"]
    assert "hunter2-very-secret" not in secret["message"] and "***" in secret["message"]


def test_line_rules_cover_what_the_python_analyzers_do_not():
    code = ('from flask import request\n'
            'resp.headers["Access-Control-Allow-Origin"] = "*"\n'
            'r = requests.get(request.args["url"])\n'
            'for i in range(len(items) + 1):\n'
            '    pass\n')
    cats = {f["category"]: f["line"] for f in analyze(code, "app.py", "python").findings}
    assert cats["cors"] == 2 and cats["ssrf"] == 3 and cats["off_by_one"] == 4


DIFF = """--- a/app.py
+++ b/app.py
@@ -1,4 +1,6 @@
 import os
+import pickle
 
 def load(data):
-    return eval(data)
+    x = pickle.loads(data)
+    return x
"""


def test_a_diff_is_analyzed_on_its_added_lines_numbered_as_diff_lines():
    result = analyze(DIFF, "app.py", "diff", is_diff=True)
    lines = DIFF.splitlines()
    assert result.findings, result.record()
    for f in result.findings:
        assert lines[f["line"] - 1].startswith("+"), f  # a line of the diff the model sees, an added one
        assert f["path"] == "app.py"
    assert any(f["rule_id"] == "B301" for f in result.findings)
    assert not any(f["rule_id"] == "B307" for f in result.findings)  # eval was removed, not added


WAIVED = '''import urllib.request


def checked(url):
    return urllib.request.urlopen(url).read()  # noqa: S310 - host checked by the caller


def unchecked(url):
    return urllib.request.urlopen(url).read()


def bugbear_code(url):
    return urllib.request.urlopen(url).read()  # noqa: B310


def bare(url):
    return urllib.request.urlopen(url).read()  # noqa
'''


def test_a_noqa_for_ruffs_name_of_a_bandit_check_waives_bandits_finding_on_that_line_only():
    """``# noqa: S310`` is ruff's waiver of bandit's B310 check: bandit's own B310 on that line is left out
    (and recorded as waived); on other lines, with a bugbear-namespace code or a bare noqa, it stays."""
    assert analyzers.waived_bandit_rules(WAIVED) == {5: frozenset({"B310"})}
    assert analyzers.waived_bandit_rules("x = 1  # NOQA: S310, E501\n") == {1: frozenset({"B310"})}  # as ruff reads it
    result = analyze(WAIVED, "fetch.py", "python")
    b310 = sorted(f["line"] for f in result.findings if f["rule_id"] == "B310")
    assert b310 == [9, 13, 17], result.findings
    assert result.waived == [{"rule_id": "B310", "line": 5, "source": "bandit", "by": "noqa: S310"}]
    assert result.record()["waived"] == result.waived
    diff = ("--- a/fetch.py\n+++ b/fetch.py\n@@ -0,0 +1,9 @@\n"
            + "".join("+" + line + "\n" for line in WAIVED.splitlines()[:9]))
    in_diff = analyze(diff, "fetch.py", "diff", is_diff=True)
    assert [f["rule_id"] for f in in_diff.findings if f["rule_id"] == "B310"] == ["B310"]
    assert [(w["path"], w["line"]) for w in in_diff.waived] == [("fetch.py", 5)]


@pytest.mark.parametrize("code, path, reason", [
    ("\x01\x02\x03binary\x04\x05" * 10, "x.py", "binary"),
    ("var a=1;" * 400, "app.min.js", "minified"),
    ("# @generated by protoc. DO NOT EDIT.\nx = eval(y)\n", "x.py", "generated"),
])
def test_bad_input_is_skipped_with_a_reason(code, path, reason):
    assert reason in screen(code, path)
    result = analyze(code, path, "python")
    assert result.findings == [] and reason in result.skipped and not result.supported


def test_an_unsupported_language_is_model_only():
    result = analyze("fn main() { let x = 1; }\n", "main.rs", "rust")
    assert result.supported is False and result.findings == []


def test_a_crashing_and_a_hanging_analyzer_are_recorded_and_the_others_still_run():
    def crash(file, limits):
        return run_tool(["/bin/sh", "-c", "echo boom >&2; exit 3"], limits)

    def hang(file, limits):
        return run_tool(["/bin/sleep", "30"], limits)

    chosen = [Analyzer("crash", frozenset({"python"}), crash), Analyzer("hang", frozenset({"python"}), hang),
              *[a for a in analyzers.ANALYZERS if a.name == "bandit"]]
    t0 = time.monotonic()
    result = analyze_file(BAD, "python", Limits(timeout_s=1.0), chosen)
    assert time.monotonic() - t0 < 20
    stages = {s.name: s for s in result.stages}
    assert stages["crash"].status == "error" and "exited with 3" in stages["crash"].reason and "boom" in stages["crash"].reason
    assert stages["hang"].status == "timeout"
    assert stages["bandit"].status == "ok" and any(f["source"] == "bandit" for f in result.findings)


def test_the_memory_limit_applies_to_the_analyzer_process():
    limits = Limits(timeout_s=20, memory_mb=200)
    with pytest.raises(analyzers.AnalyzerError, match="MemoryError"):
        run_tool([analyzers.sys.executable, "-c", "x = bytearray(400 * 1024 * 1024)"], limits, ok_codes=(0,))
