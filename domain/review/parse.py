"""Turn the model's answer into a structured review: a summary and findings with line references.

The prompt asks for ``Summary: ...`` then ``Findings:`` and one ``- [severity] line N: message`` bullet
per finding, but small models drift: this parser also accepts a JSON object with ``summary``/``findings``,
bullets without a header, ``L12``/``lines 3-5``/``line 7`` anywhere in a bullet, and answers without
labels (the first paragraph becomes the summary). Line numbers outside the reviewed code are dropped
(the finding is kept without a line). A summary never says one sentence twice (``without_repeats``). The
raw text is always stored next to the parse.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SEVERITIES = {
    "critical": "high", "blocker": "high", "high": "high", "major": "high", "error": "high", "bug": "high",
    "security": "high", "medium": "medium", "moderate": "medium", "warning": "medium", "warn": "medium",
    "low": "low", "minor": "low", "nit": "low", "style": "low", "info": "low", "suggestion": "low",
}

_SUMMARY = re.compile(r"^\s*(?:\*\*|#+\s*)?summary(?:\*\*)?\s*:?\s*(?:\*\*)?\s*(.*)$", re.I)
_FINDINGS = re.compile(r"^\s*(?:\*\*|#+\s*)?(?:findings|issues|problems)(?:\*\*)?\s*:?\s*(?:\*\*)?\s*(.*)$", re.I)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*)$")
_LINE_REF = re.compile(r"\b(?:lines?|L)\s*#?(\d+)(?:\s*(?:-|–|to)\s*L?(\d+))?", re.I)
_SEVERITY = re.compile(r"^\s*[\[(]?\s*(" + "|".join(SEVERITIES) + r")\s*[\])]?\s*[:\-–]?\s*", re.I)
_NONE = re.compile(r"^\s*(?:none|no (?:issues|findings|problems)|n/?a)\b", re.I)
# the prompt's own format line echoed back ("- [high|medium|low] line <N>: <the problem ...>"): not a finding
_TEMPLATE = re.compile(r"\[\s*high\s*\||<N>|<the problem", re.I)
_WORDS = re.compile(r"[A-Za-z]{2,}")


@dataclass
class ParsedReview:
    summary: str
    findings: list[dict] = field(default_factory=list)  # {line, end_line, severity, message}


def _line_ref(text: str, n_lines: int | None) -> tuple[int | None, int | None]:
    m = _LINE_REF.search(text)
    if not m:
        return None, None
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else None
    if n_lines is not None and not 1 <= start <= n_lines:
        return None, None
    if end is not None and (end < start or (n_lines is not None and end > n_lines)):
        end = None
    return start, end


def finding(text: str, n_lines: int | None = None, severity: str | None = None) -> dict | None:
    """One finding from one bullet's text (None for an empty or 'none' bullet)."""
    text = text.strip()
    if _TEMPLATE.search(text):
        return None
    m = _SEVERITY.match(text)
    if m:
        severity = SEVERITIES[m.group(1).lower()]
        text = text[m.end():]
    if not text or _NONE.match(text):
        return None
    line, end = _line_ref(text, n_lines)
    rest = re.sub(r"^\s*(?:on\s+)?" + _LINE_REF.pattern + r"\s*[:\-–,]?\s*", "", text, count=1, flags=re.I)
    if not any(w.lower() not in ("line", "lines") for w in _WORDS.findall(rest)):
        return None  # "- [high] line 7:", "- [low] line", "- [" or "`1| 2| 3`": a bullet with no word says nothing
    if line is not None:  # "line 12: message" → "message"
        text = rest or text
    return {"line": line, "end_line": end, "severity": severity, "message": text.strip()}


def _from_json(text: str, n_lines: int | None) -> ParsedReview | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except ValueError:
        return None
    if not isinstance(obj, dict) or not ({"summary", "findings"} & obj.keys()):
        return None
    findings = []
    for item in obj.get("findings") or []:
        if isinstance(item, str):
            f = finding(item, n_lines)
        elif isinstance(item, dict):
            msg = str(item.get("message") or item.get("comment") or item.get("text") or "").strip()
            sev = SEVERITIES.get(str(item.get("severity", "")).lower())
            line = item.get("line")
            line = int(line) if isinstance(line, (int, str)) and str(line).isdigit() else None
            if line is not None and n_lines is not None and not 1 <= line <= n_lines:
                line = None
            f = {"line": line, "end_line": None, "severity": sev, "message": msg} if msg else None
        else:
            f = None
        if f:
            findings.append(f)
    return ParsedReview(summary=str(obj.get("summary") or "").strip(), findings=findings)


def parse_review(text: str, n_lines: int | None = None) -> ParsedReview:
    """Parse a review answer; ``n_lines`` (lines of the reviewed code) bounds the line references."""
    parsed = _from_json(text, n_lines)
    if parsed is not None:
        return parsed
    summary_parts: list[str] = []
    findings: list[dict] = []
    section = None  # None (before any label) | "summary" | "findings"
    loose: list[str] = []  # the first unlabelled paragraph before any section
    loose_done = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if m := _SUMMARY.match(line):
            section = "summary"
            if m.group(1).strip():
                summary_parts.append(m.group(1).strip())
            continue
        if m := _FINDINGS.match(line):
            section = "findings"
            rest = m.group(1).strip()
            if rest and not _NONE.match(rest) and (f := finding(rest, n_lines)):
                findings.append(f)
            continue
        if m := _BULLET.match(line):
            if section != "summary" or summary_parts:
                if f := finding(m.group(1), n_lines):
                    findings.append(f)
                section = section or "findings"
                continue
        if not line.strip():
            if section == "summary" and summary_parts:
                section = "after-summary"
            continue
        if section == "summary":
            summary_parts.append(line.strip())
        elif section == "findings" and findings:
            findings[-1]["message"] += " " + line.strip()  # a bullet wrapped onto the next line
        elif section is None and not loose_done:
            loose.append(line.strip())
        if section is None and loose and not raw.strip():
            loose_done = True
    summary = " ".join(summary_parts) or " ".join(loose)
    return ParsedReview(summary=without_repeats(summary.strip())[:4000], findings=findings)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def without_repeats(text: str, overlap: float = 0.8) -> str:
    """``text`` without the sentences that say again what an earlier one said: the same words, or at least
    ``overlap`` of their words shared (Jaccard, sentences of five words or more). Small models loop on one
    sentence ("This is a common issue in Python ..."); a summary says it once."""
    kept: list[tuple[str, frozenset[str]]] = []
    for sentence in _SENTENCE_END.split(text):
        words = [w.lower() for w in _WORDS.findall(sentence)]
        bag = frozenset(words)
        if any(bag == seen or (len(words) >= 5 and len(bag & seen) >= overlap * len(bag | seen)) for _, seen in kept):
            continue
        kept.append((sentence, bag))
    return " ".join(s for s, _ in kept)
