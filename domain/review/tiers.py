"""The CPU-memory tier of adapters: recently used adapter weights kept in host memory, bounded by count.

Serving engines keep adapters in tiers: resident GPU slots (the review runtime's) → CPU memory (here)
→ local disk (the data folder or this host's cache, domain/storage.py) → the artifact store. A review
worker swapping an adapter into a slot reads its weights from here when they are in memory, so switching
back and forth between a few tenants' adapters reads no file. ``FOUNDRY_CPU_ADAPTERS`` bounds the count
(least recently used dropped first). Entries are keyed by the file's path, size and mtime, so a changed
file is read again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path


class CpuTier:
    def __init__(self, max_count: int):
        self.max_count = max(0, int(max_count))
        self._items: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "reads": 0, "dropped": 0}

    def weights(self, file: Path) -> dict:
        """The tensors of a safetensors file, on the CPU (from memory when they are there)."""
        from safetensors.torch import load_file

        st = os.stat(file)
        key = (str(file), st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.stats["hits"] += 1
                return found
        tensors = load_file(str(file), device="cpu")
        with self._lock:
            self.stats["reads"] += 1
            if self.max_count:
                self._items[key] = tensors
                while len(self._items) > self.max_count:
                    self._items.popitem(last=False)
                    self.stats["dropped"] += 1
        return tensors

    def __len__(self) -> int:
        return len(self._items)


_tier: CpuTier | None = None


def cpu_tier() -> CpuTier:
    global _tier
    if _tier is None:
        from domain.config import get_settings

        _tier = CpuTier(get_settings().cpu_adapters)
    return _tier
