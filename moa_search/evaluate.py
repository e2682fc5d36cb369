"""Token-weighted perplexity of a causal LM over packed sequences."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def negative_log_likelihood(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """Sum the next-token NLL over every predicted token of every sequence.

    Args:
        input_ids: int64 ``[num_sequences, seq_len]``; token t is predicted from tokens
            ``0..t-1`` for t >= 1, so each sequence contributes ``seq_len - 1`` predictions.
        progress: Called as ``progress(done_sequences, num_sequences)`` after each batch.

    Returns:
        ``(nll_sum, predicted_tokens)``, the sum in nats, accumulated in float64.
    """
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    num_sequences = input_ids.shape[0]
    with torch.inference_mode():
        for start in range(0, num_sequences, batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # [batch, seq_len, vocab]
            predicted = logits[:, :-1].flatten(0, 1)
            targets = batch[:, 1:].flatten()
            total += F.cross_entropy(predicted.double(), targets, reduction="sum").item()
            count += targets.numel()
            if progress is not None:
                progress(min(start + batch_size, num_sequences), num_sequences)
    return total, count


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Return ``exp(total NLL / predicted tokens)`` over ``input_ids`` ``[num_sequences, seq_len]``.

    The mean is token-weighted over all sequences, never a mean of per-sequence perplexities.
    """
    total, count = negative_log_likelihood(
        model, input_ids, batch_size=batch_size, progress=progress
    )
    return math.exp(total / count)
