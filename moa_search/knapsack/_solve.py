"""Public entry points: solve at one budget or over a grid of budgets, and report infeasibility."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from moa_search.errors import ConfigError
from moa_search.knapsack._distinct import _max_distinct_used, _solve_with_distinct
from moa_search.knapsack._hull import _relax
from moa_search.knapsack._problem import (
    BUDGET_TOLERANCE,
    KnapsackSolution,
    _check_budget,
    _prepare,
    _Problem,
)
from moa_search.knapsack._program import _solve_without_distinct


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
