"""Merging analyzer and model findings, and verified fixes (real ruff/bandit re-runs)."""

from __future__ import annotations

import ast

from domain.review import analyzers, fixes
from domain.review.findings import from_model, make_finding, mask_secrets, merge
from domain.review.grounded import merge_review


def test_merge_keeps_one_finding_per_line_and_category_with_sources():
    rule = make_finding(rule_id="B307", line=4, message="eval", source="bandit", category="code_injection",
                        severity="medium", confidence=0.9)
    dup_rule = make_finding(rule_id="S307", line=4, message="eval again", source="ruff", category="code_injection",
                            severity="high", confidence=0.9)
    model_same = from_model({"line": 4, "severity": "high", "message": "eval() runs arbitrary code from the user"})
    model_new = from_model({"line": 9, "severity": "low", "message": "loop runs one past the end, off-by-one"})
    model_repeat = dict(model_new)
    merged = merge([rule, dup_rule], [model_same, model_new, model_repeat])
    assert [(f["line"], f["category"], f["source"]) for f in merged] == [
        (4, "code_injection", "bandit"), (9, "off_by_one", "model")]
    assert merged[0]["severity"] == "high" and merged[0]["explanation"].startswith("eval()")


def test_a_model_finding_copying_the_prompts_analyzer_line_is_that_finding():
    """The prompt lists "- [high] line 6: command_injection: <message> (B602)"; a model that writes it back,
    with the category name or the rule id, explains the analyzer's finding instead of adding a second one."""
    rule = make_finding(rule_id="B602", line=6, message="subprocess call with shell=True identified", source="bandit",
                        category="command_injection", severity="high", confidence=0.9)
    auth = make_finding(rule_id="FR-AUTH2", line=3, message="token compared with ==", source="foundry",
                        category="broken_auth", severity="high", confidence=0.8)
    named = from_model({"line": 3, "severity": "high", "message": "broken_auth: compare tokens in constant time"})
    assert named["category"] == "broken_auth"
    cites = from_model({"line": 7, "severity": "high", "message": "the input reaches the call unchecked (B602)"})
    other_rule = from_model({"line": 6, "message": "unchecked input reaches pickle.loads (B6021)"})
    far = from_model({"line": 9, "message": "B602 again, somewhere else"})
    merged = merge([rule, auth], [named, cites, other_rule, far])
    assert [(f["line"], f["source"]) for f in merged] == [(6, "bandit"), (3, "foundry"), (6, "model"), (9, "model")]
    assert merged[0]["explanation"].startswith("the input") and merged[1]["explanation"].startswith("broken_auth")


def test_suppressed_rules_are_left_out():
    rule = make_finding(rule_id="B105", line=2, message="password", source="bandit", category="hardcoded_secret",
                        severity="low")
    model = from_model({"line": 7, "message": "SQL built with string formatting"})
    assert merge([rule], [model], suppressed=frozenset({"B105", "model:sql_injection"})) == []


def test_a_model_finding_restating_a_suppressed_rules_finding_is_left_out_too():
    """The tenant suppressed B104: the model's own bullet about that line (generic, or citing B104) is the same
    finding in other words and is left out; its bullet elsewhere, and its explanation of a kept finding, stay."""
    bind = make_finding(rule_id="B104", line=13, message="Possible binding to all interfaces.", source="bandit",
                        category="security_misconfiguration", severity="medium", confidence=0.7)
    kept = make_finding(rule_id="B602", line=6, message="subprocess call with shell=True identified", source="bandit",
                        category="command_injection", severity="high", confidence=0.9)
    generic = from_model({"line": 13, "message": "Use a safer way to start the server"})
    cites = from_model({"line": 12, "severity": "high", "message": "binds every interface (B104)"})
    elsewhere = from_model({"line": 20, "message": "off-by-one: the loop runs one past the end"})
    explains = from_model({"line": 6, "message": "the host name reaches the shell (B602)"})
    merged = merge([bind, kept], [generic, cites, elsewhere, explains], suppressed=frozenset({"B104"}))
    assert [(f["line"], f["source"], f.get("rule_id")) for f in merged] == [(6, "bandit", "B602"), (20, "model", None)]
    assert merged[0]["explanation"].startswith("the host name")
    unsuppressed = merge([bind, kept], [generic, cites, elsewhere, explains])
    assert [(f["line"], f["source"]) for f in unsuppressed] == [(6, "bandit"), (13, "bandit"), (20, "model")]


def test_mask_secrets():
    text = mask_secrets("token = 'ghp_abcdefghijklmnop1234' and AKIAABCDEFGHIJKLMNOP")
    assert "abcdefghijklmnop1234" not in text and "ABCDEFGHIJKLMNOP" not in text


