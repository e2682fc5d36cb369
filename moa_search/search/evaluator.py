"""Exact evaluation of one window config: calibration perplexity and modelled cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moa_search.attention import apply_windows, set_windows
from moa_search.cost import mean_area_density, mean_kv_density
from moa_search.evaluate import perplexity
from moa_search.search import interrupts


@dataclass(frozen=True)
class Evaluation:
    """Quality and cost of one config."""

    perplexity: float
    cost: float  # mean area density over heads and cost lengths
    kv_fraction: float  # mean share of the KV cache kept per (layer, KV head)


class WindowEvaluator:
    """Evaluates window configs exactly on fixed token ids, reusing one windowed model.

    Args:
        model: A transformers causal LM; it is switched to windowed attention here.
        input_ids: int64 ``[num_sequences, seq_len]``.
        sink_tokens: Leading tokens every head sees.
        cost_lengths: Lengths the cost model averages over.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        *,
        num_kv_heads: int,
        sink_tokens: int,
        cost_lengths: Sequence[int],
        batch_size: int = 8,
    ):
        self.model = model
        self.input_ids = input_ids
        self.num_kv_heads = num_kv_heads
        self.sink_tokens = sink_tokens
        self.cost_lengths = list(cost_lengths)
        self.batch_size = batch_size
        layers = model.config.get_text_config().num_hidden_layers
        heads = model.config.get_text_config().num_attention_heads
        apply_windows(model, [[None] * heads for _ in range(layers)], sink_tokens)

    def cost(self, windows: list[list[int | None]]) -> tuple[float, float]:
        """Return ``(cost, kv_fraction)`` of ``[layers][query_heads]`` windows; no forward pass."""
        return (
            mean_area_density(windows, self.cost_lengths, self.sink_tokens),
            mean_kv_density(windows, self.num_kv_heads, self.cost_lengths, self.sink_tokens),
        )

    def perplexity(
        self, windows: list[list[int | None]], input_ids: torch.Tensor | None = None
    ) -> float:
        """Return the perplexity of the model restricted to ``windows`` on the calibration ids (or others)."""
        set_windows(self.model, windows, self.sink_tokens)
        ids = self.input_ids if input_ids is None else input_ids
        with interrupts.immediate():
            return perplexity(self.model, ids, batch_size=self.batch_size)

    def evaluate(self, windows: list[list[int | None]]) -> Evaluation:
        """Measure perplexity and model the cost of one config."""
        cost, kv_fraction = self.cost(windows)
        return Evaluation(self.perplexity(windows), cost, kv_fraction)
