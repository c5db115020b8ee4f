"""Ranks of data-parallel training on other hosts (``domain/data_parallel.py``): rank 0's requests and the
agent that takes them.

    host A: the job's worker, rank 0 (+ FOUNDRY_TRAIN_LOCAL_PROCS - 1 local helpers)
      store: dist/<job>/<launch>/job.json, data.pt, trees/<name>/ (a checkpoint, an init adapter)
      Redis (the broker's): RPUSH foundry:train:rank-requests {launch, rank, expires}  (one per remote rank)
      waits FOUNDRY_TRAIN_RENDEZVOUS_S for the requests to be taken (else TransientError "no_rank_agent",
      the requests withdrawn), then for every rank to join its TCP store (else "rank_lost")
    host B: a rank agent (FOUNDRY_TRAIN_RANK_AGENT=1 in a worker, or ``foundry rank-agent``)
      claims the first request it can run (LRANGE, then LREM: of several agents one gets it; an nccl rank
      only with a GPU of its own free) → fetch the launch into <data>/dist/<job>-rank<k>/ → the paths of
      the trees in the job's args replaced by their local copies → ``python -m domain.data_parallel job.json k``

The helper on host B watches the agent (its parent) and leaves when a collective breaks (rank 0 or another
rank gone) or times out; it writes nothing but its log, and the agent removes its folder when it exits.
Requests past their ``expires`` (rank 0 gave up on them) are dropped unstarted. A request the agent cannot
run stays in the list untouched, so rank 0 sees "taken" only when an agent really took it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from domain.errors import TransientError

log = logging.getLogger(__name__)

QUEUE = "foundry:train:rank-requests"


def _redis(settings):
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=10)


def remote_problem(settings) -> str | None:
    """Why ranks on other hosts cannot be reached (None: they can): the requests go over the broker's Redis,
    the launch files through a store every host reads."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return "the broker (FOUNDRY_BROKER_URL) is not Redis: rank agents take their requests from Redis"
    if not settings.artifact_url:
        return ("FOUNDRY_ARTIFACT_URL is empty (the data folder of this host): rank agents fetch the launch files "
                "from a store every host reads")
    return None


def _root() -> str:
    """The folder that holds the ``domain`` package (never ``domain/`` itself: its secrets.py would shadow the
    standard library's)."""
    import domain

    return str(Path(domain.__file__).resolve().parents[1])


def spawn_helper(job_file: Path, rank: int, env: dict | None = None) -> subprocess.Popen:
    """``python -m domain.data_parallel job.json RANK`` (``domain/data_parallel.py``), its output in
    ``rank-<RANK>.log`` beside ``job_file``."""
    full = {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join(p for p in [_root(), os.environ.get("PYTHONPATH", "")] if p)}
    with open(job_file.parent / f"rank-{rank}.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "domain.data_parallel", str(job_file), str(rank)], env=full,
                                stdout=out, stderr=subprocess.STDOUT, cwd=_root())


def log_tail(path: Path, n: int = 600) -> str:
    """"Its log ends: ..." with the last ``n`` characters of a helper's log (``spawn_helper``), or ""."""
    try:
        return "Its log ends: " + path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


# ---- rank 0's side ------------------------------------------------------------------------------