CODE = '''import yaml


def handler(request, cache={}):
    try:
        value = eval(request.text)
    except:
        value = None
    return yaml.load(request.body), value, cache
'''


def test_rule_fixes_are_verified_by_applying_parsing_and_rerunning_the_analyzer():
    analysis = analyzers.analyze(CODE, "h.py", "python")
    merged = merge_review([], analysis, CODE, path="h.py", language="python", is_diff=False)
    fixed = {f["rule_id"]: f for f in merged if "fix" in f}
    assert {"B307", "E722", "B006", "B506"} <= set(fixed)
    for f in fixed.values():
        patched = fixes.apply_diff(CODE, f["fix"])
        ast.parse(patched)
        again = analyzers.analyze_file(patched, "python").findings
        assert not any(g["rule_id"] == f["rule_id"] for g in again), f["rule_id"]
    assert "ast.literal_eval(request.text)" in fixes.apply_diff(CODE, fixed["B307"]["fix"])


def test_a_fix_that_does_not_apply_or_parse_or_remove_the_finding_is_refused():
    finding = {"rule_id": "E722", "line": 7, "source": "ruff", "category": "bare_except"}

    def rerun(code, f):
        return analyzers.analyze_file(code, "python").findings

    stale = fixes.make_diff(CODE.replace("except:", "except :"), CODE.replace("except:", "except Exception:"), "h.py")
    assert fixes.verify(CODE, stale, finding, "python", rerun)[1].startswith("does not apply")
    broken = fixes.make_diff(CODE, CODE.replace("except:", "except Exception"), "h.py")
    assert fixes.verify(CODE, broken, finding, "python", rerun) == (False, "the patched file does not parse")
    useless = fixes.make_diff(CODE, CODE.replace("value = None", "value = 0"), "h.py")
    assert fixes.verify(CODE, useless, finding, "python", rerun)[1].startswith("the analyzer still reports")
    good = fixes.make_diff(CODE, CODE.replace("except:", "except ValueError:"), "h.py")
    assert fixes.verify(CODE, good, finding, "python", rerun)[0] is True


def test_a_model_proposed_diff_is_attached_only_when_verified():
    analysis = analyzers.analyze(CODE, "h.py", "python")
    good = fixes.make_diff(CODE, CODE.replace("except:", "except ValueError:"), "h.py")
    raw = f"Summary: x\n```diff\n{good}```\n"
    merged = merge_review([], analysis, CODE, path="h.py", language="python", is_diff=False, raw_text=raw)
    bare = next(f for f in merged if f["rule_id"] == "E722")
    assert bare["fix"] == good  # the model's verified diff is tried first


def test_masking_leaves_rule_messages_alone():
    msg = "secret compared with '=='; compare hashes with hmac.compare_digest"
    assert mask_secrets(msg) == msg
    assert "hunter2secret" not in mask_secrets("Possible hardcoded password: 'hunter2secret'")


def test_a_model_finding_naming_no_category_beside_an_analyzer_finding_explains_it():
    from domain.review.findings import from_model, make_finding, merge

    bandit = make_finding(line=2, message="Use of eval", source="bandit", category="code_injection",
                          severity="medium", rule_id="B307", confidence=0.9)
    vague = from_model({"line": 2, "severity": "high", "message": "this line is a classic example of a problem"})
    other = from_model({"line": 3, "severity": "low", "message": "the password is hardcoded here"})
    merged = merge([bandit], [vague, other])
    assert [(f["line"], f["category"], f["source"]) for f in merged] == [(2, "code_injection", "bandit"),
                                                                       (3, "hardcoded_secret", "model")]
    assert merged[0]["explanation"] == "this line is a classic example of a problem"


def test_the_headline_counts_the_merged_findings_and_names_the_first_three():
    from domain.review.findings import headline

    fs = [make_finding(line=4, message="eval", source="bandit", category="code_injection", severity="high",
                       rule_id="B307"),
          make_finding(line=1, message="default", source="ruff", category="mutable_default", severity="medium",
                       rule_id="B006"),
          make_finding(line=None, message="naming", source="model", category="style", severity="low"),
          make_finding(line=9, message="x", source="model", category="bug", severity="low")]
    assert headline([]) == "No findings."
    assert headline(fs[:1]) == "1 finding: high code injection at line 4 (bandit B307)."
    assert headline(fs) == ("4 findings: high code injection at line 4 (bandit B307); medium mutable default at line 1 "
                            "(ruff B006); low style (model); and 1 more.")
