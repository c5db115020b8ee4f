"""The analyzer stage of a review: real analyzers run on the code before the model sees it.

    analyze(code, path, language, is_diff) → Analysis(findings, stages, skipped, supported)

- Python: ruff (bug-pattern rules) and bandit (security), each a subprocess on a temporary copy of the code,
  with a wall-clock timeout, CPU-time and address-space limits (``resource.setrlimit`` in the child), no
  configuration files read (``--isolated``), an environment without proxies or credentials, JSON output.
  Neither tool opens a network connection.
- Every language: Foundry's own line rules (domain.review.rules) and semgrep with the local rule files in
  ``FOUNDRY_SEMGREP_RULES`` when the ``semgrep`` executable is installed (skipped, with the reason, if not).
- A check the code's author waived is not reported by another tool either: ``# noqa: S310`` (ruff's name of
  bandit's B310) also waives bandit's B310 on that line; what was left out is stored (``waived``).
- A diff is analyzed as the changed files' new side: each hunk's lines are put back at their line numbers in
  the new file and only findings on added lines are kept, numbered as lines of the diff the model is shown.
- Bad input: binary, minified or generated code is not analyzed (``skipped`` says why); an analyzer that
  crashes or times out records its error in its stage and the others' findings are still used; a language
  with no analyzer is ``supported=False`` and the review is model-only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from domain.prompting import guess_language
from domain.review import rules
from domain.review.findings import make_finding

BIN = Path(sys.executable).parent
RUFF_SELECT = "F,E7,E9,B,SIM115,PLE,BLE001"  # security is bandit's
RUFF_IGNORE = "F401,E701,E702,E731,E741,B905"
BANDIT_SKIP = "B101,B403,B404,B603,B607"  # assert, "consider the implications of importing", list-form subprocess,
# a program found on PATH


@dataclass
class Limits:
    timeout_s: float = 20.0
    memory_mb: int = 1024
    cpu_s: int = 20


@dataclass
class Stage:
    name: str
    status: str  # ok | skipped | error | timeout
    seconds: float = 0.0
    findings: int = 0
    reason: str | None = None


@dataclass
class Analysis:
    findings: list[dict] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    skipped: str | None = None  # why the code was not analyzed at all
    supported: bool = True  # an analyzer exists for this language
    waived: list[dict] = field(default_factory=list)  # findings left out by the code's own waiver comment
    suppressed: list[dict] = field(default_factory=list)  # findings of rules the tenant suppressed (not prompted)

    def record(self) -> dict:
        """What the review stores about this stage."""
        return {"supported": self.supported, "skipped": self.skipped,
                "stages": [vars(s) for s in self.stages], "waived": list(self.waived),
                "suppressed": [{k: f[k] for k in ("rule_id", "line", "source", "path") if k in f}
                               for f in self.suppressed]}  # path: a diff's file


# ---- waivers in the code ------------------------------------------------------------------------

_NOQA = re.compile(r"#\s*noqa\s*:\s*([A-Z]+[0-9]+(?:[\s,]+[A-Z]+[0-9]+)*)", re.IGNORECASE)


def waived_bandit_rules(code: str) -> dict[int, frozenset[str]]:
    """Per line, the bandit rules its ``# noqa: S310, ...`` comment waives. Ruff's flake8-bandit rules are
    bandit's, numbered alike (S310 is B310), and ruff honours the comment for its own rule: a line whose
    author waived S310 has waived the check, whichever tool runs it, so bandit's B310 there is not reported
    either. Only ``S`` codes count (ruff's ``B`` codes are flake8-bugbear's, not bandit's); a bare ``# noqa``
    waives nothing here; bandit honours its own ``# nosec`` itself."""
    out = {}
    for n, line in enumerate(code.splitlines(), start=1):
        if "noqa" in line.lower() and (m := _NOQA.search(line)):  # as ruff reads it, in any case
            if waived := frozenset(filter(None, map(rules.bandit_rule_of, re.split(r"[\s,]+", m.group(1))))):
                out[n] = waived
    return out


def _without_waived(code: str, result: Analysis) -> None:
    """Move the bandit findings that the code's own comments waive (``waived_bandit_rules``) from
    ``result.findings`` to ``result.waived`` (stored with the review, so an operator sees what was left out)."""
    waived = waived_bandit_rules(code)
    if not waived:
        return
    kept = []
    for f in result.findings:
        if f["source"] == "bandit" and f["rule_id"] in waived.get(f["line"], ()):
            result.waived.append({"rule_id": f["rule_id"], "line": f["line"], "source": "bandit",
                                  "by": f"noqa: S{f['rule_id'][1:]}"})
        else:
            kept.append(f)
    result.findings = kept


class AnalyzerError(RuntimeError):
    pass


# ---- bad input -----------------------------------------------------------------------------------

_GENERATED = re.compile(r"@generated|do not edit|auto-?generated|generated by (?:the )?\w+", re.IGNORECASE)


def screen(code: str, path: str | None) -> str | None:
    """Why this code should not be analyzed (binary, minified, generated), or None."""
    sample = code[:20_000]
    if "\x00" in sample or sum(ord(c) < 32 and c not in "\t\n\r\f\v" for c in sample) > 0.01 * max(1, len(sample)):
        return "binary content"
    lines = code.splitlines() or [""]
    name = (path or "").lower()
    if re.search(r"\.min\.(js|css)$", name) or (max(map(len, lines)) > 1000 and len(code) / len(lines) > 300):
        return "minified (very long lines)"
    if _GENERATED.search("\n".join(lines[:5])) or re.search(r"(_pb2\.py|\.pb\.go|\.g\.dart)$", name):
        return "generated file (header or file name says so)"
    return None


# ---- subprocess with limits ----------------------------------------------------------------------

def _limit(limits: Limits) -> Callable[[], None]:
    def preexec() -> None:
        mem = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    return preexec


def _clean_env() -> dict:
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(NO_PROXY="*", no_proxy="*", SEMGREP_SEND_METRICS="off", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_tool(cmd: list[str], limits: Limits, ok_codes=(0, 1)) -> str:
    """stdout of an analyzer; AnalyzerError if it fails, TimeoutError if it runs past its time limit."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limits.timeout_s, env=_clean_env(),
                              preexec_fn=_limit(limits), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{Path(cmd[0]).name} ran past {limits.timeout_s} s") from None
    if proc.returncode not in ok_codes:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise AnalyzerError(f"{Path(cmd[0]).name} exited with {proc.returncode}: {' | '.join(tail)[:500]}")
    return proc.stdout


def _tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


# ---- the analyzers -------------------------------------------------------------------------------

def _ruff(file: Path, limits: Limits) -> list[dict]:
    out = run_tool([_tool("ruff"), "check", "--isolated", "--no-cache", "--select", RUFF_SELECT, "--ignore",
                    RUFF_IGNORE, "--output-format", "json", "--exit-zero", str(file)], limits)
    found = []
    for item in json.loads(out or "[]"):
        code = item.get("code") or "invalid-syntax"
        category, severity = rules.ruff_category(code)
        found.append(make_finding(rule_id=code, line=item["location"]["row"], end_line=item["end_location"]["row"],
                                  message=item.get("message", ""), source="ruff", category=category,
                                  severity=severity, confidence=0.9))
    return found


def _bandit(file: Path, limits: Limits) -> list[dict]:
    out = run_tool([_tool("bandit"), "-f", "json", "-q", "-s", BANDIT_SKIP, str(file)], limits)
    report = json.loads(out)
    if report.get("errors"):
        raise AnalyzerError(f"bandit: {report['errors'][0].get('reason', 'error')}")
    found = []
    for item in report.get("results", []):
        rng = item.get("line_range") or [item["line_number"]]
        confidence = {"HIGH": 0.9, "MEDIUM": 0.7, "LOW": 0.4}.get(item.get("issue_confidence"), 0.5)
        found.append(make_finding(rule_id=item["test_id"], line=item["line_number"], end_line=max(rng),
                                  message=item.get("issue_text", ""), source="bandit",
                                  category=rules.bandit_category(item["test_id"]),
                                  severity=item.get("issue_severity", "LOW").lower(), confidence=confidence))
    return found


def _semgrep(file: Path, limits: Limits) -> list[dict]:
    config = os.environ.get("FOUNDRY_SEMGREP_RULES")
    out = run_tool([_tool("semgrep"), "scan", "--config", config, "--json", "--metrics", "off", "--quiet",
                    "--disable-version-check", str(file)], limits)
    found = []
    for item in json.loads(out).get("results", []):
        extra = item.get("extra", {})
        found.append(make_finding(rule_id=item.get("check_id"), line=item["start"]["line"],
                                  end_line=item["end"]["line"], message=extra.get("message", ""), source="semgrep",
                                  category=rules.category_of(extra.get("metadata", {}).get("category")),
                                  severity={"ERROR": "high", "WARNING": "medium"}.get(extra.get("severity"), "low"),
                                  confidence=0.8))
    return found


def _line_rules(file: Path, limits: Limits) -> list[dict]:
    return rules.scan(file.read_text(encoding="utf-8", errors="replace"))


@dataclass
class Analyzer:
    name: str
    languages: frozenset[str] | None  # None: every language
    run: Callable[[Path, Limits], list[dict]]
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, or None


ANALYZERS: list[Analyzer] = [
    Analyzer("ruff", frozenset({"python"}), _ruff, lambda: None if _tool("ruff") else "ruff is not installed"),
    Analyzer("bandit", frozenset({"python"}), _bandit, lambda: None if _tool("bandit") else "bandit is not installed"),
    Analyzer("semgrep", None, _semgrep,
             lambda: ("semgrep is not installed" if not _tool("semgrep") else
                      None if os.environ.get("FOUNDRY_SEMGREP_RULES") else "FOUNDRY_SEMGREP_RULES is not set")),
    Analyzer("foundry-rules", frozenset(rules.LANGUAGES), _line_rules),
]
_SUFFIX = {"python": ".py", "javascript": ".js", "typescript": ".ts", "go": ".go", "java": ".java", "ruby": ".rb",
           "php": ".php"}


def analyze_file(code: str, language: str | None, limits: Limits | None = None,
                 analyzers: list[Analyzer] | None = None) -> Analysis:
    """Run every analyzer for ``language`` on ``code``; never raises for an analyzer's failure."""
    limits = limits or Limits()
    result = Analysis()
    usable = [a for a in (analyzers or ANALYZERS) if a.languages is None or language in a.languages]
    if not any(a.languages is not None for a in usable):
        result.supported = False
    with tempfile.TemporaryDirectory(prefix="foundry-analyze-") as tmp:
        file = Path(tmp) / f"code{_SUFFIX.get(language or '', '.txt')}"
        file.write_text(code, encoding="utf-8")
        for a in usable:
            why = a.missing()
            if why:
                result.stages.append(Stage(a.name, "skipped", reason=why))
                continue
            t0 = time.perf_counter()
            try:
                found = a.run(file, limits)
            except TimeoutError as exc:
                result.stages.append(Stage(a.name, "timeout", time.perf_counter() - t0, reason=str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - one broken analyzer never fails the review
                result.stages.append(Stage(a.name, "error", time.perf_counter() - t0,
                                           reason=f"{type(exc).__name__}: {exc}"[:500]))
                continue
            result.findings.extend(found)
            result.stages.append(Stage(a.name, "ok", round(time.perf_counter() - t0, 3), len(found)))
    _without_waived(code, result)
    return result


def analyze(code: str, path: str | None, language: str | None, is_diff: bool = False,
            limits: Limits | None = None, analyzers: list[Analyzer] | None = None) -> Analysis:
    """The analyzer stage for a review's input (a file, or a unified diff: only its added lines count)."""
    why = screen(code, path)
    if why:
        return Analysis(skipped=why, supported=False)
    if not is_diff:
        return analyze_file(code, language, limits, analyzers)
    from domain.review.diffs import changed_files

    total = Analysis(supported=False)
    files = changed_files(code)
    if not files:
        total.skipped = "no changed files found in the diff"
    for f in files:
        lang = language if language not in (None, "diff") else _language_of(f.path)
        part = analyze_file(f.text, lang, limits, analyzers)
        total.supported |= part.supported
        total.stages.extend(Stage(f"{s.name}:{f.path}", s.status, s.seconds, s.findings, s.reason) for s in part.stages)
        total.waived.extend(dict(w, path=f.path) for w in part.waived if w["line"] in f.added)
        for finding in part.findings:
            if finding["line"] in f.added:
                total.findings.append(dict(finding, path=f.path, file_line=finding["line"],
                                           line=f.diff_line[finding["line"]],
                                           end_line=f.diff_line.get(finding["end_line"])))
    return total


def _language_of(path: str) -> str | None:
    return guess_language(path)
