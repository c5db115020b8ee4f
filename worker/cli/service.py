"""foundry worker|beat|health: run the processes of a deployment, check its health."""

from __future__ import annotations

import os
import socket
import sys

from rich.table import Table
from sqlalchemy import desc, select

from worker.cli._common import add_json, console, fmt_time, print_json


def register(sub) -> None:
    p = sub.add_parser("worker", help="run a Celery worker with Foundry's settings for its flavour")
    p.add_argument("--flavour", choices=["gpu", "cpu", "review", "long", "all"], default="all",
                   help="gpu: review+retrain+quantize+distill (solo pool); cpu: index+control (prefork); "
                        "review: review queue only, threads pool for batching; long: retrain/quantize/distill (solo)")
    p.add_argument("--queues", help="override the queues (comma-separated)")
    p.add_argument("--concurrency", type=int, help="jobs run at once in this worker (default: per flavour)")
    p.add_argument("--name", help="node name (default: FLAVOUR@hostname)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run Celery beat (retrain schedules; leader-locked in the ledger)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("rank-agent", help="run a rank agent alone: start the ranks other hosts' retrain/distill jobs "
                                          "ask of this host (FOUNDRY_TRAIN_LOCAL_PROCS; docs/operations.md)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_rank_agent)

    p = sub.add_parser("workers", help="drain or undrain worker nodes (kept in the ledger: every host sees it)")
    wsub = p.add_subparsers(dest="workers_command", metavar="ACTION", required=True)
    d = wsub.add_parser("drain", help="a drained worker finishes its jobs and takes no new ones")
    d.add_argument("target", help="a node name (review@host-a), host:<hostname>, or all")
    d.add_argument("--for", dest="for_s", type=float, help="seconds until the drain ends by itself (default: never)")
    d.set_defaults(func=cmd_drain)
    d = wsub.add_parser("undrain", help="end a drain")
    d.add_argument("target")
    d.set_defaults(func=cmd_undrain)
    wsub.add_parser("drains", help="list the drains in force").set_defaults(func=cmd_drains)

    p = sub.add_parser("health", help="check broker and database now, record it, and show recent health events")
    p.add_argument("--limit", type=int, default=20, help="recent health events to show (default 20), newest first")
    add_json(p, "the checks and events")
    p.set_defaults(func=cmd_health)


def cmd_rank_agent(args) -> int:
    import logging

    from domain import rank_agent
    from worker.cli._common import CliError

    logging.getLogger().setLevel(args.loglevel.upper())  # main() configured WARNING; the agent logs each rank
    try:
        rank_agent.serve()
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0


def worker_argv(flavour: str, queues: str | None = None, concurrency: int | None = None, name: str | None = None,
                loglevel: str = "INFO") -> list[str]:
    from domain.config import get_settings
    from domain.kinds import CPU_QUEUES, GPU_QUEUES, KINDS, LONG_QUEUES, QUEUES

    table = {  # every queue list comes from the registry of job kinds
        "gpu": (GPU_QUEUES, "solo", 1),
        "long": (LONG_QUEUES, "solo", 1),
        "review": ((KINDS["review"].queue,), "threads", get_settings().review_batch_size),
        "cpu": (CPU_QUEUES, "prefork", 2),
        "all": (QUEUES, "threads", max(2, get_settings().review_batch_size)),
    }
    qs, pool, conc = table[flavour]
    argv = ["celery", "-A", "worker.celery_app", "worker", "-Q", queues or ",".join(qs), "-P", pool,
            "-c", str(concurrency or conc), "-n", name or f"{flavour}@{socket.gethostname()}", "-l", loglevel, "-E"]
    if pool == "prefork":
        argv += ["--max-tasks-per-child", "200"]
        if get_settings().worker_max_memory_mb:
            argv += ["--max-memory-per-child", str(get_settings().worker_max_memory_mb * 1024)]
    return argv


def cmd_worker(args) -> int:
    from domain import versions

    versions.require()  # stop here, naming the library, rather than inside a job
    argv = worker_argv(args.flavour, args.queues, args.concurrency, args.name, args.loglevel)
    os.execvp(sys.executable, [sys.executable, "-m", *argv])
    return 0


def cmd_beat(args) -> int:
    from domain.config import get_settings

    schedule_file = get_settings().data_dir / "celerybeat-schedule"
    schedule_file.parent.mkdir(parents=True, exist_ok=True)
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "-l", args.loglevel,
                               "-s", str(schedule_file)])
    return 0


def cmd_health(args) -> int:
    from domain import health
    from domain.ledger.db import session_scope
    from domain.ledger.models import HealthEvent
    from worker.celery_app import broker_settings
    from domain.config import get_settings

    broker, options, _ = broker_settings(get_settings())
    now = health.check_and_record(broker, options, source=f"cli@{socket.gethostname()}")
    ok = all(r["ok"] for r in now.values())
    if args.json:
        events = []
        if now["database"]["ok"]:
            with session_scope() as s:
                events = [{"at": e.at, "source": e.source, "component": e.component, "event": e.event,
                           "status": e.status, "message": e.message}
                          for e in s.scalars(select(HealthEvent).order_by(desc(HealthEvent.at)).limit(args.limit))]
        print_json({"ok": ok, "checks": now, "events": events})
        return 0 if ok else 1
    t = Table(title="health now")
    for col in ("component", "ok", "message"):
        t.add_column(col)
    for comp, r in now.items():
        t.add_row(comp, "[green]yes[/]" if r["ok"] else "[red]NO[/]", r["message"])
    console.print(t)
    if now["database"]["ok"]:
        with session_scope() as s:
            events = list(s.scalars(select(HealthEvent).order_by(desc(HealthEvent.at)).limit(args.limit)))
        h = Table(title="recent health events")
        for col in ("at", "source", "component", "event", "status", "message"):
            h.add_column(col, overflow="fold")
        for e in events:
            h.add_row(fmt_time(e.at), e.source, e.component, e.event, e.status, (e.message or "")[:100])
        console.print(h)
    return 0 if all(r["ok"] for r in now.values()) else 1


def cmd_drain(args) -> int:
    from domain import drain
    from worker.cli._common import err_console

    try:
        d = drain.drain(args.target, by=f"cli:{socket.gethostname()}", for_s=args.for_s)
    except ValueError as exc:
        err_console.print(str(exc))
        return 2
    console.print(f"drained {d.target}" + (f" until {fmt_time(d.until)}" if d.until else ""))
    return 0


def cmd_undrain(args) -> int:
    from domain import drain

    console.print(("undrained " if drain.undrain(args.target) else "no drain named ") + args.target)
    return 0


def cmd_drains(args) -> int:
    from domain import drain

    for d in drain.active():
        console.print(f"{d.target}\tby {d.by}\t" + (f"until {fmt_time(d.until)}" if d.until else "until undrained"))
    return 0
