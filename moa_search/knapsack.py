"""Exact multiple-choice knapsack (MCKP) solver that picks one candidate window per group of heads.

Each group (an attention head, or the query heads that share one KV head) takes exactly one
candidate. The solver minimises ``sum_g loss[g, c_g]`` subject to
``sum_g weight_g * cost[g, c_g] <= budget`` and, optionally, to at most ``max_distinct_per_layer``
distinct candidate indices among the groups of each layer.

Algorithm:

1. Drop candidates that another candidate of the same group dominates (no more cost and no more
   loss, one of them strictly less). The distinct-per-layer path skips this step, because there
   a dominated candidate can be the only one that a layer's other groups also use.
2. Solve the LP relaxation greedily on the lower convex hull of each group. The split hull edge
   gives the optimal Lagrange multiplier ``lam`` and the lower bound ``L(lam)``.
3. Improve the greedy integral solution by single swaps to get an upper bound ``U``. A candidate
   whose reduced cost ``loss + lam * weighted_cost - min_c(...)`` exceeds ``U - L(lam)`` is in
   no optimal solution (reduced-cost fixing), so it is removed.
4. Solve the remaining core exactly by dynamic programming over the Pareto set of partial
   (cost, loss) sums, pruned with LP bounds. It compares real sums, so it needs no tolerance
   except the budget's. A core too large for it goes to a MILP in HiGHS instead.

With the distinct-per-layer constraint, when the optimum above breaks it, the solver adds
binaries ``y[layer, c]`` with ``x[g, c] <= y[layer, c]`` and ``sum_c y[layer, c] <= K``. It
solves that model's LP relaxation and turns the LP duals into a valid Lagrangian bound with a
penalty per candidate. Rounding the LP gives a good feasible choice, and every candidate whose
penalty exceeds the gap to it is removed. HiGHS (``scipy.optimize.milp``) solves the rest as a
MILP with zero optimality gap.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
from scipy import optimize, sparse

from moa_search.errors import ConfigError

__all__ = ["BUDGET_TOLERANCE", "KnapsackSolution", "solve_front", "solve_knapsack"]

logger = logging.getLogger(__name__)

BUDGET_TOLERANCE = 1e-12
"""A choice is feasible when its total cost is at most ``budget + BUDGET_TOLERANCE``."""

# The Pareto program hands the core to the MILP when one step would combine more partial
# choices with candidates than this (about 200 MB of temporary arrays).
_MAX_DP_PAIRS = 4_000_000

# Options for scipy's milp. It forwards the last three to HiGHS verbatim and warns that it does.
_HIGHS_OPTIONS = {
    "presolve": True,
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 0.0,
    "mip_feasibility_tolerance": 1e-9,
    "primal_feasibility_tolerance": 1e-9,
}


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


def solve_knapsack(
    loss: np.ndarray,
    cost: np.ndarray,
    budget: float,
    *,
    weights: np.ndarray | None = None,
    layer_of_group: np.ndarray | None = None,
    max_distinct_per_layer: int | None = None,
) -> KnapsackSolution:
    """Pick one candidate per group with the minimum total loss under a cost budget.

    The result is optimal, not approximate: it is feasible and no feasible choice has a lower
    total loss. Among choices with equal loss the solver usually, but not always, returns the
    cheaper one.

    Args:
        loss: ``[groups, candidates]`` loss increase of each choice. May be negative. +inf marks a
            candidate that the group must not use. NaN and -inf are invalid.
        cost: ``[groups, candidates]`` finite cost of each choice, e.g. relative attention cost
            in [0, 1]. Rows need not be monotone.
        budget: maximum total cost, > 0. A choice is feasible when its total cost is at most
            ``budget + BUDGET_TOLERANCE``.
        weights: ``[groups]`` positive weight of each group in the total cost. Defaults to
            ``1 / groups``, so the total cost is the mean cost.
        layer_of_group: ``[groups]`` integer layer of each group. Only read together with
            ``max_distinct_per_layer``.
        max_distinct_per_layer: at most this many distinct candidate indices among the groups of
            one layer, >= 1. None for no limit. When the limit binds, a MILP decides, which can
            take minutes for small limits at model size: 1,024 groups x 48 candidates took about
            50 s with a limit of 2 and 3 s with 8 (benchmarks/bench_knapsack.py, 2 CPUs).

    Returns:
        The optimal choice with its total loss and total cost.

    Raises:
        ConfigError: an input is invalid, or no choice fits the budget (the message names the
            minimum achievable total cost).
    """
    problem = _prepare(loss, cost, weights, layer_of_group, max_distinct_per_layer)
    budget = _check_budget(budget)
    return _solve(problem, budget)


def solve_front(
    loss: np.ndarray,
    cost: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    budgets: Sequence[float] | np.ndarray | None = None,
    layer_of_group: np.ndarray | None = None,
    max_distinct_per_layer: int | None = None,
    num_budgets: int = 33,
) -> list[KnapsackSolution]:
    """Compute exact optimal solutions over a range of budgets, as a Pareto front.

    With ``budgets``, the optimal solution at each budget. Without, the optimal solutions at
    ``num_budgets`` budgets evenly spaced from the minimum achievable total cost to the cost of
    the min-loss choice. Without the distinct-per-layer constraint, the greedy LP solution at each
    of those budgets is added too: it lies on the lower convex hull of the front, so it is optimal
    at its own cost. The validation and the convex hull are computed once for all budgets.

    Every member is optimal at a budget equal to its own total cost. Members with the same cost
    and loss, or dominated by another member, are dropped, so the list may be shorter than
    ``budgets``.

    Args:
        loss: ``[groups, candidates]``, as in :func:`solve_knapsack`.
        cost: ``[groups, candidates]``, as in :func:`solve_knapsack`.
        weights: ``[groups]``, as in :func:`solve_knapsack`.
        budgets: budgets to solve at, each > 0, or None for the grid above.
        layer_of_group: ``[groups]``, as in :func:`solve_knapsack`.
        max_distinct_per_layer: as in :func:`solve_knapsack`.
        num_budgets: number of grid budgets when ``budgets`` is None, >= 2.

    Returns:
        Non-dominated solutions sorted by increasing total cost (and so decreasing total loss).

    Raises:
        ConfigError: an input is invalid, or a given budget is below the minimum achievable cost.
    """
    problem = _prepare(loss, cost, weights, layer_of_group, max_distinct_per_layer)
    if budgets is not None:
        budget_list = [
            _check_budget(budget) for budget in np.asarray(budgets, dtype=float).ravel()
        ]
        return _pareto_filter([_solve(problem, budget) for budget in budget_list])

    if isinstance(num_budgets, bool) or not isinstance(num_budgets, int) or num_budgets < 2:
        raise ConfigError(f"invalid num_budgets={num_budgets!r}: use a whole number >= 2")
    solutions = []
    cheapest = _solve(problem, _min_achievable_cost(problem))
    richest = _solve(problem, float(np.sum(problem.weighted_cost.max(axis=1))))
    for budget in np.linspace(cheapest.total_cost, richest.total_cost, num_budgets):
        solutions.append(_solve(problem, float(budget)))
        if problem.max_distinct is None:
            greedy = _relax(problem, float(budget) + BUDGET_TOLERANCE).choice
            solutions.append(_make_solution(problem, greedy))
    return _pareto_filter(solutions)


def _solve(problem: _Problem, budget: float) -> KnapsackSolution:
    limit = budget + BUDGET_TOLERANCE
    if problem.min_cost() > limit:
        _raise_infeasible(problem, budget)

    choice = _solve_without_distinct(problem, limit)
    if (
        problem.max_distinct is not None
        and _max_distinct_used(problem, choice) > problem.max_distinct
    ):
        constrained = _solve_with_distinct(problem, problem.loss, limit, choice)
        if constrained is None:
            _raise_infeasible(problem, budget)
        choice = constrained
    return _make_solution(problem, choice)


def _make_solution(problem: _Problem, choice: np.ndarray) -> KnapsackSolution:
    choice = np.asarray(choice, dtype=np.int64).copy()
    choice.setflags(write=False)
    return KnapsackSolution(choice, problem.total_loss(choice), problem.total_cost(choice))


def _pareto_filter(solutions: list[KnapsackSolution]) -> list[KnapsackSolution]:
    ordered = sorted(solutions, key=lambda solution: (solution.total_cost, solution.total_loss))
    front: list[KnapsackSolution] = []
    for solution in ordered:
        if not front or solution.total_loss < front[-1].total_loss:
            front.append(solution)
    return front


# Validation


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


def _raise_infeasible(problem: _Problem, budget: float) -> NoReturn:
    minimum = _min_achievable_cost(problem)
    if problem.max_distinct is None:
        where = ""
    else:
        where = f" with max_distinct_per_layer={problem.max_distinct}"
    raise ConfigError(
        f"infeasible budget={budget:.10g}: the minimum achievable total cost{where} is "
        f"{minimum:.10g}, so use a budget >= {minimum:.10g}"
    )


def _min_achievable_cost(problem: _Problem) -> float:
    """Return the minimum total cost, under the distinct-per-layer constraint when it is set."""
    cheapest = np.where(problem.allowed, problem.weighted_cost, np.inf).argmin(axis=1)
    if (
        problem.max_distinct is None
        or _max_distinct_used(problem, cheapest) <= problem.max_distinct
    ):
        return problem.total_cost(cheapest)
    allowed_cost = np.where(problem.allowed, problem.weighted_cost, np.inf)
    choice = _solve_with_distinct(problem, allowed_cost, np.inf, cheapest)
    if choice is None:
        raise ConfigError(
            f"infeasible max_distinct_per_layer={problem.max_distinct}: no choice with finite "
            "loss uses that few distinct candidates in every layer. Raise the limit or give "
            "more candidates a finite loss"
        )
    return problem.total_cost(choice)


# Convex hull and Lagrangian relaxation


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


# Exact solvers


def _solve_without_distinct(problem: _Problem, limit: float) -> np.ndarray:
    relaxation = _relax(problem, limit)
    if relaxation.is_optimal:
        return relaxation.choice

    incumbent = _improve_by_swaps(problem, relaxation.choice, limit)
    upper = problem.total_loss(incumbent)
    gap = upper - relaxation.bound
    if gap <= 0:
        return incumbent
    keep = problem.efficient & (relaxation.reduced_cost <= gap + problem.slack())
    logger.debug(
        "knapsack core: %d of %d groups keep more than one candidate (gap %.3g)",
        int(np.sum(keep.sum(axis=1) > 1)),
        problem.num_groups,
        gap,
    )
    choice = _pareto_program(problem, keep, upper, limit)
    if choice is None:
        logger.info(
            "knapsack: Pareto program exceeded %d state-candidate pairs in one step, "
            "solving the core as a MILP",
            _MAX_DP_PAIRS,
        )
        choice = _solve_milp(problem, keep, problem.loss, limit, distinct=False)
        assert choice is not None, "the incumbent is feasible, so the core MILP must be too"
    return choice


def _pareto_program(
    problem: _Problem, keep: np.ndarray, upper: float, limit: float
) -> np.ndarray | None:
    """Solve the problem restricted to ``keep`` exactly, by dynamic programming over Pareto sets.

    Groups with one kept candidate are fixed. The program adds the other (core) groups one at a
    time. It drops a partial choice that another one dominates in (cost, loss), and one whose
    loss plus the LP bound of the remaining core groups, at the budget left, exceeds ``upper``.
    The greedy LP completion of each partial choice is feasible, so it lowers
    ``upper`` as the program runs. Returns None when one step would exceed ``_MAX_DP_PAIRS``.
    """
    counts = keep.sum(axis=1)
    only = keep.argmax(axis=1)
    fixed = np.flatnonzero(counts == 1)
    core = np.flatnonzero(counts > 1)
    core = core[np.argsort(counts[core], kind="stable")]
    hull = _convex_hull(problem.loss, problem.weighted_cost, keep, core)

    # What the core groups after each step add at their cheapest kept candidate.
    first_cost = problem.weighted_cost[core, hull.vertices[:, 0]]
    first_loss = problem.loss[core, hull.vertices[:, 0]]
    later_cost = np.concatenate([np.cumsum(first_cost[::-1])[::-1][1:], [0.0]])
    later_loss = np.concatenate([np.cumsum(first_loss[::-1])[::-1][1:], [0.0]])

    state_cost = np.array([np.sum(problem.weighted_cost[fixed, only[fixed]])])
    state_loss = np.array([np.sum(problem.loss[fixed, only[fixed]])])
    slack = problem.slack()
    parents, picks = [], []
    for step, group in enumerate(core):
        candidates = np.flatnonzero(keep[group])
        if state_cost.size * candidates.size > _MAX_DP_PAIRS:
            return None
        cost = (state_cost[:, None] + problem.weighted_cost[group, candidates]).ravel()
        loss = (state_loss[:, None] + problem.loss[group, candidates]).ravel()

        later = hull.edge_group > step
        room = limit - cost - later_cost[step]
        lp_gain, greedy_gain = _complete_greedily(
            room, hull.edge_cost[later], hull.edge_loss[later]
        )
        upper = min(upper, float(np.min(loss + later_loss[step] + greedy_gain)))
        alive = np.flatnonzero(loss + later_loss[step] + lp_gain <= upper + slack)

        alive = alive[np.lexsort((loss[alive], cost[alive]))]
        # Sorted by cost, a partial choice survives only if its loss beats every cheaper one.
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(loss[alive])[:-1]])
        alive = alive[loss[alive] < best_before]
        parents.append(alive // candidates.size)
        picks.append(candidates[alive % candidates.size])
        state_cost, state_loss = cost[alive], loss[alive]

    logger.debug(
        "knapsack Pareto program: %d core groups, max %d states",
        core.size,
        max((pick.size for pick in picks), default=1),
    )
    choice: np.ndarray = only.copy()
    state = int(np.argmin(state_loss))
    for step in range(core.size - 1, -1, -1):
        choice[core[step]] = picks[step][state]
        state = int(parents[step][state])
    return choice


def _complete_greedily(
    room: np.ndarray, edge_cost: np.ndarray, edge_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the LP and the greedy integral loss change of hull edges that fit in ``room``.

    Edges are taken by decreasing efficiency. The LP takes a fraction of the first edge that
    does not fit, and the integral value stops before it, keeping ``BUDGET_TOLERANCE`` spare
    against rounding. Both are +inf where ``room`` is negative.
    """
    filled = np.concatenate([[0.0], np.cumsum(edge_cost)])
    gained = np.concatenate([[0.0], np.cumsum(edge_loss)])
    rate = np.concatenate([edge_loss / edge_cost, [0.0]])
    # Past the last edge the rate is 0, so the LP stays at the full gain.
    capped = np.minimum(room, filled[-1])
    whole = np.searchsorted(filled, capped, side="right") - 1
    edges = np.maximum(whole, 0)
    lp_gain = np.where(whole >= 0, gained[edges] + (capped - filled[edges]) * rate[edges], np.inf)
    whole = np.searchsorted(filled, room - BUDGET_TOLERANCE, side="right") - 1
    greedy_gain = np.where(whole >= 0, gained[np.maximum(whole, 0)], np.inf)
    return lp_gain, greedy_gain


