"""The (MI)LP over binaries ``x[g, c]`` and ``y[layer, c]``, and its exact solution in HiGHS."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np
from scipy import optimize, sparse

from moa_search.knapsack._problem import _Problem

logger = logging.getLogger(__name__)


# Options for scipy's milp. It forwards the last three to HiGHS verbatim and warns that it does.
_HIGHS_OPTIONS = {
    "presolve": True,
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 0.0,
    "mip_feasibility_tolerance": 1e-9,
    "primal_feasibility_tolerance": 1e-9,
}


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
    options = dict(_HIGHS_OPTIONS)
    cuts = 0
    while cuts <= max_cuts:
        # HiGHS 1.12.0, as bundled with scipy 1.17.1, writes a stray debug line from C++ to fd 1
        # during some solves, so the solve runs with fd 1 pointing at /dev/null.
        with warnings.catch_warnings(), _stdout_fd_to_devnull():
            warnings.filterwarnings(
                "ignore", message="Unrecognized options", category=RuntimeWarning
            )
            result = optimize.milp(
                model.objective,
                integrality=np.ones(model.objective.size),
                bounds=optimize.Bounds(0, 1),
                constraints=constraints,
                options=dict(options),
            )
        # HiGHS 1.12.0's presolve has reported feasible instances with at most one distinct
        # window per layer as infeasible (status 2) or failed on them (status 4, "Solve error").
        # Without presolve the same instances solve, so both statuses are checked again without it.
        if result.status in (2, 4) and options["presolve"]:
            logger.debug("knapsack MILP: %s with presolve, solving again without", result.message)
            options["presolve"] = False
            continue
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
        cuts += 1
    raise RuntimeError(
        f"knapsack MILP kept returning choices over the budget after {max_cuts} cuts"
    )


def _pad_columns(block: sparse.csr_array, width: int) -> sparse.csr_array:
    if block.shape[1] == width:
        return block
    return sparse.hstack(
        [block, sparse.csr_array((block.shape[0], width - block.shape[1]))], format="csr"
    )


@contextlib.contextmanager
def _stdout_fd_to_devnull() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block, and restore it afterwards.

    The redirect is process-wide, so whatever other threads write to fd 1 meanwhile is lost.
    """
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # fd 1 is closed, so nothing written to it can show up anyway
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
