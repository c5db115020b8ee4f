"""Held-out text from the standard library and the measurements the quantize/distill reports are made of."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from domain import heldout


def test_split_is_fixed_by_file_name_and_disjoint():
    train, held = heldout.stdlib_files("train"), heldout.stdlib_files("heldout")
    assert train and held and not {p.name for p in train} & {p.name for p in held}
    assert 0.1 < len(held) / (len(held) + len(train)) < 0.3
    assert heldout.split_of("textwrap.py") == heldout.split_of("textwrap.py")
    # pinned examples: the split must not drift between machines or releases of this code
    assert {n: heldout.split_of(n) for n in ("abc.py", "ast.py", "typing.py", "re.py", "difflib.py")} == \
        {"abc.py": "train", "ast.py": "heldout", "typing.py": "train", "re.py": "heldout", "difflib.py": "train"}
    text = heldout.stdlib_text("heldout", max_chars=5000)
    assert len(text) == 5000 and text.startswith(f"# file: {held[0].name}\n")
    with pytest.raises(ValueError):
        heldout.stdlib_files("test")


def test_token_blocks_cut_full_blocks_only(tiny_tokenizer):
    text = heldout.stdlib_text("heldout", 20_000)
    blocks = heldout.token_blocks(tiny_tokenizer, text, seq_len=64, max_tokens=1000)
    assert blocks.shape == (15, 64) and blocks.dtype == torch.long
    assert heldout.token_blocks(tiny_tokenizer, "x = 1", seq_len=64).shape == (0, 64)


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same table row for every position."""

    def __init__(self, row: list[float]):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(row))

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, n, -1))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    blocks = torch.randint(0, 8, (3, 10))
    q = heldout.perplexity(FixedLogits([0.0] * 8), blocks, batch_size=2)
    assert q.perplexity == pytest.approx(8.0) and q.tokens == 3 * 9 and q.tokens_per_s > 0


def test_compare_matches_a_hand_computation():
    ref, cand = FixedLogits([2.0, 0.0, 0.0]), FixedLogits([0.0, 1.0, 0.0])
    blocks = torch.tensor([[0, 1, 2, 0]])
    c = heldout.compare(ref, cand, blocks)
    p = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    q = [1 / (math.e + 2), math.e / (math.e + 2), 1 / (math.e + 2)]
    assert c.kl_divergence == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert c.top1_agreement == 0.0 and c.tokens == 3
    assert c.perplexity_reference == pytest.approx(math.exp(-(math.log(p[1]) + math.log(p[2]) + math.log(p[0])) / 3), rel=1e-5)
    same = heldout.compare(ref, ref, blocks)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0


def test_empty_blocks_are_refused():
    with pytest.raises(ValueError, match="no held-out tokens"):
        heldout.perplexity(FixedLogits([0.0]), torch.zeros(0, 8, dtype=torch.long))


class CountingLogits(FixedLogits):
    """FixedLogits that records the shape of every forward."""

    def __init__(self, row: list[float]):
        super().__init__(row)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        return super().forward(input_ids, use_cache)


@pytest.mark.parametrize("rows,batch_size", [(1, 4), (4, 4), (7, 4), (9, 2), (0, 4)])
def test_reference_passes_run_exactly_the_forwards_compare_runs_of_its_reference(rows, batch_size):
    """The helpers of an fsdp distill run reference_passes while rank 0 runs compare over a sharded teacher:
    each forward all-gathers on every rank, so the two must make the same calls in the same order."""
    blocks = torch.randint(0, 3, (rows, 6))
    in_compare, in_passes = CountingLogits([1.0, 0.0, 0.0]), CountingLogits([1.0, 0.0, 0.0])
    if rows:
        heldout.compare(in_compare, FixedLogits([0.0, 1.0, 0.0]), blocks, batch_size=batch_size)
    else:
        with pytest.raises(ValueError):  # refused before any forward
            heldout.compare(in_compare, FixedLogits([0.0, 1.0, 0.0]), blocks, batch_size=batch_size)
    heldout.reference_passes(in_passes, blocks, batch_size=batch_size)
    assert in_passes.calls == in_compare.calls and len(in_passes.calls) == math.ceil(rows / batch_size)
