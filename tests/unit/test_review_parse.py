"""Parsing a model's review answer into summary + findings with line references."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.review.parse import parse_review, without_repeats


def test_the_requested_format():
    text = ("Summary: add() subtracts instead of adding.\n"
            "Findings:\n"
            "- [high] line 2: returns a - b; use a + b\n"
            "- [low] lines 5-6: div has no docstring\n"
            "- [medium] no type hints anywhere\n")
    r = parse_review(text, n_lines=6)
    assert r.summary == "add() subtracts instead of adding."
    assert r.findings == [
        {"line": 2, "end_line": None, "severity": "high", "message": "returns a - b; use a + b"},
        {"line": 5, "end_line": 6, "severity": "low", "message": "div has no docstring"},
        {"line": None, "end_line": None, "severity": "medium", "message": "no type hints anywhere"},
    ]


def test_drifting_small_model_output():
    text = ("**Summary:** The function works\nbut is slow.\n\n"
            "Issues:\n* Warning: L12 loops twice over the list,\n  consider a set\n1. nit - naming on line 3\n")
    r = parse_review(text, n_lines=20)
    assert r.summary == "The function works but is slow."
    assert r.findings[0]["line"] == 12 and r.findings[0]["severity"] == "medium"
    assert r.findings[0]["message"].endswith("consider a set")
    assert r.findings[1] == {"line": 3, "end_line": None, "severity": "low", "message": "naming on line 3"}


def test_json_answers_and_out_of_range_lines():
    text = 'Here: {"summary": "ok", "findings": [{"line": 99, "severity": "critical", "message": "x"}, "line 2: unused name"]}'
    r = parse_review(text, n_lines=10)
    assert r.summary == "ok"
    assert r.findings == [{"line": None, "end_line": None, "severity": "high", "message": "x"},
                          {"line": 2, "end_line": None, "severity": None, "message": "unused name"}]


def test_none_and_unlabelled_answers():
    assert parse_review("Summary: clean code.\nFindings: none").findings == []
    r = parse_review("Looks fine overall.\nNothing else to say.")
    assert r.summary == "Looks fine overall. Nothing else to say." and r.findings == []
    assert parse_review("").summary == ""


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400), st.integers(min_value=1, max_value=50))
def test_any_text_parses_and_line_refs_stay_in_the_code(text, n_lines):
    r = parse_review(text, n_lines=n_lines)
    assert isinstance(r.summary, str)
    for f in r.findings:
        assert f["message"]
        assert f["line"] is None or 1 <= f["line"] <= n_lines
        assert f["end_line"] is None or f["line"] <= f["end_line"] <= n_lines


def test_bullets_left_empty_after_their_line_are_not_findings():
    """SmolLM2 sometimes lists "- [high] line 5:", "- [high] line 6:", ... past the end of the file: no message,
    no finding (they were stored as findings without a line and counted as false ones)."""
    text = "This code has a problem:\n- [high] line 5:\n- [high] line 9:\n- [low] line 2: name is unclear\n- [high] line 3 -"
    parsed = parse_review(text, n_lines=6)
    assert [(f["line"], f["message"]) for f in parsed.findings] == [(2, "name is unclear")]


def test_the_format_line_echoed_back_and_wordless_bullets_are_not_findings():
    text = ("Summary: fine.\nFindings:\n- [high|medium|low] line 1: `1| 2| 3`\n- [high|medium|low] line\n"
            "- [low] line <N>: <the problem and how to fix it>\n- [medium] line 2: `1| 2`\n"
            "- [high] line 3: eval of user input; use ast.literal_eval\n")
    parsed = parse_review(text, n_lines=5)
    assert [(f["line"], f["severity"]) for f in parsed.findings] == [(3, "high")]


def test_bullets_cut_off_by_the_token_limit_are_not_findings():
    text = "Findings:\n- [high] line 2: pickle.loads of request data\n- [low] line \n- [\n- [high|"
    assert [f["line"] for f in parse_review(text, n_lines=5).findings] == [2]


def test_a_summary_says_a_sentence_once_and_an_unlabelled_answer_keeps_its_first_paragraph():
    looping = ("The code is missing a line of code that is supposed to return the user's ID. This is a common issue "
               "in Python, and it's not possible to return a user ID without a cookie.\n\nThe code is also missing a "
               "line of code that is supposed to return the current user's ID. This is a common issue in Python and "
               "is not possible to return a user ID without a cookie.")
    r = parse_review(looping)
    assert r.summary == ("The code is missing a line of code that is supposed to return the user's ID. This is a "
                         "common issue in Python, and it's not possible to return a user ID without a cookie.")
    r = parse_review("Summary: eval runs input. eval runs input. It is dangerous.\nFindings:\n- line 1: eval")
    assert r.summary == "eval runs input. It is dangerous." and len(r.findings) == 1
    assert without_repeats("Use a context manager. Close the file. Use a context manager!") == \
        "Use a context manager. Close the file."
    assert without_repeats("It fails on empty lists. It fails on long lists.") == \
        "It fails on empty lists. It fails on long lists."  # different words: both stay
