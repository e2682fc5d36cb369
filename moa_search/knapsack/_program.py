"""Exact solver without the distinct-per-layer constraint: a Pareto dynamic program on the core.

The core is what reduced-cost fixing leaves. A core too large for the program goes to the MILP.
"""

from __future__ import annotations

import logging

import numpy as np

from moa_search.knapsack._hull import _convex_hull, _improve_by_swaps, _relax
from moa_search.knapsack._milp import _solve_milp
from moa_search.knapsack._problem import BUDGET_TOLERANCE, _Problem

logger = logging.getLogger(__name__)


# The Pareto program hands the core to the MILP when one step would combine more partial
# choices with candidates than this (about 200 MB of temporary arrays).
_MAX_DP_PAIRS = 4_000_000


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
