"""Held-out text and the quality measurements shared by the quantize and distill jobs.

Text: the Python standard library's own top-level source files (``<stdlib>/*.py``): real code nobody here
wrote, present on every machine. The split is fixed by file name, so it is the same on every machine and
Python version that has the file: a file is **held-out** when ``sha256(name) mod 5 == 0`` (about 20 %),
otherwise it is **train**. Files are read in sorted name order, each preceded by a ``# file: NAME`` line.

Measurements (all on fixed-length token blocks, no padding, next-token prediction):
- ``perplexity``: exp of the mean negative log-likelihood over every predicted token.
- ``compare``: a reference and a candidate model on the same blocks: both perplexities, the mean per-token
  KL divergence KL(reference ‖ candidate), the top-1 agreement of their argmax predictions, and each model's
  forward-pass throughput in tokens/s (scoring throughput at the given batch size).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from domain.artifacts import data_file
from domain.errors import InvalidJob

SPLITS = ("train", "heldout")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """``heldout`` for about one file in five, chosen by a hash of its name; ``train`` otherwise."""
    return "heldout" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0 else "train"


def stdlib_files(split: str = "heldout") -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p for p in sorted(stdlib_dir().glob("*.py")) if split_of(p.name) == split]


def read_texts(paths: list[Path], max_chars: int | None = None) -> str:
    """Concatenate files (``# file: NAME`` headers), stopping once ``max_chars`` are collected."""
    parts, total = [], 0
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        parts.append(f"# file: {p.name}\n{text}\n")
        total += len(parts[-1])
        if max_chars is not None and total >= max_chars:
            break
    joined = "".join(parts)
    return joined[:max_chars] if max_chars is not None else joined


def stdlib_text(split: str = "heldout", max_chars: int | None = None) -> str:
    return read_texts(stdlib_files(split), max_chars)


def text_from_path(path: Path, max_chars: int | None = None) -> str:
    """A user's own text: one file, or every ``*.py``/``*.txt``/``*.md`` file under a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".py", ".txt", ".md"})
        return read_texts(files, max_chars)
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[:max_chars] if max_chars is not None else text


def token_blocks(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` cut into ``[n, seq_len]`` blocks (the incomplete tail is dropped).
    ``max_tokens`` caps the total; the result may have zero rows when the text is too short."""
    chars = None if max_tokens is None else max_tokens * 8  # ~3-4 chars a token: tokenize no more than needed
    ids = tokenizer(text[:chars] if chars else text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def eval_blocks(tokenizer, eval_data_path: str | None, max_tokens: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """Held-out token blocks for a report: the user's text, or the standard library's held-out split."""
    if eval_data_path:
        text, source = text_from_path(data_file(eval_data_path, "eval_data_path"), max_tokens * 8), eval_data_path
    else:
        text, source = stdlib_text("heldout", max_tokens * 8), "stdlib:heldout"
    blocks = token_blocks(tokenizer, text, seq_len, max_tokens)
    if blocks.shape[0] == 0:
        raise InvalidJob(f"eval_data_path: the held-out set {source!r} is empty (no complete block of {seq_len} tokens)",
                         field="eval_data_path", code="empty_dataset")
    return blocks, source


def _batches(blocks: torch.Tensor, batch_size: int):
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i: i + batch_size]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    device = _device_of(model)
    ids = ids.to(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    _sync(device)
    return logits.float(), time.perf_counter() - t0


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    ids = ids.to(logits.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()


@dataclass
class Quality:
    perplexity: float
    tokens: int  # predicted tokens
    tokens_per_s: float


@dataclass
class Comparison:
    perplexity_reference: float
    perplexity_candidate: float
    kl_divergence: float  # mean per predicted token, KL(reference ‖ candidate), nats
    top1_agreement: float  # fraction of positions where both argmax predictions agree
    tokens: int
    tokens_per_s_reference: float
    tokens_per_s_candidate: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, on_batch: Callable[[float], None] | None = None) -> Quality:
    if blocks.numel() == 0:
        raise ValueError("no held-out tokens to measure")
    nll, count, seconds, seen = 0.0, 0, 0.0, 0
    for ids in _batches(blocks, batch_size):
        logits, dt = _logits(model, ids)
        nll += _nll_sum(logits, ids)
        count += ids.shape[0] * (ids.shape[1] - 1)
        seconds += dt
        seen += ids.numel()
        if on_batch:
            on_batch(seen / blocks.numel())
    return Quality(perplexity=math.exp(nll / count), tokens=count, tokens_per_s=seen / max(seconds, 1e-9))


@torch.no_grad()  # not inference_mode: FSDP2's all-gathers fail on inference tensors (a sharded teacher)
def reference_passes(reference, blocks: torch.Tensor, batch_size: int = 4) -> None:
    """The forwards of ``reference`` that ``compare`` runs on the same arguments, and nothing else: a rank that
    holds part of a sharded reference (FSDP) takes part in each of them while rank 0 compares."""
    if blocks.numel() == 0:
        return
    for ids in _batches(blocks, batch_size):
        _logits(reference, ids)


@torch.no_grad()  # as reference_passes: its reference may be sharded
def compare(reference, candidate, blocks: torch.Tensor, batch_size: int = 4,
            on_batch: Callable[[float], None] | None = None) -> Comparison:
    """Score both models on the same blocks (batch by batch: no full logits tensor is kept)."""
    if blocks.numel() == 0:
        raise ValueError("no held-out tokens to measure")
    nll_r = nll_c = kl = 0.0
    agree = count = seen = 0
    sec_r = sec_c = 0.0
    for ids in _batches(blocks, batch_size):
        ref, dt_r = _logits(reference, ids)
        cand, dt_c = _logits(candidate, ids)
        cand = cand.to(ref.device)
        nll_r += _nll_sum(ref, ids)
        nll_c += _nll_sum(cand, ids)
        ref_lp = F.log_softmax(ref[:, :-1], dim=-1)
        cand_lp = F.log_softmax(cand[:, :-1], dim=-1)
        kl += (ref_lp.exp() * (ref_lp - cand_lp)).sum().item()
        agree += (ref_lp.argmax(-1) == cand_lp.argmax(-1)).sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
        sec_r, sec_c, seen = sec_r + dt_r, sec_c + dt_c, seen + ids.numel()
        if on_batch:
            on_batch(seen / blocks.numel())
    return Comparison(
        perplexity_reference=math.exp(nll_r / count), perplexity_candidate=math.exp(nll_c / count),
        kl_divergence=kl / count, top1_agreement=agree / count, tokens=count,
        tokens_per_s_reference=seen / max(sec_r, 1e-9), tokens_per_s_candidate=seen / max(sec_c, 1e-9),
    )
