"""Window convention and attention masks.

Every part of moa-search (search, cost model, masks, exports and the attention adapter) uses the
one convention in :data:`WINDOW_CONVENTION`. The functions here are pure: they build masks from
integers and tensors and never touch a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from moa_search.errors import ConfigError

WINDOW_CONVENTION = (
    "query i sees key j iff j <= i and (i - j < window or j < sink_tokens); the window counts the query "
    "itself (window 1 is the diagonal); a null window or a window >= the sequence length is full causal "
    "attention; positions are absolute token indices starting at 0"
)

# Stand-in for a full window inside integer tensors: larger than any sequence length a model can
# have.
FULL_WINDOW = 2**62


class MaskMod(Protocol):
    """A mask predicate in FlexAttention's form: True where query ``q_idx`` may attend to key ``kv_idx``."""

    def __call__(
        self, batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor: ...


def check_window(window: int | None, *, what: str = "window") -> None:
    """Raise :class:`ConfigError` unless ``window`` is None (full attention) or an integer >= 1."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(
            f"invalid {what} {window!r}: a window is a whole number of tokens >= 1 (1 is the diagonal) "
            "or null for full attention"
        )


def check_sink_tokens(sink_tokens: int) -> None:
    """Raise :class:`ConfigError` unless ``sink_tokens`` is an integer >= 0."""
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ConfigError(f"invalid sink_tokens {sink_tokens!r}: use a whole number >= 0")


def window_tensor(windows: Sequence[int | None]) -> torch.Tensor:
    """Convert windows (None = full) to an int64 tensor ``[heads]`` with :data:`FULL_WINDOW` for None."""
    for window in windows:
        check_window(window)
    return torch.tensor([FULL_WINDOW if w is None else w for w in windows], dtype=torch.int64)


def is_visible(
    q_idx: torch.Tensor, kv_idx: torch.Tensor, window: torch.Tensor | int, sink_tokens: int
) -> torch.Tensor:
    """Apply the window convention elementwise (broadcasting) and return a bool tensor.

    Note:
        ``kv_idx <= q_idx and (q_idx - kv_idx < window or kv_idx < sink_tokens)``, with absolute positions.
    """
    distance = q_idx - kv_idx
    return (distance >= 0) & ((distance < window) | (kv_idx < sink_tokens))


def sliding_window(window_tokens: int | None, sink_tokens: int = 0) -> MaskMod:
    """Build a FlexAttention mask_mod for one window under :data:`WINDOW_CONVENTION`.

    Args:
        window_tokens: Keys visible behind and including the query; None for full causal attention.
        sink_tokens: Leading keys every query sees, on top of the window.
    """
    check_window(window_tokens, what="window_tokens")
    check_sink_tokens(sink_tokens)
    window = FULL_WINDOW if window_tokens is None else window_tokens

    def mask_mod(
        batch: torch.Tensor, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return is_visible(q_idx, kv_idx, window, sink_tokens)

    mask_mod.__name__ = f"sliding_window_{window_tokens or 'full'}_sink_{sink_tokens}"
    return mask_mod


def head_window_mask(
    windows: torch.Tensor,
    sink_tokens: int,
    q_len: int,
    kv_len: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Build the boolean mask of every head for one attention call.

    The queries are the last ``q_len`` of ``kv_len`` positions (``q_len < kv_len`` when a KV cache
    holds earlier tokens), so query row r sits at absolute position ``kv_len - q_len + r``.

    Args:
        windows: int64 ``[heads]``, one window per query head (:data:`FULL_WINDOW` for full
        attention).
        sink_tokens: Leading keys every query sees.
        q_len: Number of query positions.
        kv_len: Number of key positions.

    Returns:
        bool ``[heads, q_len, kv_len]``, True where the query may attend to the key.
    """
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device).view(1, q_len, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, kv_len)
    return is_visible(q_idx, kv_idx, windows.to(device).view(-1, 1, 1), sink_tokens)
