"""Feedback-like data for tests and benchmarks, made from real code nobody here wrote.

``stdlib_review_pairs`` takes functions of the Python standard library: the function (docstring removed)
is the code under review, and a review in the service's format is written from its docstring. Lengths
vary the way real feedback does. ``seed_feedback`` writes such pairs into the ledger as reviews with
accept/reject feedback, the way the review service and ``foundry feedback`` would.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from datetime import datetime, timedelta
from pathlib import Path

from domain.ledger.db import session_scope
from domain.ledger.models import Feedback, Job, Review, Tenant, new_id, utcnow

STDLIB_MODULES = ("textwrap.py", "json/decoder.py", "shlex.py", "fnmatch.py", "glob.py", "string.py", "heapq.py",
                  "bisect.py", "calendar.py", "colorsys.py", "difflib.py", "ftplib.py", "gettext.py", "ipaddress.py")


def stdlib_review_pairs(limit: int = 64, max_code_lines: int = 60, modules=STDLIB_MODULES) -> list[tuple[str, str, str]]:
    """(path, code, review) triples from documented standard-library functions, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str, str]] = []
    for name in modules:
        path = root / name
        if not path.exists():
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or not node.body or node.end_lineno is None:
                continue
            body = node.body[0]
            kept = lines[node.lineno - 1: body.lineno - 1] + lines[body.end_lineno: node.end_lineno]
            if not 2 <= len(kept) <= max_code_lines:
                continue
            paragraphs = [p.strip().replace("\n", " ") for p in doc.split("\n\n") if p.strip()]
            review = f"Summary: `{node.name}`: {paragraphs[0]}\nFindings:\n"
            review += "".join(f"- [low] line {i + 2}: {p[:300]}\n" for i, p in enumerate(paragraphs[1:3])) or "none\n"
            out.append((name, "\n".join(kept), review.strip()))
            if len(out) >= limit:
                return out
    return out


def seed_feedback(tenant: str, pairs: list[tuple[str, str, str]], *, verdicts: list[str] | None = None,
                  start: datetime | None = None, url: str | None = None) -> list[str]:
    """Write one succeeded review job + review + feedback per (path, code, review). ``verdicts``: "accept"
    (default), "reject" (no correction) or "correct" (reject with the given review as the correction).
    Feedback timestamps increase by one millisecond from ``start`` (default: just before now, so a later call
    always writes newer feedback)."""
    start = start or utcnow() - timedelta(milliseconds=len(pairs))
    ids = []
    with session_scope(url) as s:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, display_name=tenant))
            s.flush()
        for i, (path, code, review) in enumerate(pairs):
            verdict = (verdicts or ["accept"] * len(pairs))[i]
            job_id = new_id()
            at = start + timedelta(milliseconds=i)
            s.add(Job(id=job_id, kind="review", tenant_id=tenant, payload={"code": code}, status="succeeded",
                      created_by="test"))
            s.flush()
            written = review if verdict == "accept" else "Summary: looks fine.\nFindings: none"
            rv = Review(id=new_id(), job_id=job_id, tenant_id=tenant, model_id="test", path=path, code=code,
                        code_sha256=hashlib.sha256(code.encode()).hexdigest(), raw_text=written, summary=None,
                        created_at=at)
            s.add(rv)
            s.flush()
            fb = Feedback(review_id=rv.id, tenant_id=tenant, verdict="accept" if verdict == "accept" else "reject",
                          correction=review if verdict == "correct" else None, created_by="test", created_at=at)
            s.add(fb)
            s.flush()
            ids.append(fb.id)
    return ids


def make_version(tenant: str, base_ref: str, *, seed: int = 0, name: str = "reviewer", alias: str | None = None,
                 r: int = 4, moved_by: str = "test", url: str | None = None) -> str:
    """Register a version holding a random (non-zero) LoRA adapter for ``base_ref``; returns its id."""
    import torch
    from peft import LoraConfig, get_peft_model

    from domain.adapters import store
    from domain.models import load_causal_lm, model_fingerprint

    base = load_causal_lm(str(base_ref), device="cpu").model
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.5)
    files = store.save_adapter_files(model, store.adapter_rel_dir(tenant, name, f"test-{new_id()}"))
    with session_scope(url) as s:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, display_name=tenant))
            s.flush()
        v = store.register_version(s, tenant=tenant, name=name, base_model_id=str(base_ref),
                                   base_model_hash=model_fingerprint(str(base_ref)), files=files)
        if alias:
            store.move_alias(s, tenant, alias, v.id, moved_by, "test setup")
        return v.id
