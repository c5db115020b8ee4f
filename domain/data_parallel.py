"""Data-parallel training over torch.distributed, the part retrain and distill share: N processes on one
host or several, gloo on the CPU, nccl on CUDA (rank k on GPU k mod the host's GPUs). ``FOUNDRY_TRAIN_PROCS``
/ a job's ``procs`` set N; ``FOUNDRY_TRAIN_LOCAL_PROCS`` (L, default all N) how many this host starts.

    the job's process (rank 0: ledger, checkpoints, artifacts)      helper processes (ranks 1..N-1)
      <data>/dist/<job>/job.json, data.pt            ──spawn──▶  python -m domain.data_parallel job.json RANK
                                                                   (ranks 1..L-1, on this host)
      store dist/<job>/<launch>/ + Redis requests    ──agent──▶  the same command on another host, started by
                                                                   its rank agent (ranks L..N-1,
                                                                   ``domain/rank_agent.py``)
      TCPStore(rank 0)  ◀──── tcp rendezvous on FOUNDRY_TRAIN_MASTER_ADDR ────  TCPStore + init_process_group
                                                    (127.0.0.1 when every rank is local)  (rank k), then the
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
A helper that dies (SIGKILL, its host) breaks rank 0's next collective: ``process_group`` turns that into
``TransientError(code="rank_lost")``, the job is retried and the next attempt resumes from its last
checkpoint. A helper that runs out of memory, on this host or another, says so first in rank 0's
rendezvous store (key ``foundry/oom/K``), and the job fails as it would for rank 0's own out-of-memory
(``JobFailed`` ``cuda_oom`` / ``out_of_memory``: a retry would fail the same way). On nccl each rank is
bound to its GPU (``rank_device``, counted from the GPU rank 0 is configured on:
``FOUNDRY_DEVICE=cuda:1`` puts rank 0 on GPU 1, rank 1 on GPU 2) before the group is made.
Helpers exit when rank 0 goes away (a collective breaks or times out) or when the process that started them
(rank 0, or the rank agent) does.

Strategy fsdp (distill: ``strategy_for``, ``fsdp_shard``): the student, and the frozen teacher, are sharded
over the ranks with torch FSDP2 instead of replicated; ``fsdp_full_state`` gathers the student to rank 0 (a
collective) for checkpoints in the one-process format, and ``agree`` broadcasts rank 0's soft stop so every
rank takes part in that gather.

Several hosts (docs/operations.md, "Training across hosts"): rank 0 puts the launch files, and the local
folders the kind names in ``trees`` (the resume checkpoint, the init adapter), into the artifact store and
pushes one request per remote rank onto Redis (the broker's); a rank agent on another host fetches them and
starts the helper, the tree paths in ``args`` replaced by its copies. Every host needs the base model (or
teacher) at a ref that resolves there, the same broker and store, and a route to rank 0's address and port.
Rank 0 waits ``FOUNDRY_TRAIN_RENDEZVOUS_S`` for agents to take the requests (else ``TransientError`` code
``no_rank_agent``, the requests withdrawn), then at most as long again for every rank to join (else
``rank_lost``): nothing hangs on a missing host, and the retry resumes from the checkpoint.
"""

from __future__ import annotations

import gc
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
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from domain import rank_agent
from domain.device import memory, oom_code, out_of_memory_failure
from domain.errors import InvalidJob, JobFailed, TransientError, is_out_of_memory
from domain.kinds import KINDS

log = logging.getLogger(__name__)

MAX_PROCS = 64


def procs_for(spec, settings) -> int:
    """The processes a job trains with: its spec's ``procs`` or FOUNDRY_TRAIN_PROCS. Raises InvalidJob (also
    when ranks on other hosts are needed and this deployment cannot reach them: ``rank_agent.remote_problem``)."""
    n = getattr(spec, "procs", None) or settings.train_procs
    if not 1 <= n <= MAX_PROCS:
        raise InvalidJob(f"procs: {n} is outside 1..{MAX_PROCS}", field="procs")
    here = local_procs(n, settings)
    if here > 1 and _device_type(settings.device) == "cuda" and here > torch.cuda.device_count():
        raise InvalidJob(f"procs: {here} processes on this host need {here} GPUs; this worker sees "
                         f"{torch.cuda.device_count()}", field="procs")
    problem = rank_agent.remote_problem(settings) if here < n else None
    if problem:
        raise InvalidJob(f"procs: {n} processes, {here} on this host (FOUNDRY_TRAIN_LOCAL_PROCS), need rank agents "
                         f"on other hosts, but {problem}", field="procs")
    return n


