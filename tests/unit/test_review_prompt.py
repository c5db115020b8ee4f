"""The review prompt: messages, chat template, and the truncation rule (context chunks first, then the
middle of the code, keeping head and tail with their original line numbers)."""

from __future__ import annotations

import pytest

from domain.errors import InvalidJob
from domain.prompting import (SYSTEM_PROMPT, build_messages, encode, fit_prompt, guess_language, number_lines,
                                  render)

CODE = "import os\n\ndef read(path):\n    return open(path).read()\n"


def test_messages_carry_numbered_code_path_language_and_context():
    chunks = [{"id": "c1", "text": "Use pathlib for paths.", "path": "docs/style.md", "score": 0.9}]
    msgs = build_messages(CODE, "src/io.py", None, False, chunks)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[0]["content"] == SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert "Review this python code from `src/io.py`:" in user
    assert "3| def read(path):" in user and "4|     return open(path).read()" in user
    assert "[1] docs/style.md\nUse pathlib for paths." in user
    assert user.index("Use pathlib") < user.index("def read")


def test_no_context_and_diffs_are_valid():
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a = 1\n+a = 2\n"
    user = build_messages(diff, "x.py", None, True, [])[1]["content"]
    assert "Context" not in user and "unified diff from `x.py`" in user and "```diff" in user
    assert guess_language(None, True) == "diff" and guess_language("a/b.TS") == "typescript"
    assert guess_language("Makefile") is None


def test_chat_template_of_the_model_is_used(tiny_tokenizer):
    text = render(tiny_tokenizer, build_messages(CODE, None, "python", False, []))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = encode(tiny_tokenizer, build_messages(CODE, None, "python", False, []))
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, not its letters


def test_number_lines_marks_the_omitted_middle():
    lines = [f"line{i}" for i in range(1, 11)]
    out = number_lines(lines, omit=(4, 8)).splitlines()
    assert out[:3] == [" 1| line1", " 2| line2", " 3| line3"]
    assert out[3] == "..| ... lines 4-8 omitted (input too long) ..."
    assert out[4:] == [" 9| line9", "10| line10"]


def test_a_prompt_that_fits_is_not_touched(tiny_tokenizer):
    fitted = fit_prompt(tiny_tokenizer, CODE, "a.py", None, False, [], context_window=512, max_new_tokens=64)
    assert not fitted.truncated and fitted.truncation == {}
    assert fitted.input_ids == encode(tiny_tokenizer, fitted.messages)


def test_context_chunks_go_first_lowest_score_first(tiny_tokenizer):
    chunks = [{"id": f"c{i}", "text": "word " * 60, "score": s} for i, s in enumerate([0.2, 0.9, 0.5])]
    full = fit_prompt(tiny_tokenizer, CODE, None, None, False, chunks, context_window=4096, max_new_tokens=0)
    budget = len(full.input_ids) - 30  # one chunk too many
    fitted = fit_prompt(tiny_tokenizer, CODE, None, None, False, chunks, context_window=budget + 10, max_new_tokens=10)
    assert fitted.truncated and fitted.truncation["dropped_chunks"] == ["c0"]
    assert [c["id"] for c in fitted.chunks] == ["c1", "c2"] and fitted.truncation["omitted_lines"] is None
    assert len(fitted.input_ids) <= budget


def test_then_the_middle_of_the_code_keeping_head_and_tail(tiny_tokenizer):
    code = "".join(f"statement_{i} = {i}\n" for i in range(1, 301))
    chunks = [{"id": "c1", "text": "context " * 20, "score": 1.0}]
    fitted = fit_prompt(tiny_tokenizer, code, "big.py", None, False, chunks, context_window=512, max_new_tokens=112)
    t = fitted.truncation
    assert fitted.truncated and t["dropped_chunks"] == ["c1"] and fitted.chunks == []
    first, last = t["omitted_lines"]
    kept_head, kept_tail = first - 1, 300 - last
    assert abs(kept_head - kept_tail) <= 1 and kept_head > 0
    assert len(fitted.input_ids) <= 400 == t["budget_tokens"] and t["prompt_tokens_before"] > 400
    user = fitted.messages[1]["content"]
    assert f"{first - 1}| statement_{first - 1} = " in user and f"{last + 1}| statement_{last + 1} = " in user
    assert f"lines {first}-{last} omitted" in user
    # the most lines that fit: keeping one more line would not fit
    head = (kept_head + kept_tail + 2) // 2
    more = encode(tiny_tokenizer, build_messages(code, "big.py", None, False, [],
                                                 omit=(head + 1, 300 - (kept_head + kept_tail + 1 - head))))
    assert len(more) > 400


def test_no_room_even_without_code_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(InvalidJob, match="max_new_tokens") as err:
        fit_prompt(tiny_tokenizer, CODE, None, None, False, [], context_window=512, max_new_tokens=500)
    assert err.value.field == "max_new_tokens"
