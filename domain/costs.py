"""Usage pricing: turn a job's usage (tokens, seconds) into money with a configurable price table.

The price table (``FOUNDRY_PRICE_TABLE``) is JSON: ``{"version", "currency", "default": {...}, "<model id>": {...}}``
with per-1k-token prices for prompt and completion tokens and per-second prices for GPU and CPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    model_id: str | None = None
    adapter_version_id: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def price(usage: Usage, prices: dict) -> tuple[Decimal, str, str]:
    """(cost, currency, price table version) for one job's usage."""
    table = prices.get(usage.model_id or "", None) or prices.get("default", {})
    d = lambda k: Decimal(str(table.get(k, 0)))  # noqa: E731
    cpu_seconds = max(0.0, usage.wall_seconds - usage.gpu_seconds) if not usage.gpu_seconds else 0.0
    cost = (d("prompt_per_1k") * usage.prompt_tokens / 1000 + d("completion_per_1k") * usage.completion_tokens / 1000
            + d("gpu_second") * Decimal(str(usage.gpu_seconds)) + d("cpu_second") * Decimal(str(cpu_seconds)))
    return cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP), prices.get("currency", "USD"), prices.get("version", "")


def usage_row(usage: Usage, prices: dict) -> dict:
    """The columns of a ``usage_costs`` row for this usage."""
    cost, currency, version = price(usage, prices)
    return {**asdict(usage), "cost": cost, "currency": currency, "price_version": version}
