"""Masks against a brute-force double loop of the window convention."""

from __future__ import annotations

import functools

import pytest
import torch

from moa_search.errors import ConfigError
from moa_search.masks import (
    FULL_WINDOW,
    check_sink_tokens,
    check_window,
    head_window_mask,
    sliding_window,
    window_tensor,
)

LENGTHS = [
    1,  # a single token: every window is full attention
    2,
    7,  # odd, not a power of two
    64,
    100,
    513,  # one past the stories260K context
]
SINKS = [0, 1, 4]


def windows_for(seq_len: int) -> list[int | None]:
    """Return the windows to test at one length: tiny, T - 1, T, T + 5 and full."""
    candidates = [1, 2, 3, seq_len - 1, seq_len, seq_len + 5, None]
    unique: list[int | None] = []
    for window in candidates:
        if (window is None or window >= 1) and window not in unique:
            unique.append(window)
    return unique


CASES = [
    (seq_len, window, sink)
    for seq_len in LENGTHS
    for window in windows_for(seq_len)
    for sink in SINKS
]


@functools.lru_cache(maxsize=None)
def brute_force_mask(seq_len: int, window: int | None, sink: int) -> torch.Tensor:
    """Build the convention's mask, bool ``[seq_len, seq_len]``, with a Python double loop."""
    rows = []
    for i in range(seq_len):
        row = []
        for j in range(seq_len):
            in_window = window is None or i - j < window
            row.append(j <= i and (in_window or j < sink))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def expected_row_count(i: int, window: int | None, sink: int) -> int:
    """Count the keys query i sees: its window plus the sink keys left of the window."""
    if window is None:
        return i + 1
    sinks_left_of_window = max(0, min(sink, i - window + 1))
    return min(i + 1, window) + sinks_left_of_window


@pytest.mark.parametrize(("seq_len", "window", "sink"), CASES)
def test_head_window_mask_matches_brute_force(seq_len: int, window: int | None, sink: int) -> None:
    mask = head_window_mask(window_tensor([window]), sink, seq_len, seq_len)

    assert mask.shape == (1, seq_len, seq_len)
    assert mask.dtype == torch.bool
    assert torch.equal(mask[0], brute_force_mask(seq_len, window, sink))


@pytest.mark.parametrize(("seq_len", "window", "sink"), CASES)
def test_head_window_mask_row_counts(seq_len: int, window: int | None, sink: int) -> None:
    mask = head_window_mask(window_tensor([window]), sink, seq_len, seq_len)

    counts = mask[0].sum(dim=1).tolist()
    expected = [expected_row_count(i, window, sink) for i in range(seq_len)]
    assert counts == expected


@pytest.mark.parametrize(("seq_len", "window", "sink"), CASES)
def test_sliding_window_mask_mod_agrees(seq_len: int, window: int | None, sink: int) -> None:
    mask_mod = sliding_window(window, sink)
    q_idx = torch.arange(seq_len).view(-1, 1)
    kv_idx = torch.arange(seq_len).view(1, -1)
    zero = torch.tensor(0)

    from_mod = mask_mod(zero, zero, q_idx, kv_idx)

    expected = head_window_mask(window_tensor([window]), sink, seq_len, seq_len)[0]
    assert torch.equal(from_mod, expected)
    assert mask_mod.__name__ == f"sliding_window_{window or 'full'}_sink_{sink}"


def test_window_at_or_above_length_is_causal() -> None:
    seq_len = 50
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))

    for window in [seq_len, seq_len + 5, None]:
        mask = head_window_mask(window_tensor([window]), 0, seq_len, seq_len)
        assert torch.equal(mask[0], causal), f"window {window}"


def test_head_window_mask_per_head() -> None:
    seq_len, sink = 40, 2
    windows: list[int | None] = [1, 5, None, 39, 40, 100]

    mask = head_window_mask(window_tensor(windows), sink, seq_len, seq_len)

    assert mask.shape == (len(windows), seq_len, seq_len)
    for head, window in enumerate(windows):
        assert torch.equal(mask[head], brute_force_mask(seq_len, window, sink)), f"head {head}"


@pytest.mark.parametrize(
    ("q_len", "kv_len"),
    [
        (1, 1),  # first decoding step without a prompt
        (1, 20),  # one new token after a 19-token cache
        (3, 20),  # a chunk of three queries after a 17-token cache
        (20, 20),  # prefill
        (5, 513),
    ],
)
@pytest.mark.parametrize("sink", SINKS)
def test_head_window_mask_with_cache_offset(q_len: int, kv_len: int, sink: int) -> None:
    windows: list[int | None] = [1, 2, 3, 8, max(kv_len - 1, 1), kv_len, kv_len + 5, None]

    mask = head_window_mask(window_tensor(windows), sink, q_len, kv_len)

    assert mask.shape == (len(windows), q_len, kv_len)
    for head, window in enumerate(windows):
        # The queries are the last q_len positions, so they match the last q_len rows of the
        # full mask.
        expected = brute_force_mask(kv_len, window, sink)[kv_len - q_len :]
        assert torch.equal(mask[head], expected), f"head {head}, window {window}"


def test_window_tensor_maps_none_to_full() -> None:
    tensor = window_tensor([1, None, 7])

    assert tensor.dtype == torch.int64
    assert tensor.tolist() == [1, FULL_WINDOW, 7]


INVALID_WINDOWS = [
    0,  # a window must contain at least the query itself
    -3,
    True,  # bool is an int subclass but not a token count
    2.5,
    "8",
]


@pytest.mark.parametrize("window", INVALID_WINDOWS)
def test_invalid_window_raises(window: object) -> None:
    with pytest.raises(ConfigError, match="invalid window"):
        check_window(window)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid window"):
        window_tensor([4, window])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="invalid window_tokens"):
        sliding_window(window)  # type: ignore[arg-type]


INVALID_SINKS = [
    -1,
    True,  # bool is an int subclass but not a token count
    1.5,
    None,
]


@pytest.mark.parametrize("sink", INVALID_SINKS)
def test_invalid_sink_tokens_raise(sink: object) -> None:
    with pytest.raises(ConfigError, match="invalid sink_tokens"):
        check_sink_tokens(sink)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sink_tokens"):
        sliding_window(4, sink)  # type: ignore[arg-type]
