"""Decoding that stops: per-row repetition control and a stop rule, applied inside the greedy decode loop.

Each row of a batch carries its own ``DecodeControl`` (or None: plain greedy). ``next_token`` looks only at
that row's logits and that row's generated tokens, so a row decoded in a batch picks exactly the tokens it
picks decoded alone.

- ``no_repeat_ngram``: a token that would complete an n-gram (of generated tokens) already generated is
  banned (as Hugging Face's ``no_repeat_ngram_size``, but over the answer only, not the prompt). Large
  enough (12 by default) that the review format's own repeats ("- [high] line") stay possible.
- ``stop(token_ids) -> bool``: the row ends when it returns True; ``review_stop`` ends a review when its
  findings list has ended, when it wrote "End of review", or when it starts repeating a line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

NO_REPEAT_NGRAM = 12


@dataclass
class DecodeControl:
    no_repeat_ngram: int = NO_REPEAT_NGRAM
    stop: Callable[[list[int]], bool] | None = None


def banned_tokens(history: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``history``."""
    if n <= 0 or len(history) < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix}


def next_token(logits: torch.Tensor, history: list[int], control: DecodeControl | None) -> int:
    """The greedy token for one row's last-position logits, after its repetition control."""
    if control is not None and control.no_repeat_ngram:
        banned = banned_tokens(history, control.no_repeat_ngram)
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
    return int(logits.argmax())


def next_tokens(logits: torch.Tensor, histories: list[list[int]], controls: list[DecodeControl | None]) -> list[int]:
    """``next_token`` for each row of a [rows, vocab] tensor (a plain argmax when no row has a control)."""
    if not any(controls):
        return logits.argmax(-1).tolist()
    return [next_token(logits[j], h, c) for j, (h, c) in enumerate(zip(histories, controls))]


def should_stop(history: list[int], control: DecodeControl | None) -> bool:
    return control is not None and control.stop is not None and control.stop(history)


_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")
_FINDINGS = re.compile(r"^\s*(?:\*\*|#+\s*)?(?:findings|issues)\b", re.IGNORECASE)
_END = re.compile(r"end of (?:review|findings)", re.IGNORECASE)
_NONE = re.compile(r"^\s*(?:\*\*|#+\s*)?findings(?:\*\*)?\s*:?\s*(?:none|no (?:issues|findings))", re.IGNORECASE)


def review_finished(text: str) -> bool:
    """True once a review answer is complete: 'End of review' written; 'Findings: none'; the findings list
    followed by a blank line; or a complete line that repeats an earlier one."""
    if _END.search(text):
        return True
    lines = text.split("\n")
    complete = lines[:-1]  # the last element is still being written
    seen, in_findings, bullets = set(), False, 0
    for i, line in enumerate(complete):
        if _NONE.match(line):
            return True
        if _FINDINGS.match(line):
            in_findings = True
        elif _BULLET.match(line):
            bullets += 1
        elif not line.strip() and in_findings and bullets:
            return True
        key = line.strip()
        if len(key) > 8 and key in seen:
            return True
        seen.add(key)
    return False


def review_stop(decode: Callable[[list[int]], str]) -> Callable[[list[int]], bool]:
    """A stop rule for review answers, checked only when the newest token ends a line."""
    def stop(history: list[int]) -> bool:
        return bool(history) and "\n" in decode(history[-1:]) and review_finished(decode(history))
    return stop


def cut_at_stop(tokens: list[int], control: DecodeControl | None) -> list[int]:
    """For a path that cannot stop early (Hugging Face ``generate``): the tokens up to where the rule stops."""
    if control is None or control.stop is None:
        return tokens
    for j in range(1, len(tokens) + 1):
        if control.stop(tokens[:j]):
            return tokens[:j]
    return tokens
