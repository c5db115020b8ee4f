"""Suggested fixes, shown only when verified.

A fix is a unified diff of the reviewed file. It is attached to a finding only if
1. it applies cleanly to the code (unidiff parses it and every hunk's context and removed lines match),
2. the patched file still parses (``ast.parse`` for Python), and
3. the finding it targets is gone: the analyzer that found it, run again on the patched file, no longer
   reports that rule (or, for a model finding, no analyzer finding of that category on that line).

Fixes come from the model (a ```diff block in its answer) or from the deterministic rewrites below for a
few rules: ``yaml.load`` → ``yaml.safe_load``, ``eval`` → ``ast.literal_eval``, bare ``except:`` →
``except Exception:``, a mutable default argument → ``None`` plus a check, ``verify=False`` → ``verify=True``.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError


class PatchDoesNotApply(ValueError):
    pass


def make_diff(old: str, new: str, path: str = "code.py") -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"a/{path}", f"b/{path}"))


def apply_diff(code: str, diff: str) -> str:
    """The code with ``diff`` applied; PatchDoesNotApply if a hunk's context or removed lines differ."""
    try:
        patch = PatchSet(diff.splitlines(keepends=True))
    except UnidiffParseError as exc:
        raise PatchDoesNotApply(f"not a unified diff: {exc}") from None
    if len(patch) != 1:
        raise PatchDoesNotApply(f"a fix patches one file, this diff patches {len(patch)}")
    old = code.splitlines()
    out, pos = [], 0
    for hunk in patch[0]:
        start = hunk.source_start - 1 if hunk.source_length else hunk.source_start
        if start < pos or start > len(old):
            raise PatchDoesNotApply(f"hunk at line {hunk.source_start} is out of order or past the end")
        out.extend(old[pos:start])
        pos = start
        for line in hunk:
            if line.is_added:
                out.append(line.value.rstrip("\n"))
                continue
            if pos >= len(old) or old[pos] != line.value.rstrip("\n"):
                raise PatchDoesNotApply(f"line {pos + 1} does not match the patch's context")
            if line.is_context:
                out.append(old[pos])
            pos += 1
    out.extend(old[pos:])
    return "\n".join(out) + ("\n" if code.endswith("\n") else "")


def parses(code: str, language: str | None) -> bool:
    if language != "python":
        return True  # no parser here for other languages: applying cleanly is the check
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


# ---- deterministic rewrites: (finding, code lines) → new code or None ----------------------------

def _on_line(pattern: str, repl: str) -> Callable[[dict, list[str]], list[str] | None]:
    def fix(finding: dict, lines: list[str]) -> list[str] | None:
        i = (finding.get("line") or 0) - 1
        if not 0 <= i < len(lines) or not re.search(pattern, lines[i]):
            return None
        lines = list(lines)
        lines[i] = re.sub(pattern, repl, lines[i], count=1)
        return lines
    return fix


def _add_import(lines: list[str], module: str) -> list[str]:
    if any(re.match(rf"\s*import {module}\b", x) for x in lines):
        return lines
    at = 0
    while at < len(lines) and (lines[at].startswith(("#!", "# -*-", "from __future__")) or not lines[at].strip()):
        at += 1
    return lines[:at] + [f"import {module}"] + lines[at:]


def _literal_eval(finding: dict, lines: list[str]) -> list[str] | None:
    fixed = _on_line(r"(?<![\w.])eval\(", "ast.literal_eval(")(finding, lines)
    return _add_import(fixed, "ast") if fixed else None