@dataclass
class Requests:
    """Rank 0's requests for its remote ranks, and the launch objects they name in the store."""

    redis: object
    store: object
    prefix: str
    items: list[str]
    ranks: range
    rendezvous_s: float

    @classmethod
    def send(cls, settings, job_id: str, job: dict, workdir: Path, trees: dict[str, str | None],
             ranks: range) -> Requests:
        """Put the launch into the store under ``dist/<job_id>/<launch id>/`` and push one request per rank."""
        from domain import storage

        store = storage.get_store(settings)
        prefix = storage.check_key(f"dist/{job_id}/{uuid.uuid4().hex[:12]}")
        shared = {}
        for name, path in trees.items():
            if path:
                store.put_tree(Path(path), f"{prefix}/trees/{name}")
                shared[name] = {"path": str(path), "key": f"{prefix}/trees/{name}"}
        store.put_bytes(f"{prefix}/data.pt", (workdir / "data.pt").read_bytes())
        store.put_bytes(f"{prefix}/job.json", json.dumps({**job, "trees": shared}).encode())
        expires = time.time() + settings.train_rendezvous_s
        items = [json.dumps({"launch": prefix, "job_id": job_id, "kind": job["kind"], "rank": k,
                             "backend": job["backend"], "expires": expires}) for k in ranks]
        r = _redis(settings)
        r.rpush(QUEUE, *items)
        log.info("asked rank agents for ranks %d..%d of %s (launch %s)", ranks.start, ranks.stop - 1, job_id, prefix)
        return cls(r, store, prefix, items, ranks, settings.train_rendezvous_s)

    def wait_taken(self, deadline: float) -> None:
        """Until every request is taken by an agent; at ``deadline`` the others are withdrawn and the attempt
        ends with ``TransientError(code="no_rank_agent")`` (retried)."""
        gone_once = False  # taken = gone on two polls in a row: an agent that lost a GPU race puts one back
        while True:
            waiting = [i for i in self.items if self.redis.lpos(QUEUE, i) is not None]
            if not waiting:
                if gone_once:
                    return
                gone_once = True
                time.sleep(0.2)
                continue
            gone_once = False
            if time.monotonic() >= deadline:
                withdrawn = [i for i in waiting if self.redis.lrem(QUEUE, 1, i)]
                if withdrawn:
                    ranks = ", ".join(str(json.loads(i)["rank"]) for i in withdrawn)
                    raise TransientError(
                        f"no rank agent took rank(s) {ranks} of {self.ranks.stop} within {self.rendezvous_s:.0f} s "
                        f"(FOUNDRY_TRAIN_RENDEZVOUS_S): this host starts FOUNDRY_TRAIN_LOCAL_PROCS={self.ranks.start} "
                        f"of them; run a rank agent on another host (FOUNDRY_TRAIN_RANK_AGENT=1 on its worker, or "
                        f"`foundry rank-agent`) or lower the job's procs", code="no_rank_agent")
                return  # taken at the last moment
            time.sleep(0.2)

    def close(self) -> None:
        """Withdraw requests still waiting and remove the launch objects."""
        try:
            for i in self.items:
                self.redis.lrem(QUEUE, 1, i)
        except Exception as exc:  # noqa: BLE001 - clean-up only
            log.warning("could not withdraw rank requests: %s", exc)
        try:
            self.store.delete(self.prefix)
        except Exception as exc:  # noqa: BLE001 - clean-up only; prune the dist/ prefix by hand if it stays
            log.warning("could not remove launch %s from the store: %s", self.prefix, exc)


# ---- the agent ----------------------------------------------------------------------------------

@dataclass
class Running:
    proc: subprocess.Popen
    workdir: Path
    job_id: str
    rank: int
    gpu: int | None = None  # the GPU of this host the rank runs on (nccl), None on the CPU


def free_gpu(busy: set[int] | frozenset[int]) -> int | None:
    """A GPU of this host that no rank started here uses (nccl allows one rank per GPU), or None."""
    import torch

    return next((g for g in range(torch.cuda.device_count()) if g not in busy), None)


