"""Mixed-adapter LoRA forward for batched decoding, without PEFT's per-call machinery.

PEFT mixes adapters in one batch (``adapter_names=``) by registering a pre-forward hook on every LoRA
layer at each call (a walk over all the model's modules) and, inside each layer, looping over the adapters
with an index gather and scatter of their rows. For one-token decode steps on a CPU that Python work cost
about a third of a 16-row step. ``MixedLoRA.rows(names)`` instead gives every LoRA layer, for the
duration of a batch, the stacked A and B weights (scaling folded into B) of the adapters in the batch and
a row mask; one step is then two matmuls and a multiply per layer: ``((x @ A_all) * mask) @ B_all``, where
A_all/B_all hold the batch's adapters side by side and the mask keeps each row's own adapter's columns.
Rows of the bare base model have an all-zero mask; adapters of different ranks are zero-padded to the
largest (the same product). Each row pays for every adapter of the batch (a few percent of the base
model's work at rank 16) and no weights are copied per row.

Only plain LoRA on ``nn.Linear`` layers in eval mode is handled (no DoRA or other variants, no LoRA
bias); ``supported`` says whether a batch qualifies, and the runtime falls back to PEFT otherwise.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

BASE = "__base__"


class _Rows:
    """Which adapter each row of the batch uses, as a mask over the adapters' concatenated rank columns
    (shared by every patched layer; rows are dropped as they finish). A batch of one adapter (a single
    review, or rows of one tenant) has no mask: every column is every row's, and multiplying by ones would
    be one more kernel a LoRA layer a decode step for the same numbers."""

    def __init__(self, index: torch.Tensor, n_adapters: int, rank: int, dtype: torch.dtype):
        self.rank = rank
        self.mask = None
        if n_adapters > 1:
            onehot = torch.nn.functional.one_hot(index, n_adapters).to(dtype)  # [B, U]
            self.mask = onehot.repeat_interleave(rank, dim=1).unsqueeze(1)  # [B, 1, U*rank]

    def select(self, keep: torch.Tensor) -> None:
        if self.mask is not None:
            self.mask = self.mask[keep]


class MixedLoRA:
    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def supported(self, names: list[str]) -> bool:
        if not self.layers or self.layers[0].training:
            return False
        adapters = set(names) - {BASE}
        for layer in self.layers:
            if not isinstance(layer.get_base_layer(), torch.nn.Linear) or layer.merged or layer.disable_adapters:
                return False
            for name in adapters & set(layer.lora_A.keys()):
                if name in getattr(layer, "lora_variant", {}) or getattr(layer.lora_B[name], "bias", None) is not None:
                    return False
                if getattr(layer, "use_dora", {}).get(name):
                    return False
        return True

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[_Rows]:
        """Within the block, a forward of the model runs row i with adapter ``names[i]`` (``BASE``: none)."""
        unique = sorted(set(names))
        lora = [layer.lora_A[n].weight for layer in self.layers for n in unique if n in layer.lora_A]
        rank = max((w.shape[0] for w in lora), default=1)
        # the LoRA weights' dtype and device, not the base layer's (a 4-bit base stores uint8)
        weight = lora[0] if lora else self.layers[0].get_base_layer().weight
        index = torch.tensor([unique.index(n) for n in names], dtype=torch.long, device=weight.device)
        rows = _Rows(index, len(unique), rank, weight.dtype if weight.is_floating_point() else torch.float32)
        patched = []
        try:
            for layer in self.layers:
                stacks = _stacks(layer, unique, rank)
                # a layer no adapter of this batch touches runs the base layer alone (never the active adapter)
                layer.forward = layer.get_base_layer().forward if stacks is None else \
                    _forward(layer.get_base_layer(), *stacks, rows)
                patched.append(layer)
            yield rows
        finally:
            for layer in patched:
                del layer.forward  # back to the class's (PEFT's) forward


def _stacks(layer, unique: list[str], rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A: [in, U*rank], B: [U*rank, out] (scaling folded in): the adapters side by side, zeros where an
    adapter is absent from this layer or has a smaller rank."""
    if not any(n in layer.lora_A for n in unique):
        return None
    base = layer.get_base_layer()
    weight = next(layer.lora_A[n].weight for n in unique if n in layer.lora_A)
    a = weight.new_zeros((base.in_features, len(unique) * rank))
    b = weight.new_zeros((len(unique) * rank, base.out_features))
    for i, n in enumerate(unique):
        if n in layer.lora_A:
            r = layer.lora_A[n].weight.shape[0]
            a[:, i * rank:i * rank + r] = layer.lora_A[n].weight.t()
            b[i * rank:i * rank + r, :] = layer.lora_B[n].weight.t() * layer.scaling[n]
    return a, b


def _forward(base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, rows: _Rows):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = base(x, *args, **kwargs)
        h = torch.matmul(x.to(a.dtype), a)  # [B, T, U*rank]
        if rows.mask is not None:
            h = h * rows.mask  # only the row's own adapter's columns
        return result + torch.matmul(h, b).to(result.dtype)

    return forward
