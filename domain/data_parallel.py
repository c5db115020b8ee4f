"""Data-parallel training over torch.distributed, the part retrain and distill share: N processes of one host,
gloo on the CPU, nccl on CUDA (rank k on GPU k). ``FOUNDRY_TRAIN_PROCS`` / a job's ``procs`` set N.

    the job's process (rank 0: ledger, checkpoints, artifacts)      helper processes (ranks 1..N-1)
      <data>/dist/<job>/job.json, data.pt            ──spawn──▶  python -m domain.data_parallel job.json RANK
      init_process_group(rank 0)  ◀──── tcp rendezvous on 127.0.0.1 ────  init_process_group(rank k), then the
                                                                           kind's ``rank_entry`` (domain/kinds.py)
      every step, on every rank: its rows of the global batch (the one a single process would take), loss
      sums divided by the whole batch's token count, backward, one ``reduce`` (all_reduce SUM of every
      gradient and the losses), clip, optimizer step

So N processes take the one-process update at every step (up to float summation order). The kinds' loops:
``domain.adapters.distributed`` (LoRA retraining) and ``domain.distillation`` (the whole student). Rank 0 is
the job's own process and the only one that writes anything; ``args`` (JSON) and ``data`` (tensors, numbers,
lists) in the launch folder give the helpers what they need to rebuild rank 0's starting point, and
``broadcast`` then hands them rank 0's weights. Optimizer states are replicated and batch orders are
functions of the step, so a checkpoint resumes with any number of processes.
A helper that dies (SIGKILL, out of memory) breaks rank 0's next collective: ``process_group`` turns that into
``TransientError(code="rank_lost")``, the job is retried and the next attempt resumes from its last
checkpoint. Helpers exit when rank 0 goes away (their parent changes, or a collective breaks).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from domain.errors import InvalidJob, TransientError
from domain.kinds import KINDS

log = logging.getLogger(__name__)

MAX_PROCS = 64


def procs_for(spec, settings) -> int:
    """The processes a job trains with: its spec's ``procs`` or FOUNDRY_TRAIN_PROCS. Raises InvalidJob."""
    n = getattr(spec, "procs", None) or settings.train_procs
    if not 1 <= n <= MAX_PROCS:
        raise InvalidJob(f"procs: {n} is outside 1..{MAX_PROCS}", field="procs")
    if n > 1 and _device_type(settings.device) == "cuda" and n > torch.cuda.device_count():
        raise InvalidJob(f"procs: {n} processes need {n} GPUs; this worker sees {torch.cuda.device_count()}",
                         field="procs")
    return n


def _device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def backend_for(device: str) -> str:
    return "nccl" if _device_type(device) == "cuda" else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Rank ``rank``'s device when rank 0 runs on ``device`` ("cpu", "auto", "cuda", "cuda:1")."""
    if _device_type(device) != "cuda":
        return "cpu"
    first = torch.device(device).index if device not in ("auto", "cuda") else 0
    return f"cuda:{((first or 0) + rank) % max(1, torch.cuda.device_count())}"


# ---- the collectives of a step ------------------------------------------------------------------

