"""One shape for every finding, whoever found it, and the rule that merges analyzer and model findings.

A finding is a dict (it is stored as JSON on the review row)::

    {"rule_id": "B307" | None, "line": 4, "end_line": 4, "severity": "high|medium|low",
     "confidence": 0.0..1.0, "category": "code_injection", "message": "...", "source": "bandit" | "model"}

Categories are the ones a review service reports (injection, XSS, SSRF, broken authentication, session
fixation, sensitive data exposure, hardcoded secrets, security misconfiguration, CORS, path traversal,
insecure deserialization) plus common bug patterns; anything else is ``bug`` or ``style``.

``merge`` keeps one finding per (line, category): an analyzer finding wins over the model's on the same
line and category (it is located by a rule), and takes the model's explanation when the model has one; a
model finding within a line of an analyzer finding whose words name no category is that explanation too.
Messages pass through ``mask_secrets`` so a hardcoded password is never copied into a review.
"""

from __future__ import annotations

import re

from domain.feedback import rule_key

CATEGORIES = (
    "sql_injection", "command_injection", "code_injection", "xss", "ssrf", "broken_auth", "session_fixation",
    "sensitive_data_exposure", "hardcoded_secret", "security_misconfiguration", "cors", "path_traversal",
    "insecure_deserialization", "weak_crypto", "mutable_default", "bare_except", "resource_leak", "off_by_one",
    "bug", "style",
)
SECURITY = frozenset(CATEGORIES[:14])
GENERIC = frozenset({"bug", "style"})  # what a model finding gets when its words name no category
SEVERITY_RANK = {"high": 3, "medium": 2, "low": 1, None: 0}

# words in a model's message → category (the model writes prose, not rule ids)
_CATEGORY_WORDS = [
    ("sql_injection", r"sql"), ("command_injection", r"shell|command injection|os\.system|subprocess"),
    ("code_injection", r"\beval\b|\bexec\b|code injection|arbitrary code"), ("xss", r"xss|cross.site script|escap"),
    ("ssrf", r"ssrf|server.side request"), ("session_fixation", r"session fixation|session id"),
    ("broken_auth", r"authenticat|password check|login"), ("cors", r"cors|allow.origin"),
    ("path_traversal", r"path traversal|directory traversal|\.\./"),
    ("insecure_deserialization", r"pickle|deserializ|yaml\.load|marshal"),
    ("hardcoded_secret", r"hard.?coded|secret|api key|password"),
    ("sensitive_data_exposure", r"sensitive|leak(s|ed)? (data|information)|logs? (the )?password|plaintext"),
    ("security_misconfiguration", r"debug=true|verify=false|misconfig|insecure default|timeout"),
    ("weak_crypto", r"md5|sha1|weak (hash|crypto)|random\b"), ("mutable_default", r"mutable default"),
    ("bare_except", r"bare except|except:|catch(es)? all|broad except"),
    ("resource_leak", r"not closed|never closed|resource leak|context manager|with open"),
    ("off_by_one", r"off.by.one|index ?error|out of range|range\(len"),
]
_CATEGORY_RE = [(c, re.compile(p, re.IGNORECASE)) for c, p in _CATEGORY_WORDS]

_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?:ghp|gho|ghs|github_pat|sk|xox[abp]|glpat)[-_][A-Za-z0-9_\-]{10,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"),
    re.compile(r"\b[A-Fa-f0-9]{32,}\b"), re.compile(r"\b[A-Za-z0-9+/]{40,}={0,2}"),
]
_QUOTED_AFTER_SECRET_WORD = re.compile(
    r"((?:password|passwd|pwd|secret|token|api_?key|credential)[^'\"\n]{0,40}?['\"])([^'\"\s]{4,})(['\"])", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """Replace things that look like credentials with ``***`` (the first two characters kept)."""
    text = _QUOTED_AFTER_SECRET_WORD.sub(lambda m: f"{m.group(1)}{m.group(2)[:2]}***{m.group(3)}", text)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(0)[:4] + "***", text)
    return text


def category_from_text(text: str) -> str:
    for category, pattern in _CATEGORY_RE:
        if pattern.search(text or ""):
            return category
    return "bug"


