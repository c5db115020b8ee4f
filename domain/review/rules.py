"""Rule ids → categories, and Foundry's own line rules for what ruff and bandit do not look for.

The line rules are regular expressions over one line at a time (comments stripped), written for the
categories the Python analyzers leave out: CORS wildcards, SSRF (a request to a URL taken from the request),
path traversal (a path joined from user input), XSS (HTML built from user input), session fixation, broken
authentication (a password compared with ``==``), sensitive data in logs, and ``range(len(x) + 1)``
off-by-one loops. They run for every language in ``LANGUAGES``; each finding says ``source="foundry-rules"``.
"""

from __future__ import annotations

import re

from domain.review.findings import CATEGORIES, make_finding

BANDIT = {
    "B608": "sql_injection", "B610": "sql_injection", "B611": "sql_injection",
    "B102": "code_injection", "B307": "code_injection",
    "B404": "command_injection", "B601": "command_injection", "B602": "command_injection",
    "B603": "command_injection", "B604": "command_injection", "B605": "command_injection",
    "B606": "command_injection", "B607": "command_injection", "B609": "command_injection",
    "B105": "hardcoded_secret", "B106": "hardcoded_secret", "B107": "hardcoded_secret",
    "B301": "insecure_deserialization", "B302": "insecure_deserialization", "B403": "insecure_deserialization",
    "B506": "insecure_deserialization", "B614": "insecure_deserialization", "B615": "insecure_deserialization",
    "B310": "ssrf", "B202": "path_traversal", "B108": "security_misconfiguration",
    "B201": "security_misconfiguration", "B104": "security_misconfiguration", "B113": "security_misconfiguration",
    "B501": "security_misconfiguration", "B502": "security_misconfiguration", "B503": "security_misconfiguration",
    "B504": "security_misconfiguration", "B507": "security_misconfiguration", "B103": "security_misconfiguration",
    "B701": "xss", "B702": "xss", "B703": "xss", "B308": "xss", "B704": "xss",
    "B303": "weak_crypto", "B304": "weak_crypto", "B305": "weak_crypto", "B311": "weak_crypto",
    "B324": "weak_crypto", "B505": "weak_crypto", "B110": "bare_except", "B112": "bare_except",
    "B320": "xss", "B313": "insecure_deserialization", "B314": "insecure_deserialization",
    "B405": "insecure_deserialization", "B408": "insecure_deserialization", "B410": "insecure_deserialization",
}
RUFF = {"B006": ("mutable_default", "medium"), "B008": ("mutable_default", "low"),
        "E722": ("bare_except", "medium"), "BLE001": ("bare_except", "low"),
        "SIM115": ("resource_leak", "medium"), "F821": ("bug", "high"), "F811": ("bug", "medium"),
        "F841": ("style", "low"), "invalid-syntax": ("bug", "high")}


def bandit_category(test_id: str) -> str:
    return BANDIT.get(test_id, "bug")


def bandit_rule_of(code: str) -> str | None:
    """The bandit check a ruff rule is (ruff's flake8-bandit ``S`` rules are bandit's, numbered alike: S310 is
    B310), or None (ruff's ``B`` rules are flake8-bugbear's, not bandit's)."""
    code = code.upper()
    return "B" + code[1:] if code.startswith("S") and code[1:].isdigit() else None


def ruff_category(code: str) -> tuple[str, str]:
    """(category, severity) of a ruff rule; ruff's ``S`` rules are bandit's (``bandit_rule_of``)."""
    if code in RUFF:
        return RUFF[code]
    if bandit := bandit_rule_of(code):
        return bandit_category(bandit), "medium"
    if code.startswith(("E9", "PLE", "F")):
        return "bug", "medium"
    return ("bug" if code.startswith("B") else "style"), "low"


def category_of(name: str | None) -> str:
    name = (name or "").strip().lower().replace(" ", "_").replace("-", "_")
    return name if name in CATEGORIES else "bug"


LANGUAGES = ("python", "javascript", "typescript", "go", "java", "ruby", "php")
_USER = r"(?:request\.(?:args|form|values|json|GET|POST|query_params|params|cookies|headers)|req\.(?:query|body|params)|params\[|user_input)"

