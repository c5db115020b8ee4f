"""The review prompt: chat messages built from the code, its path/language and retrieved context, and
the rule that makes a prompt fit the model's context window.

Fitting rule (``fit_prompt``), applied only when the prompt does not fit in
``context window - max_new_tokens`` tokens:
1. drop retrieved context chunks, lowest score first, until it fits or none is left;
2. then drop the middle lines of the code, keeping as many lines as fit, split equally between the
   head and the tail of the file; a marker line names the omitted range, and kept lines keep their
   original numbers so the model's line references stay true.
What was cut is returned in ``FittedPrompt.truncation`` and stored on the review.

``build_messages`` is also used to build training prompts from feedback (domain/adapters): keep its
signature stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Sequence

from domain.errors import InvalidJob

SYSTEM_PROMPT = (
    "You are a meticulous senior code reviewer. Review the code the user gives you: look for bugs, security "
    "problems, unclear names, missing error handling and performance issues.\n"
    "Answer in exactly this format:\n"
    "Summary: <one or two sentences about the code>\n"
    "Findings:\n"
    "- [high|medium|low] line <N>: <the problem and how to fix it>\n"
    "Refer to the line numbers shown at the left of the code. Write 'Findings: none' if there is nothing to fix.")

TRUNCATION_RULE = ("drop context chunks (lowest score first), then the middle lines of the code "
                   "(keep equal head and tail)")

_LANGUAGES = {
    ".py": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".jsx": "javascript", ".go": "go", ".rs": "rust", ".java": "java", ".kt": "kotlin", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp", ".rb": "ruby", ".php": "php", ".swift": "swift",
    ".scala": "scala", ".sh": "bash", ".sql": "sql", ".yaml": "yaml", ".yml": "yaml", ".json": "json",
    ".tf": "terraform", ".lua": "lua", ".r": "r", ".m": "objective-c", ".pl": "perl", ".dart": "dart",
}


def guess_language(path: str | None, is_diff: bool = False) -> str | None:
    if not path:
        return "diff" if is_diff else None
    return _LANGUAGES.get(PurePosixPath(path).suffix.lower(), "diff" if is_diff else None)


def _get(chunk: Any, name: str, default=None):
    return chunk.get(name, default) if isinstance(chunk, dict) else getattr(chunk, name, default)


def number_lines(lines: Sequence[str], omit: tuple[int, int] | None = None) -> str:
    """Code with its 1-based line numbers at the left; lines ``omit=(first, last)`` replaced by a marker."""
    width = len(str(len(lines)))
    out = []
    for i, line in enumerate(lines, start=1):
        if omit and omit[0] <= i <= omit[1]:
            if i == omit[0]:
                out.append(f"{'.' * width}| ... lines {omit[0]}-{omit[1]} omitted (input too long) ...")
            continue
        out.append(f"{i:>{width}}| {line}")
    return "\n".join(out)


def analyzer_block(findings: Sequence[dict], note: str | None = None, limit: int = 20,
                   total: int | None = None) -> list[str]:
    """Prompt lines listing the analyzer stage's findings (most severe first), or saying why there are none.
    ``total``: how many there were, when ``findings`` is only the part that fits in the prompt."""
    total = len(findings) if total is None else total
    if note:
        return [f"Static analysis: {note}.", ""]
    if not findings:
        return ([f"Static analyzers reported {total} findings (not listed: the prompt is full)."] if total else
                ["Static analyzers found nothing on this code."]) + [""]
    lines = ["Static analyzers found these; explain the real ones first, most severe first, then add what they missed:"]
    for f in list(findings)[:limit]:
        lines.append(f"- [{f['severity']}] line {f['line']}: {f['category']}: {f['message']} ({f['rule_id']})")
    if total > min(limit, len(findings)):
        lines.append(f"- ... and {total - min(limit, len(findings))} more of lower severity")
    return lines + [""]


def build_messages(code: str, path: str | None, language: str | None, is_diff: bool,
                   context_chunks: Sequence[Any] = (), *, omit: tuple[int, int] | None = None,
                   analysis: Sequence[dict] | None = None, analysis_note: str | None = None,
                   analysis_total: int | None = None) -> list[dict]:
    """Chat messages asking for a review of ``code``. ``context_chunks`` are retrieved chunks (objects or
    dicts with ``text`` and optionally ``path``/``source``); an empty sequence is a valid case."""
    language = language or guess_language(path, is_diff)
    parts = []
    if context_chunks:
        parts.append("Context from this project's knowledge base (past reviews, code, docs):")
        for n, chunk in enumerate(context_chunks, start=1):
            where = _get(chunk, "path") or _get(chunk, "source") or "context"
            parts.append(f"[{n}] {where}\n{str(_get(chunk, 'text', '')).strip()}")
        parts.append("")
    if analysis is not None or analysis_note:
        parts.extend(analyzer_block(analysis or (), analysis_note, total=analysis_total))
    what = "unified diff" if is_diff else "code"
    title = f"Review this {language + ' ' if language and language != 'diff' else ''}{what}"
    parts.append(f"{title}{f' from `{path}`' if path else ''}:")
    fence = "diff" if is_diff else (language or "")
    parts.append(f"```{fence}\n{number_lines(code.splitlines(), omit)}\n```")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(parts)}]


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt text through the model's chat template (a plain transcript if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return text + "Assistant:"


def encode(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def shared_prefix_len(tokenizer, input_ids: list[int]) -> int:
    """How many leading tokens of a review prompt are the system message that every review shares
    (0 if the prompt does not start with it): the runtime computes their keys/values once."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    system = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}], tokenize=False,
                                           add_generation_prompt=False)
    prefix = tokenizer(system, add_special_tokens=False)["input_ids"]
    return len(prefix) if len(prefix) < len(input_ids) and input_ids[:len(prefix)] == list(prefix) else 0


