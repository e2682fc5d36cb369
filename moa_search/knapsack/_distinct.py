"""Exact solver under the distinct-per-layer constraint.

It solves the LP relaxation of the MILP and turns the LP duals into a Lagrangian bound with a
penalty per candidate. Rounding the LP gives an incumbent, every candidate whose penalty exceeds
the gap to it is removed, and HiGHS solves the rest as a MILP.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
from scipy import optimize

from moa_search.knapsack._milp import _build_model, _solve_milp
from moa_search.knapsack._problem import _prepare, _Problem
from moa_search.knapsack._program import _solve_without_distinct

logger = logging.getLogger(__name__)


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
    for presolve in (True, False):
        result = optimize.linprog(
            model.objective,
            A_ub=model.a_ub,
            b_ub=model.b_ub,
            A_eq=model.a_eq,
            b_eq=np.ones(problem.num_groups),
            bounds=(0, 1),
            method="highs-ds",
            options={"presolve": presolve},
        )
        # HiGHS's presolve has misreported feasible MILPs of this kind as infeasible (see
        # _solve_milp), so an infeasible LP is confirmed without it.
        if result.status != 2:
            break
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
