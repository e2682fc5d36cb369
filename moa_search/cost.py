"""Closed-form attention cost of windowed heads.

Two densities, both relative to dense causal attention over ``seq_len`` tokens and both exact
counts under :data:`moa_search.masks.WINDOW_CONVENTION`:

- ``area_density``: visible (query, key) pairs over the ``seq_len * (seq_len + 1) / 2`` of the
  causal triangle. This is the compute of prefill and the search's cost objective.
- ``kv_density``: keys the last query sees over ``seq_len``; this is the share of the KV cache a
  head keeps while decoding at that length.
"""

from __future__ import annotations

from collections.abc import Sequence

from moa_search.errors import ConfigError
from moa_search.masks import check_sink_tokens, check_window

Windows = Sequence[Sequence[int | None]]


def _check_length(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"invalid sequence length {seq_len!r}: use a whole number >= 1")


def _sum_min(count: int, cap: int) -> int:
    """Return ``sum(min(k, cap) for k in 1..count)`` in closed form."""
    if count <= 0:
        return 0
    if count <= cap:
        return count * (count + 1) // 2
    return cap * (cap + 1) // 2 + (count - cap) * cap


def visible_pairs(window: int | None, seq_len: int, sink_tokens: int = 0) -> int:
    """Count the visible (query, key) pairs of one head over ``seq_len`` tokens.

    Query i sees ``min(i + 1, window)`` keys of its window plus the sink keys left of the window,
    ``max(0, min(sink_tokens, i - window + 1))``; both sums have closed forms.
    """
    check_window(window)
    check_sink_tokens(sink_tokens)
    _check_length(seq_len)
    width = seq_len if window is None else min(window, seq_len)
    in_window = width * (width + 1) // 2 + (seq_len - width) * width
    sinks_outside = _sum_min(seq_len - width, sink_tokens)
    return in_window + sinks_outside


def causal_pairs(seq_len: int) -> int:
    """Count the (query, key) pairs of dense causal attention over ``seq_len`` tokens."""
    _check_length(seq_len)
    return seq_len * (seq_len + 1) // 2


def area_density(window: int | None, seq_len: int, sink_tokens: int = 0) -> float:
    """Return the visible pairs of one head as a fraction of dense causal attention, in (0, 1]."""
    return visible_pairs(window, seq_len, sink_tokens) / causal_pairs(seq_len)


def kv_density(window: int | None, seq_len: int, sink_tokens: int = 0) -> float:
    """Return the share of the KV cache one head keeps while decoding position ``seq_len - 1``, in (0, 1]."""
    check_window(window)
    check_sink_tokens(sink_tokens)
    _check_length(seq_len)
    width = seq_len if window is None else min(window, seq_len)
    return (width + min(sink_tokens, seq_len - width)) / seq_len


def mean_area_density(windows: Windows, seq_lens: Sequence[int], sink_tokens: int = 0) -> float:
    """Average :func:`area_density` over every (layer, query head) and every target length.

    Args:
        windows: ``[layers][query_heads]`` windows, None for full attention.
        seq_lens: Target lengths; the cost at each length is weighted equally.
    """
    values = [
        area_density(window, seq_len, sink_tokens)
        for seq_len in seq_lens
        for layer in windows
        for window in layer
    ]
    return sum(values) / len(values)


def kv_windows(windows: Windows, num_kv_heads: int) -> list[list[int | None]]:
    """Return the window each KV head must keep: the largest window among the query heads that share it.

    Args:
        windows: ``[layers][query_heads]``; query head h reads KV head ``h // (query_heads //
        num_kv_heads)``.

    Returns:
        ``[layers][kv_heads]`` windows, None for full attention.
    """
    result = []
    for layer in windows:
        group = len(layer) // num_kv_heads
        per_kv = []
        for kv_head in range(num_kv_heads):
            members = layer[kv_head * group : (kv_head + 1) * group]
            per_kv.append(None if None in members else max(members))  # type: ignore[type-var]
        result.append(per_kv)
    return result


def mean_kv_density(
    windows: Windows, num_kv_heads: int, seq_lens: Sequence[int], sink_tokens: int = 0
) -> float:
    """Average :func:`kv_density` over every (layer, KV head) and target length, as a KV-cache fraction."""
    values = [
        kv_density(window, seq_len, sink_tokens)
        for seq_len in seq_lens
        for layer in kv_windows(windows, num_kv_heads)
        for window in layer
    ]
    return sum(values) / len(values)
