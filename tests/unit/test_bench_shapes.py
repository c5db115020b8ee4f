"""The benchmarks' random-weights mode (bench/_shapes.py), which the GPU check runs: the model folder it
writes loads through Foundry's own loader, the tokenizer speaks ChatML, and greedy decoding never stops early
(every request yields exactly max_new_tokens). Built with 2 of the 30 layers to stay fast; the shapes of each
layer are SmolLM2-135M's."""

from __future__ import annotations

import torch

from bench import _shapes
from domain.models import load_causal_lm


def test_the_random_weights_model_loads_speaks_chatml_and_never_stops_early(tmp_path):
    ref = _shapes.random_smollm2(tmp_path / "random", layers=2)
    assert _shapes.random_smollm2(tmp_path / "random", layers=2) == ref  # made once: the stamp matches
    loaded = load_causal_lm(str(ref), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 1536, 9, 3)
    assert cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings and len(tok) == cfg.vocab_size == 50259

    prompt = tok.apply_chat_template([{"role": "user", "content": "def f(x): return eval(x)"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.rstrip().endswith("<|im_start|>assistant")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 12 and tok.eos_token_id not in new and tok.pad_token_id not in new
