"""The stop rule for review answers and the n-gram ban, on text and token lists (no model)."""

from __future__ import annotations

import pytest
import torch

from domain.review.decoding import DecodeControl, cut_at_stop, next_token, review_finished


@pytest.mark.parametrize("text, finished", [
    ("Summary: fine.\nFindings:\n- [high] line 3: eval\n- [low] line 5: name\n\nMore text", True),
    ("Summary: fine.\nFindings:\n- [high] line 3: eval\n- [low] line 5: na", False),  # a bullet being written
    ("Summary: fine.\nFindings: none\n", True),
    ("Summary: fine.\nFindings:\n\n- [high] line 3: eval", False),  # blank before the first bullet
    ("Summary: the code adds numbers.\nThe code adds numbers.\nThe code adds numbers.\n", True),  # a repeated line
    ("Summary: ok\nFindings:\n- [low] line 1: x\nEnd of review.", True),
])
def test_review_finished(text, finished):
    assert review_finished(text) is finished


def test_next_token_bans_a_repeated_ngram_and_cut_at_stop():
    logits = torch.tensor([0.0, 5.0, 1.0, 0.5])
    assert next_token(logits, [1, 2, 1], DecodeControl(no_repeat_ngram=2)) == 1  # (1, 1) never seen
    assert next_token(logits, [1, 1, 3, 1], DecodeControl(no_repeat_ngram=2)) == 2  # (1, 1) was: 1 banned
    assert next_token(logits, [1, 1, 3, 1], None) == 1
    assert cut_at_stop([5, 6, 7, 8], DecodeControl(stop=lambda h: h[-1] == 7)) == [5, 6, 7]
