"""Data-parallel LoRA retraining: retrain's loop on the process group of ``domain/data_parallel.py``.

Every step takes the global batch (the one a single process would take) and splits its rows rank::N;
loss_k = (sum of rank k's token losses) / (completion tokens of the whole batch); backward; one
``data_parallel.reduce`` of [all LoRA gradients, loss_k] → identical gradients, clip, optimizer step everywhere.

So N processes follow the one-process run's loss curve and end with its adapter weights (up to float
summation order, and with ``lora_dropout=0``: dropout masks are drawn per rank). This is DDP's gradient
averaging done by hand: the loop calls the decoder and the output head directly (logits only at completion
positions), which DDP's forward hooks would not see, and only the LoRA parameters need reducing.

Rank 0 is the job's own process and the only one that writes anything (checkpoints, ledger rows, the
adapter); helpers (``rank_main``) load the same base model and LoRA start (the champion or the seeded init,
then rank 0's weights are broadcast) and the same checkpoint when resuming. A helper on another host
(``domain/rank_agent.py``) gets the champion and the checkpoint as copies fetched from the store; the base
model ref must resolve there itself. A lost helper ends the attempt
with ``TransientError(code="rank_lost")``; the retry resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from domain import checkpoints, data_parallel
from domain.adapters import training
from domain.adapters.data import IGNORE
from domain.device import oom_as_failure, train_autocast

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """What every rank needs to rebuild rank 0's starting point (JSON in ``job.json``)."""

    base_ref: str
    device: str  # rank 0's device ("cpu", "cuda", "cuda:0"); rank k takes cuda:(index + k)
    qlora: bool
    workdir: str  # a fresh folder for this attempt: job.json, data.pt, rank-<k>.pid / .log
    init_adapter_dir: str | None = None  # the LoRA start (champion); None: the seeded fresh init
    resume_dir: str | None = None  # a training checkpoint to restore on every rank
    timeout_s: float = 600.0  # how long a rank waits in a collective (rank 0 saving a checkpoint meanwhile)


def launch_for(spec, ctx, base_ref: str, parent_dir, resume: checkpoints.Loaded | None) -> tuple[int, Launch | None]:
    """The retrain handler's (processes, launch) for this job: the spec's ``procs`` or FOUNDRY_TRAIN_PROCS."""
    from domain.paths import data_root

    procs = data_parallel.procs_for(spec, ctx.settings)
    if procs == 1:
        return 1, None
    return procs, Launch(base_ref=base_ref, device=ctx.settings.device, qlora=bool(getattr(spec, "qlora", False)),
                         workdir=str(data_root() / "dist" / ctx.job_id),
                         init_adapter_dir=str(parent_dir) if parent_dir is not None else None,
                         resume_dir=str(resume.folder) if resume else None)


# ---- the data-parallel loop (every rank) --------------------------------------------------------

def shard(batch: training.Batch, rank: int, world: int) -> training.Batch | None:
    """Rank ``rank``'s rows of a batch (rows rank, rank + world, ...); None when it has none."""
    rows = list(range(rank, batch.input_ids.shape[0], world))
    if not rows:
        return None
    pick = lambda t: None if t is None else t[rows]
    segments = [batch.segments[r] for r in rows] if batch.segments is not None else None
    if segments is not None:
        tokens, samples = sum(sum(s) for s in segments), sum(len(s) for s in segments)
    else:  # rows of one sample each, padding masked out
        mask = batch.attention_mask[rows] if batch.attention_mask is not None else batch.input_ids[rows]
        tokens, samples = int((mask != 0).sum()) if batch.attention_mask is not None else mask.numel(), len(rows)
    return training.Batch(pick(batch.input_ids), pick(batch.labels), pick(batch.position_ids),
                          pick(batch.attention_mask), tokens=tokens, samples=samples, segments=segments)


def train(model, batches: list[training.Batch], cfg: training.TrainConfig, optimizer, scheduler, *, rank: int,
          world: int, start_step: int = 0, losses: list[float] | None = None,
          hooks: training.Hooks | None = None) -> training.TrainResult:
    """``training.train`` across ``world`` processes: same steps, same global batches, same updates. Each
    rank runs its shard of the global batch; the gradients (and the loss) are summed over ranks and divided
    by the whole batch's completion tokens, so the update is the one-process update."""
    if not batches:
        raise ValueError("no training batches")
    params = [p for p in model.parameters() if p.requires_grad]
    data_parallel.broadcast(params)

    def step_loss(batch: training.Batch) -> float:
        total = max(1, int((batch.labels[:, 1:] != IGNORE).sum()))  # the whole batch's completion tokens
        part = shard(batch, rank, world)
        local = torch.zeros((), device=params[0].device)
        if part is not None:
            with train_autocast(model):
                loss_sum, _, _ = training.completion_loss(model, part, count_correct=False)
            (loss_sum / total).backward()
            local = loss_sum.detach()
        return float(data_parallel.reduce(params, local.reshape(1))[0]) / total

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
    group = data_parallel.process_group("retrain", procs, launch.workdir, device=launch.device,
                                        args={"launch": asdict(launch), "cfg": asdict(cfg)},
                                        data={"batches": [_batch_dict(b) for b in batches]}, timeout_s=launch.timeout_s,
                                        trees={"init_adapter": launch.init_adapter_dir, "resume": launch.resume_dir})
    with group, oom_as_failure("retrain", hint):
        return train(model, batches, cfg, optimizer, scheduler, rank=0, world=procs, start_step=start_step,
                     losses=losses, hooks=hooks)


def _batch_dict(b: training.Batch) -> dict:
    """A batch as tensors, numbers and lists, for the helper ranks (data, not weights)."""
    return {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids,
            "attention_mask": b.attention_mask, "tokens": b.tokens, "samples": b.samples, "segments": b.segments}


# ---- ranks 1..N-1 (started by domain/data_parallel.py) --------------------------------------------

def rank_main(args: dict, data: dict, rank: int, world: int, device: str) -> None:
    """Rank ``rank``'s part of a retrain: rank 0's base, LoRA start and checkpoint, then ``train``."""
    launch, cfg = Launch(**args["launch"]), training.TrainConfig(**args["cfg"])
    loaded = training.base_model(launch.base_ref, device, cfg.qlora)
    model = training.setup_model(loaded.model, cfg, launch.init_adapter_dir)
    optimizer, scheduler = training.make_optimizer(model, cfg)
    start, losses = 0, []
    if launch.resume_dir:
        start, losses = training.resume(checkpoints.read(launch.resume_dir), model, optimizer, scheduler)
    torch.manual_seed(cfg.seed * 1_000_003 + 7919 * rank + start)  # this rank's own dropout masks
    train(model, [training.Batch(**d) for d in data["batches"]], cfg, optimizer, scheduler, rank=rank, world=world,
          start_step=start, losses=losses)