def _replaced(value, paths: dict[str, str]):
    """``value`` (JSON) with every string equal to a key of ``paths`` replaced by its value."""
    if isinstance(value, str):
        return paths.get(value, value)
    if isinstance(value, list):
        return [_replaced(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _replaced(v, paths) for k, v in value.items()}
    return value


def claim(r, busy_gpus: set[int]) -> bytes | None:
    """The first waiting request this host can run, taken off the list (LREM: of agents claiming the same
    item one gets it), or None. An nccl rank with no GPU of this host free, and a request that has expired,
    are left for another agent and for rank 0's withdrawal; one that is not JSON is taken, for ``start`` to
    refuse in the log."""
    can_nccl = None  # asked once per pass, only when an nccl request waits
    for item in r.lrange(QUEUE, 0, -1):
        try:
            request = json.loads(item)
            if time.time() > float(request["expires"]):  # rank 0 gave up on it (or died): dropped
                if r.lrem(QUEUE, 1, item):
                    log.warning("rank request %s rank %s expired before it was taken; dropped",
                                request.get("job_id"), request.get("rank"))
                continue
            if request.get("backend") == "nccl":
                if can_nccl is None:
                    can_nccl = free_gpu(busy_gpus) is not None
                if not can_nccl:
                    continue
        except (ValueError, KeyError, TypeError):
            pass
        if r.lrem(QUEUE, 1, item):
            return item
    return None


class NoFreeGpu(Exception):
    """This host has no GPU free for an nccl rank: the request goes back for another agent."""


def start(request: dict, settings, busy_gpus: set[int] = frozenset()) -> Running | None:
    """Fetch one request's launch into this host's data folder and start its helper process (None: the
    request expired, rank 0 no longer waits for it). An nccl rank gets a GPU of this host that no other rank
    started here holds (``job.json``'s ``rank_device``); with none free, ``NoFreeGpu``."""
    from domain import storage
    from domain.paths import data_root

    if time.time() > float(request["expires"]):
        log.warning("rank request %s rank %s expired before it was taken; skipped", request["job_id"], request["rank"])
        return None
    gpu = None
    if request.get("backend") == "nccl":
        gpu = free_gpu(busy_gpus)
        if gpu is None:
            raise NoFreeGpu(f"rank {request['rank']} of {request['job_id']} needs a GPU (nccl) and none of this "
                            f"host's is free ({len(busy_gpus)} in use by its ranks)")
    store, prefix, rank = storage.get_store(settings), storage.check_key(request["launch"]), int(request["rank"])
    workdir = data_root() / "dist" / f"{request['job_id']}-rank{rank}"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        job = json.loads(store.get_bytes(f"{prefix}/job.json"))
        (workdir / "data.pt").write_bytes(store.get_bytes(f"{prefix}/data.pt"))
        local = {}
        for name, tree in job.pop("trees", {}).items():
            dest = workdir / "trees" / name
            store.download_tree(tree["key"], dest, store.manifest(tree["key"]))
            local[tree["path"]] = str(dest)
        job.update(args=_replaced(job["args"], local), workdir=str(workdir), parent=os.getpid())
        if gpu is not None:
            job["rank_device"] = f"cuda:{gpu}"
        (workdir / "job.json").write_text(json.dumps(job))
        proc = spawn_helper(workdir / "job.json", rank)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log.info("started rank %d of %s job %s (pid %d)", rank, job["kind"], request["job_id"], proc.pid)
    return Running(proc, workdir, request["job_id"], rank, gpu)


def _reap(running: list[Running], kill: bool = False) -> list[Running]:
    still = []
    for r in running:
        if kill and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
        code = r.proc.poll()
        if code is None:
            still.append(r)
            continue
        if code != 0:
            log.warning("rank %d of job %s exited with %s. %s", r.rank, r.job_id, code,
                        log_tail(r.workdir / f"rank-{r.rank}.log", 800))
        else:
            log.info("rank %d of job %s finished", r.rank, r.job_id)
        shutil.rmtree(r.workdir, ignore_errors=True)
    return still


def serve(settings=None, stop: threading.Event | None = None, poll_s: float = 1.0) -> None:
    """Take rank requests until ``stop`` is set: each one's helper runs as a child process of this one."""
    from domain.config import get_settings

    settings = settings or get_settings()
    problem = remote_problem(settings)
    if problem:
        raise ValueError(f"rank agent: {problem}")
    stop = stop or threading.Event()
    running: list[Running] = []
    r = None
    log.info("rank agent taking requests from %s", QUEUE)
    try:
        while not stop.is_set():
            running = _reap(running)
            try:
                r = r or _redis(settings)
                item = claim(r, {x.gpu for x in running if x.gpu is not None})
            except Exception as exc:  # noqa: BLE001 - Redis away: wait and reconnect
                log.warning("rank agent: Redis unreachable (%s); retrying", exc)
                r = None
                stop.wait(2)
                continue
            if item is None:
                stop.wait(poll_s)
                continue
            try:
                request = json.loads(item)
                got = start(request, settings, {x.gpu for x in running if x.gpu is not None})
                if got is not None:
                    running.append(got)
            except NoFreeGpu as exc:  # another agent of this host took the GPU since the claim
                r.lpush(QUEUE, item)  # back at the head: another agent (or this one, later) takes it
                log.warning("rank agent: %s; request put back", exc)
                stop.wait(poll_s)
            except Exception:  # one bad request never stops the agent; its rank 0 times out
                log.exception("rank agent: could not start a requested rank")
    finally:
        _reap(running, kill=True)


def serve_in_thread(settings=None) -> threading.Thread:
    """The agent as a daemon thread (a worker's main process: FOUNDRY_TRAIN_RANK_AGENT=1)."""
    t = threading.Thread(target=serve, args=(settings,), daemon=True, name="foundry-rank-agent")
    t.start()
    return t


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="rank-agent %(levelname)s %(message)s")
    serve()
