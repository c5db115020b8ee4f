"""Data-parallel LoRA retraining over torch.distributed (gloo on the CPU, nccl on CUDA).

    the job's process (rank 0: ledger, checkpoints, artifacts)      helper processes (ranks 1..N-1)
      batches → <data>/dist/<job>/batches.pt, job.json   ──spawn──▶  python -m domain.adapters.distributed job.json RANK
      init_process_group(rank 0)  ◀────────── tcp rendezvous ───────  init_process_group(rank k)
      every step: the global batch (the one a single process would take), rows split rank::N;
      loss_k = (sum of rank k's token losses) / (completion tokens of the whole batch); backward;
      one all_reduce(SUM) of [all LoRA gradients, loss_k] → identical gradients, clip, optimizer step everywhere

So N processes follow the one-process run's loss curve and end with its adapter weights (up to float
summation order, and with ``lora_dropout=0``: dropout masks are drawn per rank). This is DDP's gradient
averaging done by hand: the loop calls the decoder and the output head directly (logits only at completion
positions), which DDP's forward hooks would not see, and only the LoRA parameters need reducing.

Rank 0 is the job's own process and the only one that writes anything (checkpoints, ledger rows, the
adapter); helpers load the same base model and LoRA start (the champion or the seeded init, then rank 0's
weights are broadcast) and the same checkpoint when resuming. The optimizer state is replicated and the
batch order is a function of the step, so a checkpoint resumes with any number of processes.
A helper that dies (SIGKILL, out of memory) breaks rank 0's next collective: the attempt ends with
``TransientError(code="rank_lost")``, the job is retried and the next attempt resumes from the last checkpoint.
Helpers exit when rank 0 goes away (their parent changes, or a collective breaks).
One host only (``127.0.0.1`` rendezvous); ``FOUNDRY_TRAIN_PROCS`` / the spec's ``procs`` set N.
"""

from __future__ import annotations

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
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from domain import checkpoints
from domain.adapters import training
from domain.adapters.data import IGNORE
from domain.device import oom_as_failure, train_autocast
from domain.errors import InvalidJob, TransientError

log = logging.getLogger(__name__)

MAX_PROCS = 64


@dataclass
class Launch:
    """What every rank needs to rebuild rank 0's starting point (JSON in ``job.json``)."""

    base_ref: str
    device: str  # rank 0's device ("cpu", "cuda", "cuda:0"); rank k takes cuda:(index + k)
    qlora: bool
    workdir: str  # a fresh folder for this attempt: job.json, batches.pt, rank-<k>.pid / .log
    init_adapter_dir: str | None = None  # the LoRA start (champion); None: the seeded fresh init
    resume_dir: str | None = None  # a training checkpoint to restore on every rank
    timeout_s: float = 600.0  # how long a rank waits in a collective (rank 0 saving a checkpoint meanwhile)


def launch_for(spec, ctx, base_ref: str, parent_dir, resume: "checkpoints.Loaded | None") -> tuple[int, Launch | None]:
    """The retrain handler's (processes, launch) for this job: the spec's ``procs`` or FOUNDRY_TRAIN_PROCS."""
    from domain.paths import data_root

    procs = procs_for(spec, ctx.settings)
    if procs == 1:
        return 1, None
    return procs, Launch(base_ref=base_ref, device=ctx.settings.device, qlora=bool(getattr(spec, "qlora", False)),
                         workdir=str(data_root() / "dist" / ctx.job_id),
                         init_adapter_dir=str(parent_dir) if parent_dir is not None else None,
                         resume_dir=str(resume.folder) if resume else None)


def procs_for(spec, settings) -> int:
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
    if _device_type(device) != "cuda":
        return "cpu"
    first = torch.device(device).index if device not in ("auto", "cuda") else 0
    return f"cuda:{((first or 0) + rank) % max(1, torch.cuda.device_count())}"


# ---- the data-parallel loop (every rank) --------------------------------------------------------

def shard(batch: training.Batch, rank: int, world: int) -> training.Batch | None:
    """Rank ``rank``'s rows of a batch (rows rank, rank + world, ...); None when it has none."""
    rows = list(range(rank, batch.input_ids.shape[0], world))
    if not rows:
        return None
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    segments = [batch.segments[r] for r in rows] if batch.segments is not None else None
    if segments is not None:
        tokens, samples = sum(sum(s) for s in segments), sum(len(s) for s in segments)
    else:  # rows of one sample each, padding masked out
        mask = batch.attention_mask[rows] if batch.attention_mask is not None else batch.input_ids[rows]
        tokens, samples = int((mask != 0).sum()) if batch.attention_mask is not None else mask.numel(), len(rows)
    return training.Batch(pick(batch.input_ids), pick(batch.labels), pick(batch.position_ids),
                          pick(batch.attention_mask), tokens=tokens, samples=samples, segments=segments)


