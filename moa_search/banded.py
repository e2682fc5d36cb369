"""Windowed attention that computes only the band of keys each query block can see.

With window W, a block of queries needs at most ``block + W - 1`` recent keys plus the sink keys,
so the work per layer falls from ``T²`` to about ``T·(W + block)``. The result equals attention
with the full mask of :func:`moa_search.masks.head_window_mask`: the same scores over the same
visible keys, in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa_search.masks import is_visible

# Query rows per block. Small blocks waste less work on the band's triangle ends; large ones make
# fewer calls.
MIN_BLOCK = 64
MAX_BLOCK = 256


def block_size(window: int) -> int:
    """Choose the query block for a window: about the window, clamped to [MIN_BLOCK, MAX_BLOCK]."""
    return max(MIN_BLOCK, min(window, MAX_BLOCK))


def banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    sink_tokens: int,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attend with every head restricted to one window, visiting only the keys in the band.

    The queries are the last ``q_len`` of the ``kv_len`` key positions (a KV cache may hold earlier
    ones).

    Args:
        query: ``[batch, heads, q_len, head_dim]``.
        key, value: ``[batch, heads, kv_len, head_dim]``, already expanded to the query heads.
        window: Window in tokens under :data:`moa_search.masks.WINDOW_CONVENTION`, smaller than
        ``kv_len``.
        sink_tokens: Leading keys every query sees.

    Returns:
        ``[batch, heads, q_len, head_dim]``.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len
    step = block_size(window)
    device = query.device
    blocks = []
    for start in range(0, q_len, step):
        stop = min(start + step, q_len)
        first = max(0, start + offset - window + 1)  # oldest key the block's first query sees
        last = stop + offset  # one past the newest key
        sinks = min(sink_tokens, first)  # sink keys left of the band
        kv_idx = torch.cat(
            [torch.arange(sinks, device=device), torch.arange(first, last, device=device)]
        )
        q_idx = torch.arange(start + offset, stop + offset, device=device)
        mask = is_visible(q_idx.view(-1, 1), kv_idx.view(1, -1), window, sink_tokens)
        if sinks:
            block_key = torch.cat([key[:, :, :sinks], key[:, :, first:last]], dim=2)
            block_value = torch.cat([value[:, :, :sinks], value[:, :, first:last]], dim=2)
        else:
            block_key, block_value = key[:, :, first:last], value[:, :, first:last]
        blocks.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop], block_key, block_value, attn_mask=mask, scale=scaling
            )
        )
    return torch.cat(blocks, dim=2)
