"""Lower convex hulls of each group's candidates, and the greedy LP relaxation on them.

The LP relaxation gives the Lagrange multiplier of the budget and a lower bound. Single swaps
improve its integral solution to an upper bound for reduced-cost fixing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moa_search.knapsack._problem import _Problem


@dataclasses.dataclass(frozen=True)
class _Hull:
    """Lower convex hulls of some groups' candidates, as the edges that the LP greedy takes.

    Attributes:
        vertices: ``[groups, max_vertices]`` candidate index of each hull vertex by increasing
            cost, padded with the group's last vertex. The first vertex is the cheapest candidate.
        edge_group: ``[edges]`` position of each edge's group in ``vertices``.
        edge_cost: ``[edges]`` weighted cost that each edge adds, > 0.
        edge_loss: ``[edges]`` loss that each edge adds, < 0.
        efficiency: ``[edges]`` ``-edge_loss / edge_cost``. Edges are sorted by decreasing
            efficiency, and each group's edges stay in hull order.
    """

    vertices: np.ndarray
    edge_group: np.ndarray
    edge_cost: np.ndarray
    edge_loss: np.ndarray
    efficiency: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Relaxation:
    """Lagrangian relaxation of the budget constraint at one budget.

    Attributes:
        choice: ``[groups]`` greedy integral solution, optimal at its own cost.
        multiplier: optimal Lagrange multiplier of the budget, >= 0.
        bound: lower bound on the total loss of every feasible choice.
        reduced_cost: ``[groups, candidates]``, ``loss + multiplier * weighted_cost`` minus its
            row minimum, +inf where not allowed.
        is_optimal: True when the greedy choice is the min-loss choice of every group.
    """

    choice: np.ndarray
    multiplier: float
    bound: float
    reduced_cost: np.ndarray
    is_optimal: bool


def _efficient_mask(loss: np.ndarray, weighted_cost: np.ndarray) -> np.ndarray:
    """Mark candidates that no other allowed candidate of their group dominates."""
    order = np.lexsort((loss, weighted_cost), axis=1)
    sorted_loss = np.take_along_axis(loss, order, axis=1)
    best_cheaper = np.minimum.accumulate(sorted_loss, axis=1)
    best_cheaper = np.concatenate(
        [np.full((loss.shape[0], 1), np.inf), best_cheaper[:, :-1]], axis=1
    )
    # Sorted by (cost, loss), a candidate is efficient when it beats every cheaper-or-equal one.
    efficient_sorted = sorted_loss < best_cheaper
    efficient = np.zeros_like(efficient_sorted)
    np.put_along_axis(efficient, order, efficient_sorted, axis=1)
    return efficient


def _convex_hull(
    loss: np.ndarray, weighted_cost: np.ndarray, mask: np.ndarray, groups: np.ndarray
) -> _Hull:
    """Build the lower convex hulls of the ``mask`` candidates of ``groups``.

    The candidates of each group in ``mask`` must form a Pareto set.
    """
    costs_of = weighted_cost.tolist()
    losses_of = loss.tolist()
    hulls, edge_group, edge_cost, edge_loss = [], [], [], []
    for position, group in enumerate(groups.tolist()):
        costs, losses = costs_of[group], losses_of[group]
        candidates = sorted(np.flatnonzero(mask[group]).tolist(), key=costs.__getitem__)
        hull = _lower_hull([costs[c] for c in candidates], [losses[c] for c in candidates])
        hull = [candidates[vertex] for vertex in hull]
        hulls.append(hull)
        for a, b in itertools.pairwise(hull):
            edge_group.append(position)
            edge_cost.append(costs[b] - costs[a])
            edge_loss.append(losses[b] - losses[a])

    width = max(len(hull) for hull in hulls)
    vertices = np.array([hull + hull[-1:] * (width - len(hull)) for hull in hulls], dtype=np.int64)
    edge_group_array = np.array(edge_group, dtype=np.int64)
    edge_cost_array = np.array(edge_cost, dtype=np.float64)
    edge_loss_array = np.array(edge_loss, dtype=np.float64)
    efficiency = -edge_loss_array / edge_cost_array
    # Efficiency strictly decreases within a group, so this order keeps each group's edge order.
    order = np.lexsort((edge_group_array, -efficiency))
    return _Hull(
        vertices,
        edge_group_array[order],
        edge_cost_array[order],
        edge_loss_array[order],
        efficiency[order],
    )


def _lower_hull(costs: list[float], losses: list[float]) -> list[int]:
    """Return the positions of the lower convex hull of points sorted by increasing cost.

    The points are a Pareto set, so loss strictly decreases. The kept edges have strictly
    decreasing efficiency ``(loss[a] - loss[b]) / (cost[b] - cost[a])``.
    """
    hull: list[int] = []
    for point in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            before = (losses[a] - losses[b]) / (costs[b] - costs[a])
            after = (losses[b] - losses[point]) / (costs[point] - costs[b])
            if before > after:
                break
            hull.pop()
        hull.append(point)
    return hull


def _relax(problem: _Problem, limit: float) -> _Relaxation:
    """Solve the LP relaxation by taking hull edges by decreasing efficiency while they fit."""
    hull = problem.hull
    base_cost = problem.total_cost(hull.vertices[:, 0])
    filled = base_cost + np.cumsum(hull.edge_cost)
    edges_taken = int(np.searchsorted(filled, limit, side="right"))
    steps = np.bincount(hull.edge_group[:edges_taken], minlength=problem.num_groups)
    choice = hull.vertices[np.arange(problem.num_groups), steps]

    is_optimal = edges_taken == hull.efficiency.size
    multiplier = 0.0 if is_optimal else float(hull.efficiency[edges_taken])
    score = problem.loss + multiplier * problem.weighted_cost
    row_min = score.min(axis=1)
    bound = float(np.sum(row_min))
    if multiplier > 0:
        bound -= multiplier * limit
    return _Relaxation(choice, multiplier, bound, score - row_min[:, None], is_optimal)


def _improve_by_swaps(
    problem: _Problem, choice: np.ndarray, limit: float, max_swaps: int = 32
) -> np.ndarray:
    """Apply the best single-group swap that fits the leftover budget while one lowers the loss."""
    choice = choice.copy()
    rows = np.arange(problem.num_groups)
    for _ in range(max_swaps):
        leftover = limit - problem.total_cost(choice)
        extra_cost = problem.weighted_cost - problem.weighted_cost[rows, choice][:, None]
        gain = problem.loss - problem.loss[rows, choice][:, None]
        gain = np.where(problem.efficient & (extra_cost <= leftover), gain, np.inf)
        best = int(np.argmin(gain))
        group, candidate = divmod(best, gain.shape[1])
        if not gain[group, candidate] < 0:
            break
        choice[group] = candidate
    return choice
