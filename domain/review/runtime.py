"""The review model runtime: one resident base model per worker process, LoRA adapters on top.

- ``get_runtime(settings, artifact)`` loads the base model once per process (keyed by model ref or
  serving artifact id, and device) and keeps it; later reviews reuse it (``BASE_LOADS`` counts loads).
- Adapters live in PEFT adapter slots (``fslot000001``...) named independently of versions; the slot
  table is an LRU bounded by ``max_adapters``. A new adapter takes a free slot (``load_adapter``) or the
  least recently used one: hot-swapped in place when the two LoRA configs match (its safetensors
  weights copied into the slot's tensors: no new modules, like PEFT's ``hotswap_adapter``), otherwise
  the old slot is deleted (``delete_adapter``, memory freed) and a new one loaded. The base weights are
  never reloaded.
- Rows of one ``generate`` call may use different adapters (PEFT ``adapter_names=``, ``"__base__"``
  for the bare model); left padding, greedy decoding.

Only the batcher's thread touches the model (``ensure_adapter``/``generate``), so no model lock is
needed; tokenizer calls from job threads go through ``tokenizer_lock``.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from domain.config import Settings, get_settings
from domain.models import LoadedModel, load_causal_lm

log = logging.getLogger(__name__)

BASE = "__base__"
WEIGHTS = "adapter_model.safetensors"
_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "bias",
              "fan_in_fan_out", "modules_to_save", "layers_to_transform")


@dataclass
class AdapterHandle:
    """What a request needs to find its adapter: the version id and how to get its verified folder
    (called only when the adapter is not resident already)."""

    version_id: str
    locate: Callable[[], Path]


def model_id_for(ref: str) -> str:
    """A readable model id: the hub id a prepared folder came from, else the reference itself."""
    marker = Path(ref) / "foundry-source.json"
    if marker.exists():
        try:
            return json.loads(marker.read_text()).get("model_id") or ref
        except (OSError, ValueError):
            pass
    return ref


def _lora_signature(config) -> tuple:
    d = config.to_dict()
    targets = d.get("target_modules")
    targets = tuple(sorted(targets)) if isinstance(targets, (list, set, tuple)) else targets
    return (str(d.get("peft_type")), targets, *(json.dumps(d.get(k), sort_keys=True, default=str) for k in _LORA_KEYS))


class Runtime:
    def __init__(self, loaded: LoadedModel, key: str, model_id: str, *, max_adapters: int = 8,
                 serving_artifact_id: str | None = None, batch_size: int = 8, batch_wait_s: float = 0.02):
        from domain.review.batcher import Batcher

        self.loaded = loaded
        self.key = key
        self.model_id = model_id
        self.serving_artifact_id = serving_artifact_id
        self.base = loaded.model
        self.model: torch.nn.Module = loaded.model  # becomes a PeftModel with the first adapter
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.tokenizer_lock = threading.Lock()
        self.max_adapters = max(1, int(max_adapters))
        self.slots: OrderedDict[str, str] = OrderedDict()  # adapter version id -> slot name, LRU first
        self._slot_config: dict[str, object] = {}
        self._params_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._next_slot = 0
        self.stats: Counter = Counter()  # adapter_loads, hotswaps, evictions, batches, rows
        self.batcher = Batcher(self, max_batch=batch_size, wait_s=batch_wait_s)
        tok_max = getattr(self.tokenizer, "model_max_length", None) or 0
        self.context_window = min(loaded.context_window, tok_max) if 0 < tok_max < 10**7 else loaded.context_window
        eos = self.base.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else self.tokenizer.eos_token_id]
        self.eos_ids = {int(e) for e in eos if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids)))

    # ---- adapters (batcher thread only) ---------------------------------------------------------
    def resident(self, version_id: str) -> bool:
        return version_id in self.slots

    def ensure_adapter(self, handle: AdapterHandle, pinned: set[str] = frozenset()) -> str:
        """Make this adapter resident and return its slot. Adapters in ``pinned`` (the rest of the
        batch being formed) are never evicted for it."""
        slot = self.slots.get(handle.version_id)
        if slot is None:
            if len(pinned | {handle.version_id}) > self.max_adapters:
                raise ValueError(f"more than {self.max_adapters} adapters needed at once")
            slot = self._place(Path(handle.locate()), pinned=set(pinned) | {handle.version_id})
            self.slots[handle.version_id] = slot
        self.slots.move_to_end(handle.version_id)
        return slot

    def _place(self, path: Path, pinned: set[str]) -> str:
        from peft import PeftConfig

        if not (path / WEIGHTS).is_file():
            raise ValueError(f"adapter folder {path} has no {WEIGHTS} (weights are loaded from safetensors only)")
        config = PeftConfig.from_pretrained(str(path))
        if len(self.slots) < self.max_adapters:
            return self._load(path)
        victim = next(v for v in self.slots if v not in pinned)
        slot = self.slots.pop(victim)
        self.stats["evictions"] += 1
        if _lora_signature(self._slot_config[slot]) == _lora_signature(config):
            try:
                self._hotswap(path, slot, config)
                return slot
            except (RuntimeError, ValueError, KeyError) as exc:  # keys differ: fall back to a fresh slot
                log.info("hot-swap into %s refused (%s); loading a new slot", slot, exc)
        if len(self._slot_config) == 1:  # PEFT keeps at least one adapter: load the new one first
            new_slot = self._load(path)
            self._delete(slot)
            return new_slot
        self._delete(slot)
        return self._load(path)

    def _load(self, path: Path) -> str:
        from peft import PeftModel

        self._next_slot += 1
        slot = f"fslot{self._next_slot:06d}"
        t0 = time.perf_counter()
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=slot, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=slot, is_trainable=False)
        self.model.eval()
        self._slot_config[slot] = self.model.peft_config[slot]
        self.stats["adapter_loads"] += 1
        log.info("adapter %s loaded into %s in %.3f s", path.name, slot, time.perf_counter() - t0)
        return slot

    def _hotswap(self, path: Path, slot: str, config) -> None:
        """Copy a new adapter's weights into an existing slot with the same LoRA config (same modules,
        rank, alpha: the scaling stays right). All keys and shapes are checked before anything is copied."""
        from safetensors.torch import load_file

        weights = load_file(str(path / WEIGHTS), device=str(self.device))
        params = self._slot_params(slot)
        if weights.keys() != params.keys():
            raise KeyError(f"the new adapter targets other modules than slot {slot}")
        bad = [k for k, t in weights.items() if t.shape != params[k].shape]
        if bad:
            raise ValueError(f"shape mismatch for {bad[0]}")
        with torch.no_grad():
            for k, t in weights.items():
                params[k].copy_(t)
        self.model.peft_config[slot] = config
        config.inference_mode = True
        self._slot_config[slot] = config
        self.stats["hotswaps"] += 1

    def _slot_params(self, slot: str) -> dict[str, torch.Tensor]:
        """The slot's LoRA parameters by their name in a saved adapter file (cached per slot)."""
        cached = self._params_cache.get(slot)
        if cached is None:
            marker = f".{slot}."
            cached = {n.replace(marker, "."): p for n, p in self.model.named_parameters() if marker in n}
            self._params_cache[slot] = cached
        return cached

    def _delete(self, slot: str) -> None:
        self.model.delete_adapter(slot)
        self._slot_config.pop(slot, None)
        self._params_cache.pop(slot, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- generation (batcher thread only) -------------------------------------------------------
    def generate(self, prompts: list[list[int]], slots: list[str | None], max_new_tokens: list[int]) -> list[list[int]]:
        """One greedy ``generate`` over all rows (left-padded, one adapter slot or None per row).
        Returns each row's new tokens, cut at its own max_new_tokens and after its first end token."""
        from peft import PeftModel

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs = {"max_new_tokens": max(max_new_tokens), "do_sample": False, "num_beams": 1,
                  "pad_token_id": self.pad_id, "eos_token_id": sorted(self.eos_ids)}
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [s or BASE for s in slots]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        rows = []
        for i, limit in enumerate(max_new_tokens):
            new = out[i, width:].tolist()[:limit]
            for j, tok in enumerate(new):
                if tok in self.eos_ids:
                    new = new[:j + 1]
                    break
            rows.append(new)
        self.stats["batches"] += 1
        self.stats["rows"] += len(prompts)
        return rows

    def decode(self, token_ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)


# ---- the process-wide registry -------------------------------------------------------------------

_runtimes: dict[str, Runtime] = {}
_registry_lock = threading.Lock()
BASE_LOADS: Counter = Counter()  # runtime key -> times its base model was loaded in this process


def runtime_key(settings: Settings, artifact=None) -> str:
    what = f"artifact:{artifact.id}" if artifact is not None else f"model:{settings.base_model_ref()}"
    return f"{what}@{settings.device}"


def get_runtime(settings: Settings | None = None, artifact=None) -> Runtime:
    """The resident runtime for the deployment's base model (or a tenant's serving artifact, an
    ``artifacts`` row loaded by ``domain.quantization.load_serving_model``); loaded on first use."""
    settings = settings or get_settings()
    key = runtime_key(settings, artifact)
    with _registry_lock:
        rt = _runtimes.get(key)
        if rt is not None:
            return rt
        t0 = time.perf_counter()
        if artifact is not None:
            from domain.quantization import load_serving_model

            loaded = load_serving_model(artifact, device=settings.device)
            model_id = f"{artifact.name or 'artifact'}:{artifact.id}"
        else:
            ref = settings.base_model_ref()
            loaded = load_causal_lm(ref, device=settings.device)
            model_id = model_id_for(ref)
        BASE_LOADS[key] += 1
        rt = Runtime(loaded, key, model_id,
                     max_adapters=int(getattr(settings, "max_resident_adapters", 8)),
                     serving_artifact_id=getattr(artifact, "id", None),
                     batch_size=max(1, int(settings.review_batch_size)),
                     batch_wait_s=float(getattr(settings, "review_batch_wait_ms", 20)) / 1000.0)
        log.info("review runtime %s ready in %.1f s", key, time.perf_counter() - t0)
        _runtimes[key] = rt
        return rt


def reset_runtimes() -> None:
    """Drop every resident model (tests; a worker never needs it)."""
    with _registry_lock:
        for rt in _runtimes.values():
            rt.batcher.stop()
        _runtimes.clear()
    gc.collect()
