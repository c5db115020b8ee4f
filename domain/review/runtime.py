"""The review model runtime: one resident base model per worker process, LoRA adapters on top.

- ``get_runtime(settings, artifact)`` loads the base model once per process (keyed by model ref or
  serving artifact id, and device) and keeps it; later reviews reuse it (``BASE_LOADS`` counts loads).
  It builds the runtime's ``Batcher`` (``rt.batcher``) around it: the batcher takes the runtime as a
  parameter and never imports this module.
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

import contextlib
import copy
import gc
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from domain.config import Settings, get_settings
from domain.artifacts import load_serving_model
from domain.models import LoadedModel, load_causal_lm
from domain.review.batcher import AdapterHandle, Batcher
from domain.review.decoding import cut_at_stop, next_token, next_tokens, should_stop
from domain.review.modelinfo import context_window, end_token_ids, model_id_for

log = logging.getLogger(__name__)

BASE = "__base__"
WEIGHTS = "adapter_model.safetensors"
_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "bias",
              "fan_in_fan_out", "modules_to_save", "layers_to_transform")


def _lora_signature(config) -> tuple:
    d = config.to_dict()
    targets = d.get("target_modules")
    targets = tuple(sorted(targets)) if isinstance(targets, (list, set, tuple)) else targets
    return (str(d.get("peft_type")), targets, *(json.dumps(d.get(k), sort_keys=True, default=str) for k in _LORA_KEYS))


class Runtime:
    def __init__(self, loaded: LoadedModel, key: str, model_id: str, *, max_adapters: int = 8,
                 serving_artifact_id: str | None = None):
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
        self._prefix_cache: OrderedDict[tuple, object] = OrderedDict()  # (slot, prefix ids) -> KV cache
        self._next_slot = 0
        self.stats: Counter = Counter()  # adapter_loads, hotswaps, evictions, batches, rows, prefix_hits
        self.timings: Counter = Counter()  # prefill_s, decode_s, decode_steps (benchmarks, tuning)
        self.batcher: Batcher | None = None  # set by get_runtime (or a test or benchmark) around this runtime
        self.context_window = context_window(loaded.context_window, self.tokenizer)
        self.eos_ids = end_token_ids(self.base.generation_config, self.tokenizer)
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

    def evict(self, version_id: str) -> bool:
        """Drop a resident adapter and hand its memory back (GPU memory included); False if it was not resident.
        The last one goes with PEFT's wrapper: the model is the bare base again until the next adapter."""
        slot = self.slots.pop(version_id, None)
        if slot is None:
            return False
        self.stats["evictions"] += 1
        self._delete(slot)
        return True

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
        from domain.review.tiers import cpu_tier

        weights = cpu_tier().weights(path / WEIGHTS)  # the CPU-memory tier; copy_ below moves them to the device
        params = self._slot_params(slot)
        if weights.keys() != params.keys():
            raise KeyError(f"the new adapter targets other modules than slot {slot}")
        bad = [k for k, t in weights.items() if t.shape != params[k].shape]
        if bad:
            raise ValueError(f"shape mismatch for {bad[0]}")
        with torch.no_grad():
            for k, t in weights.items():
                params[k].copy_(t)
        self._forget_prefixes(slot)
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
        if set(self._slot_config) == {slot}:  # PEFT keeps at least one adapter: unwrap to the base instead
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(slot)
        self._slot_config.pop(slot, None)
        self._params_cache.pop(slot, None)
        self._forget_prefixes(slot)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- generation (batcher thread only) -------------------------------------------------------
    def generate(self, prompts: list[list[int]], slots: list[str | None], max_new_tokens: list[int],
                 prefix_lens: list[int] | None = None, controls: list | None = None) -> list[list[int]]:
        """Greedy generation for all rows at once, one adapter slot (or None: the base) per row. Returns
        each row's new tokens, cut at its own ``max_new_tokens`` and after its first end token.
        ``prefix_lens[i]``: the first tokens of row i that all reviews share (the system prompt): their
        keys/values are computed once per adapter slot and reused.

        Each prompt is prefilled alone (no padding: on a CPU the prefill is compute-bound and padded
        positions would cost as much as real ones); the rows' key/value caches are then left-padded into
        one batch and decoded together, one token per step for all rows, dropping finished rows.
        ``controls[i]``: row i's repetition control and stop rule (domain.review.decoding), or None."""
        controls = controls or [None] * len(prompts)
        with torch.inference_mode():
            rows = self._prefill_then_decode(prompts, slots, max_new_tokens, prefix_lens or [0] * len(prompts), controls)
            if rows is None:  # a cache layout this path does not merge: HF generate, left-padded
                rows = self._generate_padded(prompts, slots, max_new_tokens, controls)
                self.stats["padded_batches"] += 1
        self.stats["batches"] += 1
        self.stats["rows"] += len(prompts)
        return rows

    def _adapter_kwargs(self, names: list[str]) -> dict:
        from peft import PeftModel

        return {"adapter_names": names} if isinstance(self.model, PeftModel) else {}

    def _prefix(self, ids: list[int], name: str):
        """A copy of the key/value cache of ``ids`` (a shared prompt prefix) under adapter ``name``."""
        key = (name, tuple(ids))
        cache = self._prefix_cache.get(key)
        if cache is None:
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            cache = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **self._adapter_kwargs([name])).past_key_values
            self._prefix_cache[key] = cache
            while len(self._prefix_cache) > 2 * self.max_adapters + 2:
                self._prefix_cache.popitem(last=False)
        self._prefix_cache.move_to_end(key)
        self.stats["prefix_hits"] += 1
        return copy.deepcopy(cache)

    def _forget_prefixes(self, slot: str) -> None:
        for key in [k for k in self._prefix_cache if k[0] == slot]:
            del self._prefix_cache[key]

    def _prefill_then_decode(self, prompts, slots, max_new_tokens, prefix_lens, controls) -> list[list[int]] | None:
        names = [s or BASE for s in slots]
        t_prefill = time.perf_counter()
        prefilled = self._prefill(prompts, names, prefix_lens, controls)
        if prefilled is None:
            return None
        caches, outs = prefilled
        t_decode = time.perf_counter()
        lens = [len(p) for p in prompts]
        cache, mask = self._one_batch_cache(caches, lens, room=max(1, max(max_new_tokens)))
        del caches
        steps = self._decode(cache, mask, outs, names, lens, max_new_tokens, controls)
        self.timings["prefill_s"] += t_decode - t_prefill
        self.timings["decode_s"] += time.perf_counter() - t_decode
        self.timings["decode_steps"] += steps
        return outs

    def _prefill(self, prompts, names, prefix_lens, controls):
        """Each prompt alone (its shared prefix from the prefix cache): (key/value caches, first tokens),
        or None for a cache layout the batched decoder does not merge."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        caches, outs = [], []
        for ids, name, p in zip(prompts, names, prefix_lens):
            p = p if 0 < p < len(ids) else 0
            past = self._prefix(ids[:p], name) if p else None
            x = torch.tensor([ids[p:]], dtype=torch.long, device=self.device)
            out = self.model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1,
                             **self._adapter_kwargs([name]))
            cache = out.past_key_values
            if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
                return None
            caches.append(cache)
            outs.append([next_token(out.logits[0, -1], [], controls[len(outs)])])
        return caches, outs

    def _one_batch_cache(self, caches, lens: list[int], room: int):
        """The rows' caches left-padded into one (with ``room`` preallocated steps), and its attention mask."""
        from domain.review.kvcache import PreallocatedLayer

        width = max(lens)
        cache = caches[0]
        for li, layer in enumerate(cache.layers):  # left-pad every row's keys/values to the longest prompt
            layer.keys = torch.cat([torch.nn.functional.pad(c.layers[li].keys, (0, 0, width - n, 0))
                                    for c, n in zip(caches, lens)])
            layer.values = torch.cat([torch.nn.functional.pad(c.layers[li].values, (0, 0, width - n, 0))
                                      for c, n in zip(caches, lens)])
        cache.layers = [PreallocatedLayer.wrap(layer, room) for layer in cache.layers]
        mask = torch.zeros((len(lens), width), dtype=torch.long, device=self.device)
        for i, n in enumerate(lens):
            mask[i, width - n:] = 1
        return cache, mask

    def _decode(self, cache, mask, outs: list[list[int]], names: list[str], lens: list[int],
                max_new_tokens: list[int], controls: list) -> int:
        """Greedy decoding of all unfinished rows together, one token per step, dropping finished rows (each
        row's repetition control and stop rule in ``controls``); appends to ``outs`` and returns the number of steps."""
        from peft import PeftModel

        from domain.review.mixed_lora import MixedLoRA

        def done(i: int) -> bool:
            return (outs[i][-1] in self.eos_ids or len(outs[i]) >= max_new_tokens[i]
                    or should_stop(outs[i], controls[i]))

        active = [i for i in range(len(outs)) if not done(i)]
        if len(active) < len(outs):
            keep = torch.tensor(active, dtype=torch.long, device=self.device)
            cache.batch_select_indices(keep)
            mask = mask[keep]
        step = 0
        row_names = [names[i] for i in active]
        mixed = MixedLoRA(self.model) if isinstance(self.model, PeftModel) and active else None
        fast = mixed is not None and mixed.supported(row_names)
        self.stats["fused_lora_batches" if fast else "peft_lora_batches"] += 1
        with mixed.rows(row_names) if fast else contextlib.nullcontext() as rows:
            while active:
                step += 1
                tokens = torch.tensor([[outs[i][-1]] for i in active], dtype=torch.long, device=self.device)
                positions = torch.tensor([[lens[i] + step - 1] for i in active], dtype=torch.long, device=self.device)
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                adapters = {} if fast else self._adapter_kwargs([names[i] for i in active])
                out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True, logits_to_keep=1, **adapters)
                cache = out.past_key_values
                picked = next_tokens(out.logits[:, -1], [outs[i] for i in active], [controls[i] for i in active])
                for i, tok in zip(active, picked):
                    outs[i].append(int(tok))
                still = [j for j, i in enumerate(active) if not done(i)]
                if len(still) < len(active):
                    keep = torch.tensor(still, dtype=torch.long, device=self.device)
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
                    active = [active[j] for j in still]
                    if rows is not None:
                        rows.select(keep)
        return step

    def _generate_padded(self, prompts, slots, max_new_tokens, controls=None) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs = {"max_new_tokens": max(max_new_tokens), "do_sample": False, "num_beams": 1,
                  "pad_token_id": self.pad_id, "eos_token_id": sorted(self.eos_ids)}
        kwargs.update(self._adapter_kwargs([s or BASE for s in slots]))
        controls = controls or [None] * len(prompts)
        ngram = {c.no_repeat_ngram if c else 0 for c in controls}
        if len(ngram) == 1 and next(iter(ngram)):  # HF bans n-grams over the prompt too: only when all rows agree
            kwargs["no_repeat_ngram_size"] = next(iter(ngram))
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        rows = []
        for i, limit in enumerate(max_new_tokens):
            new = out[i, width:].tolist()[:limit]
            for j, tok in enumerate(new):
                if tok in self.eos_ids:
                    new = new[:j + 1]
                    break
            rows.append(cut_at_stop(new, controls[i]))
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
    return f"{what}@{settings.device}" + ("+vllm" if settings.review_engine == "vllm" else "")