def local_procs(procs: int, settings) -> int:
    """How many of a job's ``procs`` ranks this host starts itself (rank 0 included): FOUNDRY_TRAIN_LOCAL_PROCS,
    0 = all of them; the others are asked of rank agents on other hosts."""
    return max(1, min(procs, settings.train_local_procs or procs))


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


def job_device(job: dict, rank: int) -> str:
    """The device of ``rank`` in a launch: the GPU a rank agent gave it on its host (``rank_device`` in its
    job.json), else ``rank_device`` from rank 0's device."""
    return job.get("rank_device") or rank_device(job["device"], rank)


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


def sum_values(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-D: loss sums and the like) summed over the ranks (one all_reduce)."""
    total = values.reshape(-1).float().clone()
    dist.all_reduce(total)
    return total


def broadcast(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's weights on every rank (as DDP does when it wraps a model)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


# ---- strategy fsdp: weights, gradients and optimizer states sharded over the ranks ----------------

STRATEGIES = ("ddp", "fsdp")


def strategy_for(spec, settings, procs: int) -> str:
    """How a job's ``procs`` ranks share the model: "ddp" (every rank holds all of it, gradients all-reduced:
    ``reduce``), "fsdp" (torch FSDP2: each rank holds 1/N of the weights, gradients and optimizer states, and
    all-gathers a layer's weights for its forward and backward), or "single" (one process). The spec's
    ``strategy``, else FOUNDRY_TRAIN_STRATEGY. Raises InvalidJob when fsdp cannot give every rank rows."""
    if procs <= 1:
        return "single"
    strategy = getattr(spec, "strategy", None) or settings.train_strategy
    if strategy == "fsdp" and spec.batch_size < procs:  # a rank without rows would not join the all-gathers
        raise InvalidJob(f"batch_size: {spec.batch_size} rows cannot give each of {procs} processes one "
                         f"(strategy fsdp); raise batch_size or lower procs", field="batch_size")
    return strategy


def fsdp_shard(model: torch.nn.Module, device: str, *, frozen: bool = False) -> None:
    """Shard ``model`` in place over the group (FSDP2 ``fully_shard``; it moves each unit's shards to
    ``device``, so a model loaded in host memory never lies whole on the GPU): each decoder layer (the classes
    in the model's ``_no_split_modules``) its own unit, the rest (embeddings, final norm, output head, so tied
    weights stay together) the root's. FSDP averages the gradients over the ranks, so a loop whose loss is
    already divided by the whole batch's token count backpropagates ``world`` times it (``fsdp_loss_scale``):
    a sum is what one process would have (gloo has no pre-multiplied reduce-scatter).
    ``frozen``: a model that only runs forward under no_grad (a distill job's teacher): the root's weights are
    freed after each forward too (FSDP keeps a trained root's gathered for the backward that follows). Every
    rank must then call its forward the same number of times: each forward all-gathers every unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise InvalidJob(f"strategy: fsdp needs a model whose layers it can shard ({type(model).__name__} names no "
                         f"_no_split_modules); use strategy ddp", field="strategy")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))


def fsdp_loss_scale() -> float:
    """What a rank multiplies its loss by before backward under ``fsdp_shard`` (FSDP's average → a sum)."""
    return float(dist.get_world_size())


def fsdp_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """A collective (every rank calls it): the whole model's weights and the optimizer's state gathered to rank
    0, on the CPU, the state in ``optimizer.state_dict()``'s own form (parameters by index) as one process
    has them, so its checkpoint resumes on any number of processes and with either strategy. Other ranks get
    (None, None)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    order = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return weights, {"state": {order[name]: s for name, s in state["state"].items()},
                     "param_groups": [{**g, "params": [order[n] for n in g["params"]]} for g in state["param_groups"]]}


def fsdp_load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a checkpoint's optimizer state (``optimizer.state_dict()``'s form, parameters by index) back into
    the optimizer of the sharded ``model``, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {order[int(i)]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The training state this rank holds, in bytes: its parameters (its shards under fsdp), their gradients
    and the optimizer's state tensors (a frozen teacher is not counted: ``local_weight_bytes``)."""
    total = local_weight_bytes(model)
    for p in model.parameters():
        total += _local(p.grad).nbytes if p.grad is not None else 0
    for state in optimizer.state.values():
        total += sum(_local(v).nbytes for v in state.values() if torch.is_tensor(v))
    return total


def local_weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of ``model``'s parameters that this rank holds (its shards under ``fsdp_shard``): a frozen
    teacher's share of the rank's memory."""
    return sum(_local(p).nbytes for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def agree(flag: bool, device: str | torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast): a soft stop only rank 0's worker sees, so that every
    rank takes part in its checkpoint's gather."""
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


# ---- rank 0: the job's process ------------------------------------------------------------------

class Group:
    """Rank 0's view of its helper processes (``remote``: ranks started by rank agents on other hosts)."""

    def __init__(self, helpers: list[subprocess.Popen], workdir: Path, remote: range = range(0), kind_name: str = "",
                 world: int = 1):
        self.helpers, self.workdir, self.remote, self.kind_name, self.world = helpers, workdir, remote, kind_name, world
        self.store: dist.Store | None = None  # rank 0's rendezvous store, once the group exists

    def lost(self) -> list[tuple[int, int]]:
        return [(k, p.returncode) for k, p in enumerate(self.helpers, start=1) if p.poll() not in (None, 0)]

    def out_of_memory(self) -> tuple[int, dict] | None:
        """The first helper rank (local or remote) that reported running out of memory, and its report."""
        for k in range(1, self.world):
            if self.store is not None and self.store.check([oom_key(k)]):
                return k, json.loads(self.store.get(oom_key(k)))
        return None

    def raise_if_rank_lost(self, exc: BaseException) -> None:
        oom = self.out_of_memory()  # reported before that rank left, so before this collective broke
        if oom is not None:  # the job's own outcome, the same on every retry
            k, got = oom
            raise out_of_memory_failure(f"rank {k} of {self.kind_name}", got["message"], got["code"],
                                        got.get("memory") or {}) from exc
        deadline = time.monotonic() + 5  # a broken collective can be seen before the dead rank is reaped
        while not self.lost() and time.monotonic() < deadline:
            time.sleep(0.1)
        lost = self.lost()
        if lost:
            what = ", ".join(f"rank {k} exited with {code}" for k, code in lost)
            tail = rank_agent.log_tail(self.workdir / f"rank-{lost[0][0]}.log")
            raise TransientError(f"distributed training lost a process ({what}); the attempt is retried from the "
                                 f"last checkpoint. {tail}".strip(), code="rank_lost") from exc
        if self.remote:  # no local helper died: one on another host did (or its host, or the network)
            which = (f"rank {self.remote.start} on another host" if len(self.remote) == 1 else
                     f"one of ranks {self.remote.start}..{self.remote.stop - 1} on other hosts")
            raise TransientError(f"distributed training lost a process: a collective broke and no rank of this host "
                                 f"died, so {which} did (or its host, or the network); the attempt is retried from "
                                 f"the last checkpoint. See the rank agent's log there. ({str(exc)[:300]})",
                                 code="rank_lost") from exc


@contextmanager
def process_group(kind: str, procs: int, workdir: str | os.PathLike, *, device: str, args: dict, data: dict,
                  timeout_s: float = 600.0, trees: dict[str, str | None] | None = None, job_id: str | None = None):
    """Start ranks 1..procs-1 of ``kind`` (those of this host in a fresh ``workdir``, the others through rank
    agents: ``domain/rank_agent.py``), join the group as rank 0 and yield the ``Group``. A collective that
    breaks because a rank died leaves the block as ``TransientError(code="rank_lost")``. On the way out:
    leave the group, stop the helpers, remove ``workdir`` (and the launch's store objects).
    ``args`` (JSON) and ``data`` (``torch.save``d, read back with ``weights_only=True``) go to the kind's rank
    entry; ``trees``: local folders named in ``args`` (a checkpoint, an init adapter) that a rank on another
    host fetches from the store: there, each such path in ``args`` is replaced by its copy. ``timeout_s``: how
    long a rank waits in a collective (rank 0 saving a checkpoint meanwhile). ``job_id``: the store prefix of
    the launch (default: ``workdir``'s name)."""
    from domain.config import get_settings

    if KINDS[kind].rank_entry is None:
        raise ValueError(f"the {kind} kind has no rank entry (domain/kinds.py)")
    settings = get_settings()
    here = local_procs(procs, settings)
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    torch.save({"data": data}, workdir / "data.pt")  # token batches, never weights (tests/unit/test_security.py)
    addr = master_addr(settings, remote=here < procs)
    job = {"kind": kind, "world": procs, "addr": addr, "port": _free_port(addr), "backend": backend_for(device),
           "device": device, "timeout_s": timeout_s, "rendezvous_s": settings.train_rendezvous_s,
           "workdir": str(workdir), "parent": os.getpid(), "args": args}
    (workdir / "job.json").write_text(json.dumps(job))
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, torch.get_num_threads())))}
    helpers, remote = [], None
    group, finished = Group(helpers, workdir, range(here, procs), kind, procs), False
    try:
        for rank in range(1, here):
            helpers.append(rank_agent.spawn_helper(workdir / "job.json", rank, env=threads))
        if here < procs:
            remote = rank_agent.Requests.send(settings, job_id or workdir.name, job, workdir, trees or {},
                                              range(here, procs))
            remote.wait_taken(deadline=time.monotonic() + settings.train_rendezvous_s)
        group.store = _init(job, 0)
        try:
            yield group
        except (RuntimeError, dist.DistBackendError) as exc:
            if isinstance(exc, (TransientError, JobFailed)):  # the job's own outcome (out of memory...), not a rank
                raise
            group.raise_if_rank_lost(exc)
            raise
        finished = True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # a gloo ProcessGroup caught in a reference cycle (a traceback's frames after a lost rank) is freed by
        # a later gc pass, whose destructor joins gloo's threads: collect it here, in the process that has
        # those threads, not in a child forked later (there the join waits on threads that do not exist)
        gc.collect()
        for p in helpers:  # after the last step they exit on their own; after a failure nobody waits for them
            try:
                p.wait(timeout=30 if finished else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if remote is not None:
            remote.close()
        shutil.rmtree(workdir, ignore_errors=True)


def master_addr(settings, *, remote: bool) -> str:
    """Where the ranks reach rank 0: FOUNDRY_TRAIN_MASTER_ADDR, else 127.0.0.1 when every rank is on this
    host, else this host's name resolved (what other hosts must be able to connect to)."""
    if settings.train_master_addr:
        return settings.train_master_addr
    return socket.gethostbyname(socket.gethostname()) if remote else "127.0.0.1"


def oom_key(rank: int) -> str:
    return f"foundry/oom/{rank}"


def _init(job: dict, rank: int) -> dist.Store:
    """Join the group: rank 0 serves the rendezvous store and waits up to ``rendezvous_s`` for every rank to
    connect (else ``TransientError(code="rank_lost")``); collectives then wait up to ``timeout_s``. Returns the
    store (rank 0's, which every rank reaches)."""
    rendezvous = timedelta(seconds=job.get("rendezvous_s") or job["timeout_s"])
    addr = job.get("addr", "127.0.0.1")
    try:
        store = dist.TCPStore(addr, job["port"], job["world"], is_master=rank == 0, timeout=rendezvous)
    except (RuntimeError, dist.DistError) as exc:
        if rank != 0:
            raise
        raise TransientError(f"distributed training: not every one of the {job['world']} ranks reached rank 0 at "
                             f"{addr}:{job['port']} within {rendezvous.total_seconds():.0f} s "
                             f"(FOUNDRY_TRAIN_RENDEZVOUS_S): a helper did not start, or another host cannot reach "
                             f"this address (FOUNDRY_TRAIN_MASTER_ADDR) ({exc})", code="rank_lost") from exc
    extra = {}
    if job["backend"] == "nccl":  # bind the rank to its GPU before the group exists (cuda:1 stays cuda:1)
        device = torch.device(job_device(job, rank))
        torch.cuda.set_device(device)
        extra["device_id"] = device
    dist.init_process_group(job["backend"], store=store, rank=rank, world_size=job["world"],
                            timeout=timedelta(seconds=job["timeout_s"]), **extra)
    return store


def _free_port(addr: str = "127.0.0.1") -> int:
    """A free port on loopback, or on every interface when other hosts connect (``addr`` may name a host
    or an address this one does not own, behind NAT)."""
    with socket.socket() as s:
        s.bind((addr if addr == "127.0.0.1" else "", 0))
        return s.getsockname()[1]


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
    store = _init(job, rank)
    try:
        device = job_device(job, rank)  # on CUDA, _init has bound this process to it already
        data = torch.load(workdir / "data.pt", weights_only=True)["data"]
        module, _, name = KINDS[job["kind"]].rank_entry.partition(":")
        getattr(importlib.import_module(module), name)(job["args"], data, rank, job["world"], device)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        # rank 0 (on this host or another) reads this and fails the job as it would for its own out-of-memory,
        # not as "rank_lost"; it is set before this process leaves, so before rank 0's collective breaks
        with suppress(RuntimeError, dist.DistError):  # rank 0 gone already: nobody to tell
            store.set(oom_key(rank), json.dumps(
                {"code": oom_code(exc), "message": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}",
                 "memory": memory(device) if device.startswith("cuda") else {}}))
        raise
    finally:
        dist.destroy_process_group()
        gc.collect()  # as rank 0 does: a module or mesh still holding the group is freed now, not at exit


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"rank {sys.argv[2]} %(levelname)s %(message)s")
    helper_main(sys.argv[1], int(sys.argv[2]))
    # the work is done and the group destroyed: leave without the interpreter's finalization, where a gloo
    # object that outlived the group (an FSDP module's mesh, a cached work handle) could abort the process
    # (SIGABRT) and turn a finished rank into a lost one
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
