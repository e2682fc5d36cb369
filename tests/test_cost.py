"""Closed-form costs against counts on the materialised mask."""

from __future__ import annotations

import pytest

from moa_search.cost import (
    area_density,
    causal_pairs,
    kv_density,
    kv_windows,
    mean_area_density,
    mean_kv_density,
    visible_pairs,
)
from moa_search.errors import ConfigError


def brute_force_row_counts(window: int | None, seq_len: int, sink: int) -> list[int]:
    """Count the keys each query sees by testing every (query, key) pair against the convention."""
    counts = []
    for i in range(seq_len):
        visible = 0
        for j in range(i + 1):
            if window is None or i - j < window or j < sink:
                visible += 1
        counts.append(visible)
    return counts


COMBOS = [
    (window, seq_len, sink)
    for seq_len in [1, 2, 3, 5, 16, 33]
    # Windows below, at and above the length, plus full attention.
    for window in [1, 2, 3, 4, 7, 15, 16, 17, 32, 33, 40, None]
    # Sinks of 0, inside the length, equal to it and above it.
    for sink in [0, 1, 2, 5, 16, 33, 50]
]


@pytest.mark.parametrize(("window", "seq_len", "sink"), COMBOS)
def test_visible_pairs_matches_brute_force(window: int | None, seq_len: int, sink: int) -> None:
    expected = sum(brute_force_row_counts(window, seq_len, sink))

    assert visible_pairs(window, seq_len, sink) == expected


@pytest.mark.parametrize(("window", "seq_len", "sink"), COMBOS)
def test_kv_density_is_last_row_share(window: int | None, seq_len: int, sink: int) -> None:
    last_row = brute_force_row_counts(window, seq_len, sink)[-1]

    assert kv_density(window, seq_len, sink) == pytest.approx(last_row / seq_len, rel=1e-15)


@pytest.mark.parametrize(("window", "seq_len", "sink"), COMBOS)
def test_area_density_is_pair_share(window: int | None, seq_len: int, sink: int) -> None:
    pairs = sum(brute_force_row_counts(window, seq_len, sink))
    density = area_density(window, seq_len, sink)

    assert density == pytest.approx(pairs / causal_pairs(seq_len), rel=1e-15)
    assert 0.0 < density <= 1.0


def test_causal_pairs_is_triangle() -> None:
    for seq_len in [1, 2, 10, 512]:
        assert causal_pairs(seq_len) == seq_len * (seq_len + 1) // 2


def find_half_density_case() -> tuple[int, int]:
    """Return the first (seq_len, window) whose visible pairs are half the causal triangle."""
    for seq_len in range(1, 64):
        for window in range(1, seq_len + 1):
            if 4 * sum(brute_force_row_counts(window, seq_len, 0)) == seq_len * (seq_len + 1):
                return seq_len, window
    raise AssertionError("no (seq_len, window) with density exactly 0.5 below length 64")


def test_mean_area_density_averages_heads() -> None:
    seq_len, half_window = find_half_density_case()
    assert area_density(half_window, seq_len) == 0.5

    # One head at density 0.5 and one full head average to 0.75.
    assert mean_area_density([[half_window, None]], [seq_len]) == 0.75
    # The same pair spread over two layers gives the same mean.
    assert mean_area_density([[half_window], [None]], [seq_len]) == 0.75


def test_mean_area_density_weights_lengths_equally() -> None:
    windows = [[4, None], [2, 8]]
    seq_lens = [8, 16, 20]

    expected_per_length = [
        sum(area_density(window, seq_len, 1) for row in windows for window in row) / 4
        for seq_len in seq_lens
    ]
    expected = sum(expected_per_length) / len(seq_lens)
    assert mean_area_density(windows, seq_lens, 1) == pytest.approx(expected, rel=1e-15)


KV_WINDOW_CASES = [
    # (query-head windows of one layer, KV heads, expected KV-head windows)
    ([1, 4, 3, 2], 2, [4, 3]),
    ([1, None, 3, 2], 2, [None, 3]),  # None (full attention) wins over any number
    ([5, 1, 2, 8], 4, [5, 1, 2, 8]),  # one query head per KV head: unchanged
    ([5, 1, 2, 8], 1, [8]),  # multi-query attention: one KV head for all
    ([None, None, None, None], 2, [None, None]),
]


@pytest.mark.parametrize(("layer", "num_kv_heads", "expected"), KV_WINDOW_CASES)
def test_kv_windows_takes_group_max(
    layer: list[int | None], num_kv_heads: int, expected: list[int | None]
) -> None:
    assert kv_windows([layer], num_kv_heads) == [expected]


def test_kv_windows_per_layer() -> None:
    windows = [[1, 2, 3, 4], [None, 1, 6, 6]]

    assert kv_windows(windows, 2) == [[2, 4], [None, 6]]


def test_mean_kv_density_under_gqa() -> None:
    # KV windows are [4, 2] in layer 0 and [None, 8] in layer 1. At length 8 they keep
    # 4/8, 2/8, 8/8 and 8/8 of the cache.
    windows = [[1, 4, 2, 2], [None, 3, 8, 1]]

    assert mean_kv_density(windows, 2, [8]) == pytest.approx((0.5 + 0.25 + 1.0 + 1.0) / 4)


def test_mean_kv_density_with_sinks() -> None:
    # The KV windows are [4, 2]. At length 16 with 2 sinks, the last query keeps 4 + 2 and 2 + 2
    # keys.
    windows = [[1, 4, 2, 2]]

    assert mean_kv_density(windows, 2, [16], sink_tokens=2) == pytest.approx((6 / 16 + 4 / 16) / 2)


def test_mean_kv_density_matches_brute_force() -> None:
    windows = [[1, 7, 3, None, 2, 2, 9, 4]]
    seq_lens = [5, 12]
    sink = 1

    expected_values = []
    for seq_len in seq_lens:
        for kv_window in kv_windows(windows, 4)[0]:
            last_row = brute_force_row_counts(kv_window, seq_len, sink)[-1]
            expected_values.append(last_row / seq_len)
    expected = sum(expected_values) / len(expected_values)

    assert mean_kv_density(windows, 4, seq_lens, sink) == pytest.approx(expected, rel=1e-15)


INVALID_LENGTHS = [
    0,
    -1,
    True,  # bool is an int subclass but not a length
    2.5,
    "8",
]


@pytest.mark.parametrize("seq_len", INVALID_LENGTHS)
def test_invalid_length_raises(seq_len: object) -> None:
    with pytest.raises(ConfigError, match="invalid sequence length"):
        visible_pairs(4, seq_len)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sequence length"):
        causal_pairs(seq_len)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sequence length"):
        area_density(4, seq_len)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sequence length"):
        kv_density(4, seq_len)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid sequence length"):
        mean_area_density([[4]], [16, seq_len])  # type: ignore[list-item]


def test_invalid_window_and_sink_raise() -> None:
    with pytest.raises(ConfigError, match="invalid window"):
        visible_pairs(0, 16)
    with pytest.raises(ConfigError, match="invalid window"):
        kv_density(-2, 16)
    with pytest.raises(ConfigError, match="invalid sink_tokens"):
        area_density(4, 16, -1)
    with pytest.raises(ConfigError, match="invalid sink_tokens"):
        mean_kv_density([[4, 4]], 2, [16], sink_tokens=-1)