def _mutable_default(finding: dict, lines: list[str]) -> list[str] | None:
    i = (finding.get("line") or 0) - 1
    if not 0 <= i < len(lines):
        return None
    m = re.search(r"(\w+)\s*(:\s*[^=,()]+)?=\s*(\[\]|\{\}|list\(\)|dict\(\)|set\(\))", lines[i])
    if not m or not lines[i].rstrip().endswith(":") or "def " not in lines[i]:
        return None
    name, empty = m.group(1), m.group(3)
    empty = {"[]": "[]", "{}": "{}"}.get(empty, empty)
    head = lines[i][:m.start()] + f"{name}{m.group(2) or ''}=None" + lines[i][m.end():]
    body_at = i + 1
    while body_at < len(lines) and not lines[body_at].strip():
        body_at += 1
    if body_at >= len(lines):
        return None
    indent = re.match(r"\s*", lines[body_at]).group(0)
    stripped = lines[body_at].strip()
    if stripped[:3] in ('"""', "'''"):  # keep a docstring first
        quote = stripped[:3]
        if stripped.count(quote) < 2 or len(stripped) < 6:
            body_at = next((j for j in range(body_at + 1, len(lines)) if quote in lines[j]), body_at)
        body_at += 1
    check = f"{indent}{name} = {empty} if {name} is None else {name}"
    return lines[:i] + [head] + lines[i + 1:body_at] + [check] + lines[body_at:]


RULE_FIXES: dict[str, Callable[[dict, list[str]], list[str] | None]] = {
    "B506": _on_line(r"yaml\.load\(([^,()]*(?:\([^()]*\))?[^,()]*)(?:,\s*Loader\s*=\s*[\w.]+)?\)", r"yaml.safe_load(\1)"),
    "B307": _literal_eval,
    "E722": _on_line(r"except\s*:", "except Exception:"),
    "B006": _mutable_default,
    "B501": _on_line(r"verify\s*=\s*False", "verify=True"),
    "B201": _on_line(r"debug\s*=\s*True", "debug=False"),
}


def rule_fix(code: str, finding: dict, path: str = "code.py") -> str | None:
    """A deterministic fix for this finding's rule as a unified diff, or None."""
    rewrite = RULE_FIXES.get(finding.get("rule_id") or "")
    new = rewrite(finding, code.splitlines()) if rewrite else None
    if new is None:
        return None
    new_code = "\n".join(new) + ("\n" if code.endswith("\n") else "")
    return make_diff(code, new_code, path) if new_code != code else None


# ---- verification --------------------------------------------------------------------------------

def still_found(finding: dict, patched: str, language: str | None, findings_after: list[dict]) -> bool:
    """Is the targeted finding still reported on the patched code?"""
    if finding.get("source") != "model" and finding.get("rule_id"):
        return any(f.get("rule_id") == finding["rule_id"] and abs((f.get("line") or 0) - (finding.get("line") or 0)) <= 2
                   for f in findings_after)
    return any(f.get("category") == finding.get("category") and f.get("line") == finding.get("line")
               for f in findings_after)


def verify(code: str, diff: str, finding: dict, language: str | None,
           analyze: Callable[[str, dict], list[dict]]) -> tuple[bool, str]:
    """(verified, why): the fix applies, parses, and ``analyze(patched, finding)`` no longer reports it."""
    try:
        patched = apply_diff(code, diff)
    except PatchDoesNotApply as exc:
        return False, f"does not apply: {exc}"
    if not parses(patched, language):
        return False, "the patched file does not parse"
    if still_found(finding, patched, language, analyze(patched, finding)):
        return False, "the analyzer still reports the finding after the fix"
    return True, "applies, parses, and the finding is gone"


def attach_fixes(code: str, findings: list[dict], language: str | None, analyze: Callable[[str, dict], list[dict]],
                 path: str = "code.py", model_diffs: list[str] = (), limit: int = 5) -> int:
    """Add a verified ``fix`` (a unified diff) to findings that have one; returns how many got one.
    Model-proposed diffs are tried on the finding whose line they touch, rule fixes on their rule."""
    attached = 0
    for f in findings:
        if attached >= limit:
            break
        candidates = [d for d in model_diffs if _touches(d, f.get("line"))]
        if (d := rule_fix(code, f, path)) is not None:
            candidates.append(d)
        for diff in candidates:
            ok, why = verify(code, diff, f, language, analyze)
            if ok:
                f["fix"] = diff
                f["fix_verified"] = why
                attached += 1
                break
    return attached


def _touches(diff: str, line: int | None) -> bool:
    if line is None:
        return False
    try:
        return any(h.source_start <= line < h.source_start + max(1, h.source_length)
                   for pf in PatchSet(diff.splitlines(keepends=True)) for h in pf)
    except UnidiffParseError:
        return False