@dataclass
class FittedPrompt:
    input_ids: list[int]
    messages: list[dict]
    chunks: list[Any]  # the context chunks kept in the prompt
    truncated: bool = False
    truncation: dict = field(default_factory=dict)


def fit_prompt(tokenizer, code: str, path: str | None, language: str | None, is_diff: bool,
               context_chunks: Sequence[Any], *, context_window: int, max_new_tokens: int,
               analysis: Sequence[dict] | None = None, analysis_note: str | None = None) -> FittedPrompt:
    """``_fit`` with the analyzer findings listed in the prompt (most severe first): 20, or fewer when the
    prompt without any code would not fit with 20."""
    listed = list(analysis or ())
    budget = context_window - max_new_tokens
    limits = [n for n in (20, 8, 3, 1) if n <= len(listed)
              and len(encode_text(tokenizer, "\n".join(analyzer_block(listed[:n])))) <= budget // 8] + [0]
    for limit in limits:
        try:
            return _fit(tokenizer, code, path, language, is_diff, context_chunks, context_window=context_window,
                        max_new_tokens=max_new_tokens, analysis=None if analysis is None else listed[:limit],
                        analysis_note=analysis_note, analysis_total=len(listed))
        except InvalidJob:
            if analysis is None or limit == 0:
                raise
    raise AssertionError("unreachable")


def _fit(tokenizer, code: str, path: str | None, language: str | None, is_diff: bool,
         context_chunks: Sequence[Any], *, context_window: int, max_new_tokens: int,
         analysis: Sequence[dict] | None = None, analysis_note: str | None = None,
         analysis_total: int | None = None) -> FittedPrompt:
    """Build the prompt and, if it is longer than ``context_window - max_new_tokens``, cut it by the rule
    in this module's docstring. Raises InvalidJob if even the empty-code prompt cannot fit."""
    budget = context_window - max_new_tokens
    chunks = sorted(context_chunks, key=lambda c: -float(_get(c, "score", 0.0) or 0.0))

    def attempt(kept_chunks, omit=None) -> tuple[list[dict], list[int]]:
        msgs = build_messages(code, path, language, is_diff, kept_chunks, omit=omit, analysis=analysis,
                              analysis_note=analysis_note, analysis_total=analysis_total)
        return msgs, encode(tokenizer, msgs)

    messages, ids = attempt(chunks)
    first_len = len(ids)
    if first_len <= budget:
        return FittedPrompt(ids, messages, list(chunks))

    dropped = []
    while chunks and len(ids) > budget:
        dropped.append(_get(chunks.pop(), "id"))
        messages, ids = attempt(chunks)

    omitted = None
    if len(ids) > budget:
        lines = code.splitlines()
        n = len(lines)

        def omit_for(keep: int) -> tuple[int, int]:
            head = (keep + 1) // 2
            return head + 1, n - (keep - head)

        lo, hi, best = 0, n - 1, None  # binary search: the most kept lines that still fit
        while lo <= hi:
            mid = (lo + hi) // 2
            m_msgs, m_ids = attempt(chunks, omit_for(mid))
            if len(m_ids) <= budget:
                best, lo = (mid, m_msgs, m_ids), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise InvalidJob(
                f"max_new_tokens: the review prompt without any code needs more than {budget} tokens "
                f"(context window {context_window} minus max_new_tokens {max_new_tokens}); lower max_new_tokens",
                field="max_new_tokens")
        keep, messages, ids = best
        omitted = list(omit_for(keep))

    truncation = {"rule": TRUNCATION_RULE, "context_window": context_window, "max_new_tokens": max_new_tokens,
                  "budget_tokens": budget, "prompt_tokens_before": first_len, "prompt_tokens_after": len(ids),
                  "dropped_chunks": dropped, "omitted_lines": omitted}
    return FittedPrompt(ids, messages, list(chunks), truncated=True, truncation=truncation)
