"""Row estimates of the loss increase per candidate window, from float64 prefix sums over keys.

:mod:`moa_search.profile` gives the formulas of both estimators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ESTIMATORS = ("set", "additive")

# Lower bound on the kept mass 1 - m in the set estimator. With W >= 1 the diagonal is always kept,
# so m < 1 in exact arithmetic, but a row whose float32 probabilities put all mass on dropped keys
# rounds m to 1. There the first-order estimate is meaningless anyway; the floor keeps it finite.
KEPT_MASS_FLOOR = 1e-9

# Keys per group in prefix sums. Sums inside a group of keys and across groups are taken in
# float64, and only the group that contains a cut column is summed element by element.
KEY_GROUP = 32


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _GroupedPrefix:
    """Float64 prefix sums of ``values [..., rows, keys]`` over keys, read at a few columns.

    One pass sums groups of :data:`KEY_GROUP` keys. A prefix at column x is then the sum of the
    groups before x's group plus the start of x's group. Each value is read once, and no float64
    copy of the whole block is written as a full cumulative sum would.
    """

    def __init__(self, values: torch.Tensor) -> None:
        keys = values.shape[-1]
        padded = _round_up(keys, KEY_GROUP)
        if padded != keys:
            values = F.pad(values, (0, padded - keys))
        self.groups = values.unflatten(
            -1, (padded // KEY_GROUP, KEY_GROUP)
        )  # [..., rows, groups, KEY_GROUP]
        self.group_sums = self.groups.sum(dim=-1, dtype=torch.float64)  # [..., rows, groups]

    def total(self) -> torch.Tensor:
        """Return the sum over all keys, float64 ``[..., rows, 1]``."""
        return self.group_sums.sum(dim=-1, keepdim=True)

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        """Return ``sum(values[..., r, :x + 1])`` for each ``x = columns[r, c]``, float64.

        Args:
            columns: int64 ``[rows, count]`` key indices in ``[0, keys)``.

        Returns:
            float64 ``[..., rows, count]``.
        """
        lead = self.group_sums.shape[:-2]
        rows, count = columns.shape
        before = F.pad(
            self.group_sums.cumsum(dim=-1)[..., :-1], (1, 0)
        )  # sums of the earlier groups
        group = columns // KEY_GROUP
        prefix = before.gather(-1, group.expand(*lead, rows, count))
        block = self.groups.gather(-2, group[..., None].expand(*lead, rows, count, KEY_GROUP))
        inside = torch.arange(KEY_GROUP, device=columns.device) <= (columns % KEY_GROUP)[..., None]
        return prefix + (block * inside).sum(dim=-1, dtype=torch.float64)


def row_loss_increase(
    attn: torch.Tensor,
    grad: torch.Tensor,
    row_start: int,
    windows: torch.Tensor,
    sink_tokens: int,
    estimators: Sequence[str],
    weighted: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate the loss change of every candidate window for a block of attention rows.

    Elementwise products stay in the input dtype; every sum over keys is taken in float64.

    Args:
        attn: Softmax probabilities ``[..., rows, keys]``; row r is the query at absolute position
            ``row_start + r`` and ``keys >= row_start + rows``. Entries right of the diagonal must
            be 0.
        grad: ``dL/dattn``, same shape.
        row_start: Absolute position of the first row.
        windows: int64 ``[candidates]``, :data:`moa_search.masks.FULL_WINDOW` for full attention.
        sink_tokens: Leading keys that every window keeps.
        estimators: Names from :data:`ESTIMATORS`.
        weighted: ``attn * grad`` when the caller already has it.

    Returns:
        Estimator name -> float64 ``[..., rows, candidates]`` estimates in the unit of the loss.
    """
    rows, keys = attn.shape[-2], attn.shape[-1]
    shape = (*attn.shape[:-1], len(windows))
    if keys <= sink_tokens:
        return {
            name: torch.zeros(shape, dtype=torch.float64, device=attn.device)
            for name in estimators
        }

    # Window W drops the keys sink_tokens .. i - W of row i, nothing when i - W < sink_tokens.
    positions = torch.arange(row_start, row_start + rows, device=attn.device)
    last_dropped = positions[:, None] - windows.to(attn.device)[None, :]  # [rows, candidates]
    dropped_any = last_dropped >= sink_tokens
    last_dropped = last_dropped.clamp(min=0)
    last_sink = torch.full((rows, 1), sink_tokens - 1, device=attn.device)

    def dropped_sum(prefix: _GroupedPrefix) -> torch.Tensor:
        sums = prefix.at(last_dropped)
        if sink_tokens > 0:
            sums = sums - prefix.at(last_sink)
        return sums * dropped_any

    if weighted is None:
        weighted = attn * grad
    weighted_prefix = _GroupedPrefix(weighted)
    row_total = weighted_prefix.total()  # S = sum_j A_j g_j, [..., rows, 1]
    result = {}
    if "set" in estimators:
        mass = dropped_sum(_GroupedPrefix(attn))
        dropped_weighted = dropped_sum(weighted_prefix)
        kept_mass = (1.0 - mass).clamp(min=KEPT_MASS_FLOOR)
        result["set"] = (row_total - dropped_weighted) * mass / kept_mass - dropped_weighted
    if "additive" in estimators:
        floor = max(KEPT_MASS_FLOOR, torch.finfo(attn.dtype).eps)
        single = attn * (row_total.to(attn.dtype) - grad) / (1.0 - attn).clamp(min=floor)
        result["additive"] = dropped_sum(_GroupedPrefix(single))
    return result


@dataclass
class _LayerStatistics:
    """Candidate windows of one layer and the estimates accumulated over backward passes."""

    windows: torch.Tensor  # int64 [candidates]
    sink_tokens: int
    estimators: tuple[str, ...]
    sums: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # name -> float64 [query_heads, candidates]
    calls: int = 0

    def add(
        self, attn: torch.Tensor, grad: torch.Tensor, row_start: int, weighted: torch.Tensor
    ) -> None:
        """Add the estimates of a block of rows ``[batch, query_heads, rows, keys]``."""
        block = row_loss_increase(
            attn, grad, row_start, self.windows, self.sink_tokens, self.estimators, weighted
        )
        for name, values in block.items():
            per_head = values.sum(dim=(0, 2)).cpu()  # [query_heads, candidates]
            if name in self.sums:
                self.sums[name] += per_head
            else:
                self.sums[name] = per_head