LINE_RULES = [  # (rule id, category, severity, pattern, message)
    ("FR-CORS1", "cors", "high",
     r"(?:Access-Control-Allow-Origin['\"]?\]?\s*[,:=]\s*['\"]\*|allow_origins\s*=\s*\[\s*['\"]\*|origins\s*=\s*['\"]\*|CORS_ORIGIN_ALLOW_ALL\s*=\s*True|CORS_ALLOW_ALL_ORIGINS\s*=\s*True)",
     "CORS allows every origin ('*'); list the trusted origins instead"),
    ("FR-CORS2", "cors", "high", r"Access-Control-Allow-Origin['\"]?\]?\s*[,:=]\s*(?:\w+\.)*(?:headers|META)",
     "CORS reflects the request's Origin header: any site can read authenticated responses"),
    ("FR-SSRF1", "ssrf", "high", r"(?:requests|httpx|urllib\.request|session)\.(?:get|post|put|request|urlopen)\(\s*" + _USER,
     "request to a URL taken from user input (SSRF); allow-list hosts before fetching"),
    ("FR-PATH1", "path_traversal", "high",
     r"(?:open|send_file|os\.path\.join|Path)\([^)]*" + _USER,
     "file path built from user input (path traversal); resolve it and check it stays inside the base folder"),
    ("FR-XSS1", "xss", "high", r"(?:<\w+[^>]*>['\"]?\s*(?:\+|%|\.format)|f['\"][^'\"]*<\w+[^'\"]*\{)[^\n]*" + _USER,
     "HTML built from user input without escaping (XSS); escape it or use a template with autoescape"),
    ("FR-XSS2", "xss", "high", r"(?:innerHTML\s*=|document\.write\(|Markup\(|mark_safe\()[^\n]*" + _USER,
     "user input written into the page as HTML (XSS)"),
    ("FR-SESS1", "session_fixation", "high",
     r"session\[['\"](?:session_?id|sid)['\"]\]\s*=\s*" + _USER,
     "session id taken from the request (session fixation); issue a new session id at login"),
    ("FR-AUTH1", "broken_auth", "high", r"(?:password|passwd|token)\w*['\"]?\]?\s*==\s*\w|\w\s*==\s*\w*(?:password|passwd)\b",
     "secret compared with '=='; compare hashes with hmac.compare_digest (timing attack, plaintext passwords)"),
    ("FR-AUTH2", "broken_auth", "high", r"verify_signature['\"]?\s*[:=]\s*False|algorithms\s*=\s*\[\s*['\"]none['\"]",
     "token signature not verified (broken authentication)"),
    ("FR-LOG1", "sensitive_data_exposure", "medium",
     r"(?:log(?:ger|ging)?\.\w+|print)\([^)]*\b(?:password|passwd|secret|token|ssn|credit_card)\b",
     "sensitive data written to logs or output"),
    ("FR-OBO1", "off_by_one", "medium", r"range\(\s*(?:0\s*,\s*)?len\([^)]*\)\s*\+\s*1\s*\)",
     "range(len(x) + 1) runs one index past the end (off-by-one)"),
    ("FR-OBO2", "off_by_one", "medium", r"\[\s*len\(([^)]*)\)\s*\]",
     "x[len(x)] is one past the last element (off-by-one); the last index is len(x) - 1"),
    ("FR-OBO3", "off_by_one", "medium", r"\w\s*<=\s*len\([^)]*\)\s*(?::|\)|;|&&|and)",
     "i <= len(x) lets the index reach len(x) (off-by-one); use <"),
]
_COMPILED = [(rid, cat, sev, re.compile(p), msg) for rid, cat, sev, p, msg in LINE_RULES]
_COMMENT = re.compile(r"^\s*(?:#|//|\*|/\*)")


def scan(code: str) -> list[dict]:
    """Findings of the line rules in ``code``."""
    found = []
    for n, line in enumerate(code.splitlines(), start=1):
        if _COMMENT.match(line):
            continue
        for rid, cat, sev, pattern, msg in _COMPILED:
            if pattern.search(line):
                found.append(make_finding(rule_id=rid, line=n, message=msg, source="foundry-rules", category=cat,
                                          severity=sev, confidence=0.7))
    return found