def make_finding(*, line: int | None, message: str, source: str, category: str, severity: str | None,
                 rule_id: str | None = None, end_line: int | None = None, confidence: float = 0.5, **extra) -> dict:
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of {CATEGORIES}")
    out = {"rule_id": rule_id, "line": line, "end_line": end_line if end_line != line else None,
           "severity": severity if severity in SEVERITY_RANK else "low", "confidence": round(float(confidence), 2),
           "category": category, "message": mask_secrets(message.strip())[:1000], "source": source}
    out.update(extra)
    return out


# "sql_injection: ..." — the category the prompt's analyzer block shows (domain.prompting.analyzer_block), as
# the model copies it back; the word patterns above do not match the underscored names
_NAMED_CATEGORY = re.compile(r"^\W*(" + "|".join(CATEGORIES) + r")\b", re.IGNORECASE)


def from_model(parsed: dict) -> dict:
    """A parsed model finding (domain.review.parse) in the common shape. Its category: the parse's, else a
    category name it starts with, else one guessed from its words."""
    message = parsed.get("message") or ""
    named = _NAMED_CATEGORY.match(message)
    category = (parsed.get("category") if parsed.get("category") in CATEGORIES
                else named.group(1).lower() if named else category_from_text(message))
    return make_finding(line=parsed.get("line"), end_line=parsed.get("end_line"), message=message, source="model",
                        category=category, severity=parsed.get("severity") or "medium",
                        confidence=0.6 if parsed.get("line") else 0.3)


def _near(a: int | None, b: int | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1


def _restates(model: dict, analyzer: dict) -> bool:
    """The model's finding is about the analyzer's: within a line of it, and of its category, citing its rule
    id (the prompt lists each analyzer finding with its rule id, and the model copies it), or naming no
    category at all (``GENERIC``: then it explains the analyzer's finding rather than adding one)."""
    if not _near(model["line"], analyzer["line"]):
        return False
    if model["category"] in GENERIC and analyzer["source"] != "model":
        return True  # the model names no category of its own there: it is explaining the analyzer's finding
    rule = analyzer.get("rule_id")
    return model["category"] == analyzer["category"] or bool(
        rule and re.search(r"(?<![\w-])" + re.escape(rule) + r"(?![\w-])", model["message"]))


def merge(analyzer: list[dict], model: list[dict], suppressed: frozenset[str] = frozenset()) -> list[dict]:
    """Analyzer findings first, then the model's that no analyzer finding covers (``_restates``: same
    category or its rule id cited, within a line), one per (line, category); findings whose rule id is in
    ``suppressed`` are left out, and so is a model finding that restates one of them (the model explaining
    bandit's B104 is still B104, which the tenant asked not to see). Ordered by severity, then confidence,
    then line."""
    merged: list[dict] = []
    hidden = [f for f in analyzer if rule_key(f) in suppressed]
    for f in analyzer:
        if rule_key(f) in suppressed:
            continue
        twin = next((m for m in merged if m["line"] == f["line"] and m["category"] == f["category"]), None)
        if twin is None:
            merged.append(dict(f))
        elif SEVERITY_RANK[f["severity"]] > SEVERITY_RANK[twin["severity"]]:
            twin.update(severity=f["severity"])
    for f in model:
        if rule_key(f) in suppressed:
            continue
        twin = next((m for m in merged if _restates(f, m)), None)
        if twin is not None:
            if twin["source"] != "model" and "explanation" not in twin:
                twin["explanation"] = f["message"]
                twin["confidence"] = min(1.0, round(twin["confidence"] + 0.1, 2))
            continue
        if any(_restates(f, h) for h in hidden):
            continue  # it is a suppressed rule's finding, in the model's words
        if any(m["line"] == f["line"] and m["message"] == f["message"] for m in merged):
            continue  # the model repeated itself
        merged.append(dict(f))
    merged.sort(key=lambda f: (-SEVERITY_RANK[f["severity"]], -f["confidence"], f["line"] or 10**9))
    return merged


def headline(findings: list[dict], shown: int = 3) -> str:
    """The sentence a reader sees first, from the merged findings (not from the model's prose): how many, and
    the first ``shown`` in review order with severity, category, line and who found it."""
    if not findings:
        return "No findings."
    parts = []
    for f in findings[:shown]:
        where = f" at line {f['line']}" if f.get("line") else ""
        who = " ".join(x for x in (f.get("source"), f.get("rule_id")) if x)
        parts.append(f"{f.get('severity') or 'low'} {f['category'].replace('_', ' ')}{where} ({who})")
    more = f"; and {len(findings) - shown} more" if len(findings) > shown else ""
    return f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: " + "; ".join(parts) + more + "."
