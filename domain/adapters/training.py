"""LoRA training, readable top to bottom: setup → train → cleanup (nanoGPT / torchtune style, no HF Trainer).

Batches
- **Packed** (``packing=True``): samples are placed first-fit-decreasing into rows of at most ``max_seq_len``
  tokens; ``position_ids`` restart at 0 for every sample and no attention mask is passed. Transformers
  (``masking_utils.find_packed_sequence_indices``) turns restarting positions into a block-diagonal causal
  mask, so a token attends only to earlier tokens of its own sample: packed logits equal unpacked ones
  (tested). The tail of a row is padding in its own position segment, with no loss.
  On ``sdpa`` models the forward goes further (``domain/adapters/varlen.py``): the rows' real tokens run
  as one unpadded row and attention runs per sample, like flash-attn's varlen kernels; no padding, no
  mask, only the diagonal blocks of attention (same loss and gradients as the mask, tested).
- **Unpacked**: ``batch_size`` samples per batch, right-padded to the longest, with an attention mask. On
  ``sdpa`` models these run unpadded too (one row of the samples' real tokens, attention per sample), the
  way flash-attn's ``unpad_input`` runs padded batches: the same samples per step, no work on padding.
Loss: cross-entropy on completion tokens only (prompt and padding labels are ``IGNORE``); the output
projection runs only on those positions, so prompt tokens cost no ``lm_head`` work.

Order: step ``s`` uses batch ``perm_e[s mod n]`` where ``perm_e`` is a permutation seeded by (seed, epoch
``e = s div n``): the order is a function of the step alone, which is what makes resuming exact.

Checkpoints are ``domain.checkpoints``' one format: the LoRA weights (``adapter_weights``) as safetensors,
optimizer/scheduler/RNG states, the step and the losses so far; ``resume`` puts them back.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from domain import checkpoints
from domain.adapters import varlen
from domain.adapters.data import IGNORE, TokenizedExample
from domain.config import get_settings
from domain.device import adamw, compute_dtype, train_autocast


@dataclass
class TrainConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture (q_proj, v_proj for Llama)
    learning_rate: float = 2e-4
    max_steps: int = 200
    batch_size: int = 4
    max_seq_len: int = 512
    packing: bool = True
    qlora: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    warmup_steps: int | None = None  # None: 10 % of max_steps, at most 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1 or self.max_seq_len < 16:
            raise ValueError("max_steps and batch_size must be >= 1 and max_seq_len >= 16")

    @classmethod
    def from_spec(cls, spec) -> "TrainConfig":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in spec.model_dump().items() if k in names})

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(20, self.max_steps // 10)

    def hyperparams(self) -> dict:
        return asdict(self)


# ---- batches ------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed (positions carry the sample boundaries)
    tokens: int  # real (non-padding) tokens
    samples: int
    segments: list[list[int]] | None = None  # the sample lengths of each row (packed: several; unpacked: one)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.attention_mask),
                     self.tokens, self.samples, self.segments)

    def unpadded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The batch as one row of its real tokens (ids, labels, positions) and the sample lengths. Each
        sample's first label is ``IGNORE`` (``make_batches``), so no loss crosses from one sample to the next."""
        assert self.segments is not None
        real = [sum(row) for row in self.segments]
        cat = lambda t: torch.cat([t[r, :n] for r, n in enumerate(real)]).unsqueeze(0)  # noqa: E731
        return cat(self.input_ids), cat(self.labels), cat(self.position_ids), [n for row in self.segments for n in row]


