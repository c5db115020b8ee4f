"""Foundry's repetition control inside vLLM's sampler (imports vllm: only the vLLM engine loads this module).

vLLM builds its logits processors in its engine process from the class given to ``LLM(logits_processors=...)``;
a request asks for the ban through ``SamplingParams.extra_args[NGRAM_ARG]``. The ban is
``domain.review.decoding.banned_tokens`` over the request's generated tokens (not the prompt), as
``next_token`` applies it in Foundry's own decoder, so greedy rows pick the same tokens on both engines.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from domain.review.decoding import banned_tokens

NGRAM_ARG = "foundry_no_repeat_ngram"


class NoRepeatNGram(AdapterLogitsProcessor):
    """Bans the tokens that would complete an n-gram already generated (``DecodeControl.no_repeat_ngram``)."""

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy choice

    def new_req_logits_processor(self, params):
        n = int((params.extra_args or {}).get(NGRAM_ARG) or 0)
        if n <= 0:
            return None

        def ban(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            banned = banned_tokens(output_ids, n)
            if not banned:
                return logits
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
            return logits

        return ban
