"""The CPU-memory tier of adapter weights (domain/review/tiers.py): bounded by count, LRU, re-reads a
changed file."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from domain.review.tiers import CpuTier


def write(path, value: float) -> None:
    save_file({"w": torch.full((4, 4), value)}, str(path))


def test_weights_come_from_memory_until_dropped_least_recently_used_first(tmp_path):
    files = [tmp_path / f"a{i}.safetensors" for i in range(3)]
    for i, f in enumerate(files):
        write(f, float(i))
    tier = CpuTier(max_count=2)
    assert tier.weights(files[0])["w"][0, 0] == 0.0
    tier.weights(files[1])
    assert tier.weights(files[0]) is tier.weights(files[0])  # from memory, no read
    tier.weights(files[2])  # drops a1, the least recently used
    assert tier.stats == {"hits": 2, "reads": 3, "dropped": 1} and len(tier) == 2
    tier.weights(files[1])
    assert tier.stats["reads"] == 4


def test_a_changed_file_is_read_again_and_zero_keeps_nothing(tmp_path):
    f = tmp_path / "a.safetensors"
    write(f, 1.0)
    tier = CpuTier(max_count=4)
    tier.weights(f)
    write(f, 2.0)
    os.utime(f, ns=(1, 10**18))
    assert tier.weights(f)["w"][0, 0] == 2.0
    none = CpuTier(max_count=0)
    none.weights(f)
    assert len(none) == 0 and none.weights(f)["w"][0, 0] == 2.0