def reduce(params: list[torch.nn.Parameter], values: torch.Tensor) -> torch.Tensor:
    """One all_reduce(SUM) of every parameter's gradient and ``values`` (1-D: loss sums and the like);
    the summed gradients are written back. Returns the summed ``values``."""
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in params]
    flat = torch.cat([*(t.float() for t in parts), values.reshape(-1).float().to(parts[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[offset:]


def broadcast(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's weights on every rank (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


# ---- rank 0: the job's process ------------------------------------------------------------------

class Group:
    """Rank 0's view of its helper processes."""

    def __init__(self, helpers: list[subprocess.Popen], workdir: Path):
        self.helpers, self.workdir = helpers, workdir

    def lost(self) -> list[tuple[int, int]]:
        return [(k, p.returncode) for k, p in enumerate(self.helpers, start=1) if p.poll() not in (None, 0)]

    def raise_if_rank_lost(self, exc: BaseException) -> None:
        deadline = time.monotonic() + 5  # a broken collective can be seen before the dead rank is reaped
        while not self.lost() and time.monotonic() < deadline:
            time.sleep(0.1)
        lost = self.lost()
        if lost:
            what = ", ".join(f"rank {k} exited with {code}" for k, code in lost)
            tail = _log_tail(self.workdir / f"rank-{lost[0][0]}.log")
            raise TransientError(f"distributed training lost a process ({what}); the attempt is retried from the "
                                 f"last checkpoint. {tail}".strip(), code="rank_lost") from exc


@contextmanager
def process_group(kind: str, procs: int, workdir: str | os.PathLike, *, device: str, args: dict, data: dict,
                  timeout_s: float = 600.0):
    """Start ranks 1..procs-1 of ``kind`` in a fresh ``workdir``, join the group as rank 0 and yield the
    ``Group``. A collective that breaks because a rank died leaves the block as ``TransientError(code=
    "rank_lost")``. On the way out: leave the group, stop the helpers, remove ``workdir``.
    ``args`` (JSON) and ``data`` (``torch.save``d, read back with ``weights_only=True``) go to the kind's rank
    entry; ``timeout_s``: how long a rank waits in a collective (rank 0 saving a checkpoint meanwhile)."""
    if KINDS[kind].rank_entry is None:
        raise ValueError(f"the {kind} kind has no rank entry (domain/kinds.py)")
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    torch.save({"data": data}, workdir / "data.pt")  # token batches, never weights (tests/unit/test_security.py)
    job = {"kind": kind, "world": procs, "port": _free_port(), "backend": backend_for(device), "device": device,
           "timeout_s": timeout_s, "workdir": str(workdir), "parent": os.getpid(), "args": args}
    (workdir / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [_root(), os.environ.get("PYTHONPATH", "")] if p),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))}
    helpers = []
    for rank in range(1, procs):
        with open(workdir / f"rank-{rank}.log", "wb") as out:
            helpers.append(subprocess.Popen([sys.executable, "-m", "domain.data_parallel", str(workdir / "job.json"),
                                             str(rank)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=_root()))
    group, finished = Group(helpers, workdir), False
    try:
        _init(job, 0)
        try:
            yield group
        except (RuntimeError, dist.DistBackendError) as exc:
            group.raise_if_rank_lost(exc)
            raise
        finished = True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in helpers:  # after the last step they exit on their own; after a failure nobody waits for them
            try:
                p.wait(timeout=30 if finished else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _init(job: dict, rank: int) -> None:
    dist.init_process_group(job["backend"], init_method=f"tcp://127.0.0.1:{job['port']}", rank=rank,
                            world_size=job["world"], timeout=timedelta(seconds=job["timeout_s"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root() -> str:
    """The folder that holds the ``domain`` package (never ``domain/`` itself: its secrets.py would shadow the
    standard library's)."""
    import domain

    return str(Path(domain.__file__).resolve().parents[1])


def _log_tail(path: Path, n: int = 600) -> str:
    try:
        return "Its log ends: " + path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


# ---- ranks 1..N-1: python -m domain.data_parallel job.json RANK ---------------------------------

def _exit_with_parent(parent: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)  # rank 0 is gone: nobody will finish the collective
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="foundry-rank-watchdog").start()


def helper_main(job_file: str, rank: int) -> None:
    """Join rank 0's group as ``rank`` and run the job kind's rank entry (imported here, by name) to its end."""
    job = json.loads(Path(job_file).read_text())
    _exit_with_parent(job["parent"])
    workdir = Path(job["workdir"])
    (workdir / f"rank-{rank}.pid").write_text(str(os.getpid()))
    _init(job, rank)
    try:
        device = rank_device(job["device"], rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        data = torch.load(workdir / "data.pt", weights_only=True)["data"]
        module, _, name = KINDS[job["kind"]].rank_entry.partition(":")
        getattr(importlib.import_module(module), name)(job["args"], data, rank, job["world"], device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"rank {sys.argv[2]} %(levelname)s %(message)s")
    helper_main(sys.argv[1], int(sys.argv[2]))
