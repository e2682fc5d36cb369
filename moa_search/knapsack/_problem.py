"""Input checking, and the problem and solution types that all solver steps share."""

from __future__ import annotations

import dataclasses

import numpy as np

from moa_search.errors import ConfigError
from moa_search.knapsack._hull import _convex_hull, _efficient_mask, _Hull

BUDGET_TOLERANCE = 1e-12
"""A choice is feasible when its total cost is at most ``budget + BUDGET_TOLERANCE``."""


@dataclasses.dataclass(frozen=True, eq=False)
class KnapsackSolution:
    """One optimal choice of candidates.

    Attributes:
        choice: ``[groups]`` int64 candidate index of each group, read-only.
        total_loss: ``sum_g loss[g, choice[g]]``.
        total_cost: ``sum_g weight_g * cost[g, choice[g]]``.
    """

    choice: np.ndarray
    total_loss: float
    total_cost: float


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Validated inputs plus the work that every budget shares.

    Attributes:
        loss: ``[groups, candidates]``, +inf where a candidate is not allowed.
        weighted_cost: ``[groups, candidates]``, ``weight_g * cost[g, c]``.
        allowed: ``[groups, candidates]``, finite loss.
        efficient: ``[groups, candidates]``, allowed and not dominated within its group.
        layer: ``[groups]`` layer index in ``0..layers-1``, or None without the distinct
            constraint.
        max_distinct: at most this many distinct candidates per layer, or None.
        hull: lower convex hulls of the efficient candidates of all groups.
        loss_scale: ``sum_g max_c |loss[g, c]|`` over allowed candidates, the scale of rounding
            errors in loss sums.
    """

    loss: np.ndarray
    weighted_cost: np.ndarray
    allowed: np.ndarray
    efficient: np.ndarray
    layer: np.ndarray | None
    max_distinct: int | None
    hull: _Hull
    loss_scale: float

    @property
    def num_groups(self) -> int:
        return int(self.loss.shape[0])

    def total_loss(self, choice: np.ndarray) -> float:
        return float(np.sum(self.loss[np.arange(self.num_groups), choice]))

    def total_cost(self, choice: np.ndarray) -> float:
        return float(np.sum(self.weighted_cost[np.arange(self.num_groups), choice]))

    def slack(self) -> float:
        """Return the allowance for rounding errors when comparing loss sums."""
        return 1e-9 * (1.0 + self.loss_scale)

    def min_cost(self) -> float:
        """Return the cost of the cheapest allowed choice, ignoring the distinct constraint."""
        return float(np.sum(np.where(self.allowed, self.weighted_cost, np.inf).min(axis=1)))


def _prepare(
    loss: np.ndarray,
    cost: np.ndarray,
    weights: np.ndarray | None,
    layer_of_group: np.ndarray | None,
    max_distinct_per_layer: int | None,
) -> _Problem:
    loss = np.array(loss, dtype=np.float64)
    cost = np.array(cost, dtype=np.float64)
    if loss.ndim != 2 or loss.shape != cost.shape or loss.size == 0:
        raise ConfigError(
            f"invalid shapes loss {loss.shape} and cost {cost.shape}: both must be the same "
            "non-empty [groups, candidates]"
        )
    if np.isnan(loss).any() or np.isneginf(loss).any():
        raise ConfigError(
            "invalid loss: NaN or -inf found. Use finite values, or +inf to forbid a candidate"
        )
    if not np.isfinite(cost).all():
        raise ConfigError("invalid cost: NaN or infinite value found. Every cost must be finite")
    allowed = np.isfinite(loss)
    blocked = np.flatnonzero(~allowed.any(axis=1))
    if blocked.size:
        raise ConfigError(
            f"invalid loss: group {int(blocked[0])} has +inf loss for every candidate. "
            "Each group needs at least one candidate with finite loss"
        )

    num_groups, num_candidates = loss.shape
    weighted_cost = _check_weights(weights, num_groups)[:, None] * cost
    layer, max_distinct = _check_layers(layer_of_group, max_distinct_per_layer, num_groups)
    if max_distinct is not None and max_distinct >= num_candidates:
        layer, max_distinct = None, None  # the limit cannot bind

    efficient = _efficient_mask(loss, weighted_cost)
    hull = _convex_hull(loss, weighted_cost, efficient, np.arange(num_groups))
    loss_scale = float(np.sum(np.abs(np.where(allowed, loss, 0.0)).max(axis=1)))
    return _Problem(loss, weighted_cost, allowed, efficient, layer, max_distinct, hull, loss_scale)


def _check_budget(budget: float) -> float:
    budget = float(budget)
    if not budget > 0:
        raise ConfigError(f"invalid budget={budget!r}: use a total cost > 0")
    return budget


def _check_weights(weights: np.ndarray | None, num_groups: int) -> np.ndarray:
    if weights is None:
        return np.full(num_groups, 1.0 / num_groups)
    weights = np.array(weights, dtype=np.float64)
    if weights.shape != (num_groups,):
        raise ConfigError(
            f"invalid weights shape {weights.shape}: expected [groups] = ({num_groups},)"
        )
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ConfigError("invalid weights: every weight must be finite and > 0")
    return weights


def _check_layers(
    layer_of_group: np.ndarray | None, max_distinct: int | None, num_groups: int
) -> tuple[np.ndarray | None, int | None]:
    if max_distinct is None:
        return None, None
    if (
        isinstance(max_distinct, bool)
        or not isinstance(max_distinct, (int, np.integer))
        or max_distinct < 1
    ):
        raise ConfigError(
            f"invalid max_distinct_per_layer={max_distinct!r}: use a whole number >= 1 or None"
        )
    if layer_of_group is None:
        raise ConfigError(
            "missing layer_of_group: max_distinct_per_layer needs the layer of each group"
        )
    layers = np.asarray(layer_of_group)
    if layers.shape != (num_groups,):
        raise ConfigError(
            f"invalid layer_of_group shape {layers.shape}: expected one layer per group, "
            f"({num_groups},)"
        )
    if not np.issubdtype(layers.dtype, np.integer):
        raise ConfigError(
            f"invalid layer_of_group dtype {layers.dtype}: use integer layer indices"
        )
    _, layer = np.unique(layers, return_inverse=True)
    return layer.reshape(-1), int(max_distinct)