def _reduce(params: list[torch.nn.Parameter], loss_sum: torch.Tensor) -> torch.Tensor:
    """One all_reduce(SUM) of every gradient and the loss sum; gradients written back. Returns the loss sum."""
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
             for p in params]
    flat = torch.cat([*(t.float() for t in parts), loss_sum.reshape(1).float().to(parts[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
    return flat[-1]


def broadcast_trainable(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's trainable weights on every rank (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def train(model, batches: list[training.Batch], cfg: training.TrainConfig, optimizer, scheduler, *, rank: int,
          world: int, start_step: int = 0, losses: list[float] | None = None,
          hooks: training.Hooks | None = None) -> training.TrainResult:
    """``training.train`` across ``world`` processes: same steps, same global batches, same updates. Each
    rank runs its shard of the global batch; the gradients (and the loss) are summed over ranks and divided
    by the whole batch's completion tokens, so the update is the one-process update."""
    if not batches:
        raise ValueError("no training batches")
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_trainable(params)

    def step_loss(batch: training.Batch) -> float:
        total = max(1, int((batch.labels[:, 1:] != IGNORE).sum()))  # the whole batch's completion tokens
        part = shard(batch, rank, world)
        local = torch.zeros((), device=params[0].device)
        if part is not None:
            with train_autocast(model):
                loss_sum, _, _ = training.completion_loss(model, part, count_correct=False)
            (loss_sum / total).backward()
            local = loss_sum.detach()
        return float(_reduce(params, local)) / total

    return training.train(model, batches, cfg, optimizer, scheduler, start_step=start_step, losses=losses,
                          hooks=hooks, step_loss=step_loss)


# ---- rank 0: the job's process ------------------------------------------------------------------

def run(model, batches: list[training.Batch], cfg: training.TrainConfig, optimizer, scheduler, *, procs: int,
        launch: Launch | None, start_step: int = 0, losses: list[float] | None = None,
        hooks: training.Hooks | None = None) -> training.TrainResult:
    """Train on ``procs`` processes (this one is rank 0); one process: ``training.train`` itself."""
    hint = f"lower batch_size={cfg.batch_size} or max_seq_len={cfg.max_seq_len}"
    if procs <= 1:
        with oom_as_failure("retrain", hint):
            return training.train(model, batches, cfg, optimizer, scheduler, start_step=start_step, losses=losses,
                                  hooks=hooks)
    with process_group(launch, procs, batches, cfg) as group, oom_as_failure("retrain", hint):
        try:
            return train(model, batches, cfg, optimizer, scheduler, rank=0, world=procs, start_step=start_step,
                         losses=losses, hooks=hooks)
        except (RuntimeError, dist.DistBackendError) as exc:
            group.raise_if_rank_lost(exc)
            raise


class _Group:
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
def process_group(launch: Launch, procs: int, batches: list[training.Batch], cfg: training.TrainConfig):
    """Start ranks 1..procs-1, join the group as rank 0; on the way out leave it and stop the helpers."""
    workdir = Path(launch.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    save_batches(batches, workdir / "batches.pt")
    port = _free_port()
    job = {"launch": asdict(launch), "cfg": asdict(cfg), "world": procs, "port": port,
           "backend": backend_for(launch.device), "parent": os.getpid()}
    (workdir / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [_root(), os.environ.get("PYTHONPATH", "")] if p),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))}
    helpers = []
    for rank in range(1, procs):
        with open(workdir / f"rank-{rank}.log", "wb") as out:
            helpers.append(subprocess.Popen([sys.executable, "-m", "domain.adapters.distributed", str(workdir / "job.json"),
                                             str(rank)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=_root()))
    group, finished = _Group(helpers, workdir), False
    try:
        _init(job, 0)
        yield group
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
                            world_size=job["world"], timeout=timedelta(seconds=job["launch"]["timeout_s"]))


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


def save_batches(batches: list[training.Batch], path: Path) -> None:
    """The job's token batches for the helper ranks (data, not weights: those never go through torch.save)."""
    torch.save({"batches": [{"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids,
                             "attention_mask": b.attention_mask, "tokens": b.tokens, "samples": b.samples,
                             "segments": b.segments} for b in batches]}, path)


def load_batches(path: Path) -> list[training.Batch]:
    return [training.Batch(**d) for d in torch.load(path, weights_only=True)["batches"]]


# ---- ranks 1..N-1: python -m domain.adapters.distributed job.json RANK ----------------------------------

def _exit_with_parent(parent: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)  # rank 0 is gone: nobody will finish the collective
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="foundry-rank-watchdog").start()


def rank_main(job_file: str, rank: int) -> None:
    job = json.loads(Path(job_file).read_text())
    launch, cfg = Launch(**job["launch"]), training.TrainConfig(**job["cfg"])
    _exit_with_parent(job["parent"])
    workdir = Path(launch.workdir)
    (workdir / f"rank-{rank}.pid").write_text(str(os.getpid()))
    _init(job, rank)
    try:
        device = rank_device(launch.device, rank)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        loaded = training.base_model(launch.base_ref, device, cfg.qlora)
        model = training.setup_model(loaded.model, cfg, launch.init_adapter_dir)
        optimizer, scheduler = training.make_optimizer(model, cfg)
        start, losses = 0, []
        if launch.resume_dir:
            start, losses = training.resume(checkpoints.read(launch.resume_dir), model, optimizer, scheduler)
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * rank + start)  # this rank's own dropout masks
        train(model, load_batches(workdir / "batches.pt"), cfg, optimizer, scheduler, rank=rank, world=job["world"],
              start_step=start, losses=losses)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"rank {sys.argv[2]} %(levelname)s %(message)s")
    rank_main(sys.argv[1], int(sys.argv[2]))