def pack(examples: list[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    """First-fit decreasing bin packing of samples into rows of at most ``capacity`` tokens (deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[TokenizedExample]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(examples[i])
                free[r] -= n
                break
        else:
            rows.append([examples[i]])
            free.append(capacity - n)
    return rows


def _stack(rows: list[tuple[list[int], list[int], list[int]]], pad_id: int, with_mask: bool) -> tuple:
    width = max(len(ids) for ids, _, _ in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    mask_t = torch.zeros((len(rows), width), dtype=torch.long) if with_mask else None
    for r, (ids, labels, pos) in enumerate(rows):
        n = len(ids)
        ids_t[r, :n] = torch.tensor(ids)
        lab_t[r, :n] = torch.tensor(labels)
        pos_t[r, :n] = torch.tensor(pos)
        pos_t[r, n:] = torch.arange(width - n)  # padding: a segment of its own
        if mask_t is not None:
            mask_t[r, :n] = 1
    return ids_t, lab_t, pos_t, mask_t


def make_batches(examples: list[TokenizedExample], batch_size: int, max_seq_len: int, packing: bool,
                 pad_id: int) -> list[Batch]:
    """Deterministic batches: packed rows (``batch_size`` rows of up to ``max_seq_len`` tokens) or
    ``batch_size`` padded samples."""
    if not examples:
        return []
    batches = []
    if packing:
        rows = []
        for row in pack(examples, max_seq_len):
            ids, labels, pos = [], [], []
            for ex in row:
                ids += ex.input_ids
                labels += [IGNORE] + ex.labels[1:]  # a sample's first token is never predicted from the previous one
                pos += list(range(len(ex.input_ids)))
            rows.append((ids, labels, pos, [len(ex.input_ids) for ex in row]))
        for i in range(0, len(rows), batch_size):
            group = rows[i:i + batch_size]
            t = _stack([(a, b, c) for a, b, c, _ in group], pad_id, with_mask=False)
            batches.append(Batch(*t, tokens=sum(len(a) for a, *_ in group), samples=sum(len(n) for *_, n in group),
                                 segments=[n for *_, n in group]))
    else:
        for i in range(0, len(examples), batch_size):
            group = examples[i:i + batch_size]
            t = _stack([(e.input_ids, [IGNORE] + e.labels[1:], list(range(len(e.input_ids)))) for e in group], pad_id,
                       with_mask=True)
            batches.append(Batch(*t, tokens=sum(len(e.input_ids) for e in group), samples=len(group),
                                 segments=[[len(e.input_ids)] for e in group]))
    return batches


def batch_for_step(batches: list[Batch], step: int, seed: int) -> Batch:
    n = len(batches)
    epoch, k = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return batches[int(torch.randperm(n, generator=g)[k])]


# ---- model --------------------------------------------------------------------------------------

def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def setup_model(base_model: torch.nn.Module, cfg: TrainConfig, init_adapter_dir: str | Path | None = None):
    """Wrap the base model with a trainable LoRA adapter named ``default``: fresh (seeded) or continued from
    ``init_adapter_dir`` (the champion). The base weights stay frozen."""
    from peft import PeftModel, get_peft_model

    torch.manual_seed(cfg.seed)
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    if init_adapter_dir is not None:
        model = PeftModel.from_pretrained(base_model, str(init_adapter_dir), is_trainable=True)
    else:
        model = get_peft_model(base_model, lora_config(cfg))
    return model


def make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.learning_rate, cfg.weight_decay)
    warmup, total = cfg.warmup, cfg.max_steps

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return optimizer, scheduler


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return decoder, base.get_output_embeddings()


def _completion_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden[:, :-1]`` at the completion positions and their targets, on ``hidden``'s device. Targets kept on
    the host (as batches are) give those positions as index tensors found on the host: a boolean mask on the
    GPU would need its count first, one device sync per forward."""
    keep = targets != IGNORE
    if keep.device == hidden.device:
        return hidden[:, :-1][keep], targets[keep]
    rows, cols = keep.nonzero(as_tuple=True)
    move = lambda t: t.to(hidden.device, non_blocking=True)  # noqa: E731
    return hidden[:, :-1][move(rows), move(cols)], move(targets[keep])


def completion_loss(model, batch: Batch, count_correct: bool = True) -> tuple[torch.Tensor, int, int]:
    """(sum of token losses, completion tokens, correctly predicted tokens) over the batch. Logits are made only
    at completion positions (the prompt's would cost a vocabulary-wide projection for nothing); training
    passes ``count_correct=False`` to skip the argmax over them."""
    decoder, head = _decoder_and_head(model)
    device = next(model.parameters()).device
    if batch.segments is not None and varlen.supported(decoder):
        # one row of real tokens, attention per sample: no padding (packed rows' tails, unpacked batches' short
        # samples), no attention mask, no block-diagonal mask. Unpadded where the batch is (the host), then moved.
        input_ids, labels, position_ids, lengths = batch.unpadded()
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        with varlen.packed(decoder, lengths):
            hidden = decoder(input_ids=move(input_ids), position_ids=move(position_ids),
                             use_cache=False).last_hidden_state
    else:
        b = batch.to(device)
        labels = batch.labels
        hidden = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                         use_cache=False).last_hidden_state
    picked, y = _completion_positions(hidden, labels[:, 1:])
    logits = head(picked).float()
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    correct = int((logits.argmax(-1) == y).sum()) if count_correct and logits.numel() else 0
    return loss_sum, int(y.numel()), correct


# ---- checkpoints (the format is domain.checkpoints') ---------------------------------------------

def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights of the ``default`` adapter: what a checkpoint keeps of the model."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name="default")


def resume(ckpt: checkpoints.Loaded, model, optimizer, scheduler) -> tuple[int, list[float]]:
    """Put a checkpoint's adapter weights, optimizer, scheduler and RNG states back; returns (step, the losses
    of the steps before it, kept in ``extra["losses"]``)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, ckpt.weights, adapter_name="default")
    checkpoints.restore(ckpt, optimizer, scheduler)
    return ckpt.step, [float(x) for x in ckpt.extra.get("losses", [])]


# ---- the resident base model (one per process; LoRA layers are removed after every job) ------------

_base_lock = threading.Lock()
_base: dict[tuple, object] = {}


def base_model(ref: str, device: str, qlora: bool):
    """The base model for training, loaded once per process (4-bit NF4 when ``qlora``)."""
    from domain.models import load_causal_lm, resolve_device

    dev = resolve_device(device)
    key = (ref, str(dev), qlora)
    with _base_lock:
        if key not in _base:
            _base.clear()  # one resident training base at a time
            quant = None
            if qlora:
                from transformers import BitsAndBytesConfig

                quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=compute_dtype(dev, get_settings().compute_dtype))
            _base[key] = load_causal_lm(ref, device=str(dev), quantization_config=quant)
        return _base[key]


# ---- the loop -----------------------------------------------------------------------------------

def _noop(*_a, **_k):
    return None


@dataclass
class Hooks:
    """What the loop tells the outside world. ``checkpoint(step, reason)`` saves one; ``stopping()`` asks
    whether the worker is shutting down (then the loop checkpoints and calls ``check``, which raises)."""

    progress: Callable[[int, float, float], None] = _noop  # (step, loss, tokens/s)
    checkpoint: Callable[[int, str], None] = _noop
    stopping: Callable[[], bool] = lambda: False
    check: Callable[[], None] = _noop


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per step, from step 1 (resumed runs included)
    tokens: int = 0  # real tokens processed in this run (not counting steps done before a resume)
    seconds: float = 0.0
    attention_kernels: list[str] = field(default_factory=list)  # varlen kernels the packed forwards ran (varlen.py)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def local_step(model, batch: Batch) -> float:
    """Forward and backward of one batch in this process alone; the batch's mean completion-token loss."""
    with train_autocast(model):
        loss_sum, n, _ = completion_loss(model, batch, count_correct=False)
    loss = loss_sum / max(1, n)
    loss.backward()
    return float(loss.detach())


def train(model, batches: list[Batch], cfg: TrainConfig, optimizer, scheduler, *, start_step: int = 0,
          losses: list[float] | None = None, hooks: Hooks | None = None,
          step_loss: Callable[[Batch], float] | None = None) -> TrainResult:
    """Run steps ``start_step .. cfg.max_steps - 1``. ``step_loss(batch)`` runs one batch's forward and
    backward and returns its loss (default ``local_step``; domain/adapters/distributed.py gives its sharded
    one); the update, the accounting, the checkpoints and the soft stop are this loop's, for every caller."""
    if not batches:
        raise ValueError("no training batches")
    hooks = hooks or Hooks()
    step_loss = step_loss or (lambda batch: local_step(model, batch))
    result = TrainResult(steps=start_step, losses=list(losses or []))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    varlen.reset_kernels()
    t0 = time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        batch = batch_for_step(batches, step, cfg.seed)
        loss = step_loss(batch)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        result.steps = done
        result.losses.append(loss)
        result.tokens += batch.tokens
        result.seconds = time.perf_counter() - t0
        hooks.progress(done, loss, result.tokens_per_s)
        if hooks.stopping():
            hooks.checkpoint(done, "soft_stop")
            hooks.check()  # raises: the job is requeued and resumes from this checkpoint
        if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            hooks.checkpoint(done, "interval")
        hooks.check()
    result.seconds = time.perf_counter() - t0
    result.attention_kernels = sorted(varlen.kernels_used())
    return result


@torch.no_grad()
def evaluate(model, batches: list[Batch]) -> dict:
    """Mean completion-token loss, perplexity and top-1 token accuracy (the cheap task metric)."""
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for b in batches:
        s, k, c = completion_loss(model, b)
        total, n, correct = total + float(s), n + k, correct + c
    if was_training:
        model.train()
    loss = total / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"),
            "token_accuracy": correct / n if n else float("nan"), "tokens": n}


def cleanup(model):
    """Remove the LoRA layers and hand back the untouched base model (kept resident for the next job)."""
    return model.unload() if hasattr(model, "unload") else model