def _max_distinct_used(problem: _Problem, choice: np.ndarray) -> int:
    assert problem.layer is not None
    pairs = np.unique(problem.layer * problem.loss.shape[1] + choice)
    return int(np.bincount(pairs // problem.loss.shape[1]).max())


def _solve_with_distinct(
    problem: _Problem, objective: np.ndarray, limit: float, seed: np.ndarray
) -> np.ndarray | None:
    """Minimise ``objective`` under the budget and the distinct constraint exactly.

    Args:
        problem: the validated problem, with the distinct constraint set.
        objective: ``[groups, candidates]`` value to minimise, +inf where not allowed.
        limit: maximum total weighted cost, +inf for none.
        seed: ``[groups]`` optimum without the distinct constraint, which seeds a heuristic.

    Returns:
        The optimal choice, or None when no choice satisfies both constraints.
    """
    # NOTE: the LP bound is weakest for small limits, where fewer candidates can be removed and
    # the MILP left to HiGHS is large. On the 1,024 x 48 instance of
    # benchmarks/bench_knapsack.py at budget 0.25 (2 CPUs), limits 2 and 4 took about 50 s and
    # 140 s, limits 8 and 16 about 3 s.
    lp = _distinct_lp(problem, objective, limit)
    if lp is None:
        return None

    bound, penalty, slack = _distinct_lagrangian(problem, objective, limit, lp)
    incumbents = [
        _round_lp(problem, objective, limit, lp),
        _solve_restricted(
            problem, objective, limit, _top_per_layer(problem, _layer_usage(problem, seed))
        ),
    ]
    scored = [(_total(objective, choice), choice) for choice in incumbents if choice is not None]
    keep = problem.allowed
    upper = np.inf
    if scored:
        upper, incumbent = min(scored, key=lambda pair: pair[0])
        if upper <= bound:
            return incumbent
        keep = keep & (penalty <= upper - bound + slack)
    logger.debug(
        "knapsack with max_distinct_per_layer=%d: bound %.9g, heuristic %.9g, MILP over %d of %d "
        "candidates",
        problem.max_distinct,
        bound,
        upper,
        int(keep.sum()),
        int(problem.allowed.sum()),
    )
    return _solve_milp(problem, keep, objective, limit, distinct=True)


def _total(objective: np.ndarray, choice: np.ndarray) -> float:
    return float(np.sum(objective[np.arange(choice.size), choice]))


@dataclasses.dataclass(frozen=True)
class _DistinctLP:
    """Solution of the LP relaxation of the distinct-constrained MILP.

    Attributes:
        multiplier: dual value of the budget row, >= 0.
        link_dual: ``[groups, candidates]`` dual value of each row ``x[g, c] <= y[layer, c]``,
            >= 0, and 0 for forbidden candidates.
        layer_y: ``[layers, candidates]`` LP value of ``y[layer, c]``.
        layer_mass: ``[layers, candidates]`` sum of the LP values ``x[g, c]`` over the layer.
    """

    multiplier: float
    link_dual: np.ndarray
    layer_y: np.ndarray
    layer_mass: np.ndarray


def _distinct_lp(problem: _Problem, objective: np.ndarray, limit: float) -> _DistinctLP | None:
    """Solve the LP relaxation over all allowed candidates, or return None when it is infeasible.

    HiGHS's duals only need to be close to optimal: ``_distinct_lagrangian`` turns any duals
    into a valid bound.
    """
    assert problem.layer is not None
    model = _build_model(problem, problem.allowed, objective, limit, distinct=True)
    result = optimize.linprog(
        model.objective,
        A_ub=model.a_ub,
        b_ub=model.b_ub,
        A_eq=model.a_eq,
        b_eq=np.ones(problem.num_groups),
        bounds=(0, 1),
        method="highs-ds",
    )
    if result.status == 2:
        return None
    if result.status != 0:
        raise RuntimeError(f"HiGHS failed on the knapsack LP relaxation: {result.message}")

    # scipy reports the duals of <= rows of a minimisation as <= 0.
    ub_dual = -result.ineqlin.marginals
    num_x = model.groups.size
    multiplier = max(0.0, float(ub_dual[0])) if model.has_budget_row else 0.0
    first_link = int(model.has_budget_row)
    link_dual = np.zeros(problem.loss.shape)
    link_dual[model.groups, model.candidates] = np.maximum(
        ub_dual[first_link : first_link + num_x], 0.0
    )

    num_candidates = problem.loss.shape[1]
    layer_y = np.zeros((int(problem.layer.max()) + 1, num_candidates))
    np.add.at(
        layer_y, (model.pairs // num_candidates, model.pairs % num_candidates), result.x[num_x:]
    )
    layer_mass = np.zeros_like(layer_y)
    np.add.at(layer_mass, (problem.layer[model.groups], model.candidates), result.x[:num_x])
    return _DistinctLP(multiplier, link_dual, layer_y, layer_mass)


def _distinct_lagrangian(
    problem: _Problem, objective: np.ndarray, limit: float, lp: _DistinctLP
) -> tuple[float, np.ndarray, float]:
    """Return a lower bound and, per candidate, how much using it raises that bound.

    Dualising the budget (multiplier ``lam``) and the rows ``x[g, c] <= y[layer, c]`` (duals
    ``mu``) splits the problem into one pick per group, of ``objective + lam * weighted_cost +
    mu``, and one pick of at most ``max_distinct`` candidates per layer, of the largest
    ``M[layer, c] = sum_g mu[g, c]``. Both are solved exactly here for the clipped duals, so
    the bound is valid for any duals. Choosing ``c`` for group ``g`` raises the group's pick by
    its reduced cost and forces ``c`` into the layer's pick; the two increases add up.

    Returns:
        The bound; ``[groups, candidates]`` penalties, such that every feasible choice that
        uses candidate ``c`` for group ``g`` has an objective >= bound + penalty[g, c]; and an
        allowance for rounding errors in both, from the magnitude of the summed terms.
    """
    assert problem.layer is not None and problem.max_distinct is not None
    group_score = objective + lp.multiplier * problem.weighted_cost + lp.link_dual
    group_best = group_score.min(axis=1)
    layer_weight = np.zeros((int(problem.layer.max()) + 1, problem.loss.shape[1]))
    np.add.at(layer_weight, problem.layer, lp.link_dual)
    descending = -np.sort(-layer_weight, axis=1)
    kth_largest = descending[:, problem.max_distinct - 1]

    layer_best = np.sum(descending[:, : problem.max_distinct])
    bound = float(np.sum(group_best) - layer_best)
    budget_term = lp.multiplier * limit if lp.multiplier > 0 else 0.0
    bound -= budget_term
    layer_penalty = np.maximum(kth_largest[:, None] - layer_weight, 0.0)
    penalty = group_score - group_best[:, None] + layer_penalty[problem.layer]
    slack = 1e-9 * (1.0 + float(np.sum(np.abs(group_best))) + float(layer_best) + budget_term)
    return bound, penalty, slack


def _layer_usage(problem: _Problem, choice: np.ndarray) -> np.ndarray:
    """Count, per layer and candidate, the groups of the layer that ``choice`` gives it."""
    assert problem.layer is not None
    usage = np.zeros((int(problem.layer.max()) + 1, problem.loss.shape[1]))
    np.add.at(usage, (problem.layer, choice), 1.0)
    return usage


def _top_per_layer(problem: _Problem, ranking: np.ndarray) -> np.ndarray:
    """Mark each layer's ``max_distinct`` candidates with the highest ``ranking``."""
    assert problem.max_distinct is not None
    top = np.argsort(-ranking, axis=1, kind="stable")[:, : problem.max_distinct]
    permitted = np.zeros(ranking.shape, dtype=bool)
    np.put_along_axis(permitted, top, True, axis=1)
    return permitted


def _solve_restricted(
    problem: _Problem, objective: np.ndarray, limit: float, permitted: np.ndarray
) -> np.ndarray | None:
    """Solve exactly with each layer limited to its ``permitted`` candidates, or return None.

    With at most ``max_distinct`` permitted candidates per layer, the distinct constraint holds
    for every choice, so the problem is solved without it. Returns None when no permitted
    choice fits the budget.
    """
    assert problem.layer is not None
    restricted_objective = np.where(permitted[problem.layer], objective, np.inf)
    if not np.isfinite(restricted_objective).any(axis=1).all():
        return None
    restricted = _prepare(
        restricted_objective, problem.weighted_cost, np.ones(problem.num_groups), None, None
    )
    if restricted.min_cost() > limit:
        return None
    return _solve_without_distinct(restricted, limit)


def _round_lp(
    problem: _Problem,
    objective: np.ndarray,
    limit: float,
    lp: _DistinctLP,
    max_open: int = 6,
    max_trials: int = 48,
) -> np.ndarray | None:
    """Round the LP's ``y`` to a choice that satisfies both constraints, or return None.

    Each layer first keeps its ``max_distinct`` candidates with the highest ``y``. Then, one
    layer with fractional ``y`` at a time, every way to fill the layer's slots from its (at most
    ``max_open``) fractional candidates is tried, and the best restricted optimum is kept.
    This is a heuristic: it stops after ``max_trials`` restricted solves.
    """
    assert problem.max_distinct is not None
    ranking = lp.layer_y + 1e-6 * lp.layer_mass / problem.num_groups
    permitted = _top_per_layer(problem, ranking)
    best = _solve_restricted(problem, objective, limit, permitted)
    best_value = np.inf if best is None else _total(objective, best)

    trials = 0
    for layer in range(ranking.shape[0]):
        certain = np.flatnonzero(lp.layer_y[layer] >= 1 - 1e-6)[: problem.max_distinct].tolist()
        open_slots = problem.max_distinct - len(certain)
        fractional = np.flatnonzero((lp.layer_y[layer] > 1e-6) & (lp.layer_y[layer] < 1 - 1e-6))
        fractional = fractional[np.argsort(-ranking[layer, fractional], kind="stable")][:max_open]
        if open_slots == 0 or fractional.size <= open_slots:
            continue
        for extra in itertools.combinations(fractional.tolist(), open_slots):
            if trials == max_trials:
                return best
            trial = permitted.copy()
            trial[layer] = False
            trial[layer, certain + list(extra)] = True
            if (trial == permitted).all():
                continue
            trials += 1
            choice = _solve_restricted(problem, objective, limit, trial)
            if choice is not None and _total(objective, choice) < best_value:
                best, best_value, permitted = choice, _total(objective, choice), trial
    return best


@dataclasses.dataclass(frozen=True)
class _Model:
    """The (MI)LP over binaries ``x[g, c]`` of kept candidates and ``y[layer, c]``.

    Attributes:
        objective: ``[x + y]`` per-variable objective, each group's shifted to a minimum of 0.
        shift: ``[groups]`` what was subtracted from each group's objective.
        a_eq: ``[groups, x + y]`` rows ``sum_c x[g, c] = 1``.
        a_ub: rows ``<= b_ub``: the budget (if any), then ``x[g, c] - y[layer, c] <= 0`` and
            ``sum_c y[layer, c] <= max_distinct`` (with the distinct constraint).
        b_ub: right-hand sides of ``a_ub``.
        groups: ``[x]`` group of each ``x``.
        candidates: ``[x]`` candidate of each ``x``.
        pairs: ``[y]`` ``layer * candidates + c`` of each ``y``.
        has_budget_row: whether ``a_ub`` starts with the budget row.
    """

    objective: np.ndarray
    shift: np.ndarray
    a_eq: sparse.csr_array
    a_ub: sparse.csr_array
    b_ub: np.ndarray
    groups: np.ndarray
    candidates: np.ndarray
    pairs: np.ndarray
    has_budget_row: bool


def _build_model(
    problem: _Problem, keep: np.ndarray, objective: np.ndarray, limit: float, *, distinct: bool
) -> _Model:
    groups, candidates = np.nonzero(keep)
    num_x = groups.size
    num_candidates = problem.loss.shape[1]
    shift = np.where(keep, objective, np.inf).min(axis=1)
    # Shifting each group's objective by a constant keeps the argmin and makes it non-negative.
    x_objective = objective[groups, candidates] - shift[groups]

    pairs = np.zeros(0, dtype=np.int64)
    ub_blocks: list[sparse.csr_array] = []
    ub_values: list[np.ndarray] = []
    if np.isfinite(limit):
        ub_blocks.append(sparse.csr_array(problem.weighted_cost[groups, candidates][None, :]))
        ub_values.append(np.array([limit]))
    if distinct and problem.layer is not None and problem.max_distinct is not None:
        pairs, y_of_x = np.unique(
            problem.layer[groups] * num_candidates + candidates, return_inverse=True
        )
        x_index = np.arange(num_x)
        link = sparse.csr_array(
            (
                np.concatenate([np.ones(num_x), -np.ones(num_x)]),
                (
                    np.concatenate([x_index, x_index]),
                    np.concatenate([x_index, num_x + y_of_x.reshape(-1)]),
                ),
            ),
            shape=(num_x, num_x + pairs.size),
        )
        layer_of_y = pairs // num_candidates
        per_layer = sparse.csr_array(
            (np.ones(pairs.size), (layer_of_y, num_x + np.arange(pairs.size))),
            shape=(int(layer_of_y.max()) + 1, num_x + pairs.size),
        )
        ub_blocks.extend([link, per_layer])
        ub_values.extend(
            [np.zeros(num_x), np.full(per_layer.shape[0], float(problem.max_distinct))]
        )

    width = num_x + pairs.size
    a_eq = sparse.csr_array(
        (np.ones(num_x), (groups, np.arange(num_x))), shape=(problem.num_groups, width)
    )
    if ub_blocks:
        a_ub = sparse.vstack([_pad_columns(block, width) for block in ub_blocks], format="csr")
        b_ub = np.concatenate(ub_values)
    else:
        a_ub, b_ub = sparse.csr_array((0, width)), np.zeros(0)
    return _Model(
        np.concatenate([x_objective, np.zeros(pairs.size)]),
        shift,
        a_eq,
        a_ub,
        b_ub,
        groups,
        candidates,
        pairs,
        bool(np.isfinite(limit)),
    )


def _solve_milp(
    problem: _Problem,
    keep: np.ndarray,
    objective: np.ndarray,
    limit: float,
    *,
    distinct: bool,
    max_cuts: int = 50,
) -> np.ndarray | None:
    """Solve the problem restricted to ``keep`` as a MILP, or return None when it is infeasible.

    HiGHS accepts rows violated by up to its feasibility tolerance (1e-9 here), which is more
    than ``BUDGET_TOLERANCE``. A choice over the budget by that much is cut off with a no-good
    row ``sum of its x <= groups - 1`` and the MILP is solved again, so the result is the
    optimum over truly feasible choices. Raises RuntimeError after ``max_cuts`` such rounds.
    """
    model = _build_model(problem, keep, objective, limit, distinct=distinct)
    constraints = [optimize.LinearConstraint(model.a_eq, 1.0, 1.0)]
    if model.b_ub.size:
        constraints.append(optimize.LinearConstraint(model.a_ub, -np.inf, model.b_ub))
    num_x = model.groups.size
    for _ in range(max_cuts + 1):
        # NOTE: HiGHS 1.12.0, as bundled with scipy 1.17, writes a stray debug line
        # "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();" to stdout
        # during some solves. It is a HiGHS bug that this module cannot silence.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Unrecognized options", category=RuntimeWarning
            )
            result = optimize.milp(
                model.objective,
                integrality=np.ones(model.objective.size),
                bounds=optimize.Bounds(0, 1),
                constraints=constraints,
                options=dict(_HIGHS_OPTIONS),
            )
        if result.status == 2:
            return None
        if result.status != 0:
            raise RuntimeError(f"HiGHS failed on the knapsack MILP: {result.message}")

        selected = result.x[:num_x] > 0.5
        choice = np.full(problem.num_groups, -1, dtype=np.int64)
        choice[model.groups[selected]] = model.candidates[selected]
        assert np.bincount(model.groups[selected], minlength=problem.num_groups).max() == 1
        assert choice.min() >= 0
        if problem.total_cost(choice) <= limit:
            return choice

        logger.debug(
            "knapsack MILP choice costs %.17g, over the limit %.17g within HiGHS's tolerance, "
            "so it is cut off",
            problem.total_cost(choice),
            limit,
        )
        cut = np.zeros((1, model.objective.size))
        cut[0, :num_x] = selected
        constraints.append(optimize.LinearConstraint(cut, -np.inf, problem.num_groups - 1))
    raise RuntimeError(
        f"knapsack MILP kept returning choices over the budget after {max_cuts} cuts"
    )


def _pad_columns(block: sparse.csr_array, width: int) -> sparse.csr_array:
    if block.shape[1] == width:
        return block
    return sparse.hstack(
        [block, sparse.csr_array((block.shape[0], width - block.shape[1]))], format="csr"
    )