def get_runtime(settings: Settings | None = None, artifact=None) -> Runtime:
    """The resident runtime for the deployment's base model (or a tenant's serving artifact, an
    ``artifacts`` row loaded by ``domain.artifacts.load_serving_model``); loaded on first use.
    ``FOUNDRY_REVIEW_ENGINE=vllm``: a ``domain.review.vllm_engine.VllmRuntime`` instead, with the same surface."""
    settings = settings or get_settings()
    key = runtime_key(settings, artifact)
    with _registry_lock:
        rt = _runtimes.get(key)
        if rt is not None:
            return rt
        t0 = time.perf_counter()
        if settings.review_engine == "vllm":  # imported only here: the default path never imports vllm
            from domain.review.vllm_engine import start_vllm_runtime

            rt = _runtimes[key] = start_vllm_runtime(settings, key, artifact, on_dead=forget_runtime)
            BASE_LOADS[key] += 1
            return rt
        if artifact is not None:
            loaded = load_serving_model(artifact, device=settings.device)
            model_id = f"{artifact.name or 'artifact'}:{artifact.id}"
        else:
            ref = settings.base_model_ref()
            loaded = load_causal_lm(ref, device=settings.device)
            model_id = model_id_for(ref)
        BASE_LOADS[key] += 1
        rt = Runtime(loaded, key, model_id, max_adapters=settings.max_resident_adapters,
                     serving_artifact_id=getattr(artifact, "id", None))
        rt.batcher = Batcher(rt, max_batch=settings.review_batch_size, wait_s=settings.review_batch_wait_ms / 1000.0)
        log.info("review runtime %s ready in %.1f s", key, time.perf_counter() - t0)
        _runtimes[key] = rt
        return rt


def forget_runtime(key: str, rt) -> None:
    """Drop this runtime from the registry if it is still the one under ``key`` (a dead vLLM engine)."""
    with _registry_lock:
        if _runtimes.get(key) is rt:
            del _runtimes[key]


def reset_runtimes() -> None:
    """Drop every resident model (tests; a worker never needs it)."""
    with _registry_lock:
        for rt in _runtimes.values():
            if hasattr(rt, "close"):  # the vLLM runtime: its engine process too
                rt.close()
            elif rt.batcher is not None:
                rt.batcher.stop()
        _runtimes.clear()
    gc.collect()
