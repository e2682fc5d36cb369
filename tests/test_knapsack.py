"""Tests for the exact multiple-choice knapsack solver, mostly against brute force."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import optimize, sparse

from moa_search.errors import ConfigError
from moa_search.knapsack import (
    BUDGET_TOLERANCE,
    KnapsackSolution,
    _program,
    solve_front,
    solve_knapsack,
)


def random_instance(seed: int) -> dict[str, Any]:
    """Build a small random instance with ties, forbidden (+inf) entries and varied budgets."""
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 6))
    candidates = int(rng.integers(1, 5))
    # Rounding creates ties in loss and in cost, which exercise the dominance rules.
    loss = rng.normal(size=(groups, candidates)).round(int(rng.integers(1, 4)))
    loss[rng.random((groups, candidates)) < 0.15] = np.inf
    for group in range(groups):
        if np.isinf(loss[group]).all():
            loss[group, rng.integers(candidates)] = float(rng.normal())
    cost = rng.random((groups, candidates)).round(int(rng.integers(1, 4)))
    weights = rng.random(groups) + 0.1 if rng.random() < 0.5 else None
    layer_of_group = rng.choice([3, 7], size=groups)

    scale = np.full(groups, 1.0 / groups) if weights is None else weights
    kind = seed % 4
    if kind == 0:
        # Tight: exactly the cost of some choice, so the tolerance decides.
        combo = rng.integers(candidates, size=groups)
        budget = float(np.sum(scale * cost[np.arange(groups), combo]))
    elif kind == 1:
        # Often infeasible: below the cheapest choice.
        budget = float(np.sum(scale * cost.min(axis=1))) * float(rng.uniform(0.5, 1.05))
    else:
        budget = float(rng.uniform(0.05, 1.0) * np.sum(scale))
    return {
        "loss": loss,
        "cost": cost,
        "budget": max(budget, 1e-6),
        "weights": weights,
        "layer_of_group": layer_of_group,
    }


def brute_force(
    loss: np.ndarray,
    cost: np.ndarray,
    budget: float,
    weights: np.ndarray | None,
    layer_of_group: np.ndarray,
    max_distinct: int | None,
) -> float:
    """Return the minimum total loss over all feasible choices, +inf if there is none."""
    groups, candidates = loss.shape
    scale = np.full(groups, 1.0 / groups) if weights is None else weights
    choices = np.array(list(itertools.product(range(candidates), repeat=groups)))
    rows = np.arange(groups)
    total_cost = (scale * cost[rows, choices]).sum(axis=1)
    total_loss = loss[rows, choices].sum(axis=1)
    feasible = (total_cost <= budget + BUDGET_TOLERANCE) & np.isfinite(total_loss)
    if max_distinct is not None:
        for layer in np.unique(layer_of_group):
            in_layer = np.sort(choices[:, layer_of_group == layer], axis=1)
            distinct = 1 + (np.diff(in_layer, axis=1) != 0).sum(axis=1)
            feasible &= distinct <= max_distinct
    return float(total_loss[feasible].min()) if feasible.any() else np.inf


def check_solution(
    solution: KnapsackSolution, instance: dict[str, Any], max_distinct: int | None, expected: float
) -> None:
    """Assert that ``solution`` is feasible, consistent and reaches the ``expected`` loss."""
    loss, cost = instance["loss"], instance["cost"]
    groups = loss.shape[0]
    weights = instance["weights"]
    scale = np.full(groups, 1.0 / groups) if weights is None else weights
    choice = solution.choice
    rows = np.arange(groups)

    assert choice.shape == (groups,)
    assert np.issubdtype(choice.dtype, np.integer)
    assert np.isfinite(loss[rows, choice]).all()
    assert solution.total_cost <= instance["budget"] + BUDGET_TOLERANCE
    assert solution.total_cost == pytest.approx(np.sum(scale * cost[rows, choice]), abs=1e-12)
    assert solution.total_loss == pytest.approx(np.sum(loss[rows, choice]), abs=1e-12)
    assert abs(solution.total_loss - expected) <= 1e-9
    if max_distinct is not None:
        layers = instance["layer_of_group"]
        for layer in np.unique(layers):
            assert np.unique(choice[layers == layer]).size <= max_distinct


def solve_or_none(instance: dict[str, Any], max_distinct: int | None) -> KnapsackSolution | None:
    """Solve, or return None when the solver raises the infeasible-budget error."""
    try:
        return solve_knapsack(
            instance["loss"],
            instance["cost"],
            instance["budget"],
            weights=instance["weights"],
            layer_of_group=instance["layer_of_group"],
            max_distinct_per_layer=max_distinct,
        )
    except ConfigError as error:
        assert "infeasible" in str(error)
        return None


@pytest.mark.parametrize(
    "max_distinct",
    [
        None,  # plain knapsack: Pareto dynamic program
        1,  # every group of a layer shares one candidate: LP bound plus MILP
        2,  # two candidates per layer: binds less often, only with 3-4 candidates
    ],
)
def test_solve_matches_brute_force(max_distinct: int | None) -> None:
    infeasible = 0
    for seed in range(200):
        instance = random_instance(seed)
        expected = brute_force(**instance, max_distinct=max_distinct)
        solution = solve_or_none(instance, max_distinct)
        if solution is None:
            assert expected == np.inf, f"seed {seed}: raised but a feasible choice exists"
            infeasible += 1
            continue
        check_solution(solution, instance, max_distinct, expected)
    # The instance mix must cover both outcomes, or the test would miss a class of bugs.
    assert 10 < infeasible < 150


def test_milp_fallback_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no room for the Pareto program, every core goes to the MILP.
    monkeypatch.setattr(_program, "_MAX_DP_PAIRS", 0)
    for seed in range(60):
        instance = random_instance(seed)
        expected = brute_force(**instance, max_distinct=None)
        solution = solve_or_none(instance, None)
        if solution is None:
            assert expected == np.inf
            continue
        check_solution(solution, instance, None, expected)


def reference_milp(loss: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """Solve the plain knapsack as one MILP in HiGHS, independently of the module."""
    groups, candidates = loss.shape
    assignment = sparse.kron(sparse.eye(groups), np.ones((1, candidates)))
    budget_row = (cost / groups).reshape(1, -1)
    result = optimize.milp(
        loss.ravel(),
        integrality=np.ones(loss.size),
        bounds=optimize.Bounds(0, 1),
        constraints=[
            optimize.LinearConstraint(assignment, 1, 1),
            # Just under the budget, so HiGHS's row tolerance cannot make it beat the optimum.
            optimize.LinearConstraint(budget_row, -np.inf, budget - 1e-7),
        ],
        options={"mip_rel_gap": 0},
    )
    assert result.status == 0
    return float(result.fun)


@pytest.mark.parametrize(("seed", "budget"), [(0, 0.1), (1, 0.1), (2, 0.3)])
def test_solve_matches_reference_milp(seed: int, budget: float) -> None:
    # 60 heads x 12 windows: too large for brute force, and the core contains many groups.
    rng = np.random.default_rng(seed)
    windows = np.geomspace(1, 64, 12)
    cost = np.broadcast_to(windows / 64, (60, 12)).copy()
    scale = rng.lognormal(-2, 1, size=(60, 1))
    loss = scale * np.exp(-windows / rng.lognormal(1.5, 1, size=(60, 1)))
    loss += scale * rng.normal(scale=0.05, size=loss.shape)
    solution = solve_knapsack(loss, cost, budget)
    assert solution.total_cost <= budget + BUDGET_TOLERANCE
    assert solution.total_loss <= reference_milp(loss, cost, budget) + 1e-9


@pytest.mark.parametrize(
    ("max_distinct", "minimum"),
    [
        (None, "0.3"),  # cheapest candidates: (0.2 + 0.4) / 2
        (1, "0.45"),  # one shared candidate: candidate 1 costs (0.5 + 0.4) / 2
    ],
)
def test_infeasible_budget_names_minimum(max_distinct: int | None, minimum: str) -> None:
    loss = np.array([[1.0, 0.0], [0.0, 1.0]])
    cost = np.array([[0.2, 0.5], [0.9, 0.4]])
    with pytest.raises(
        ConfigError,
        match=rf"infeasible budget=0\.25: .* is {minimum}, so use a budget >= {minimum}$",
    ):
        solve_knapsack(
            loss, cost, 0.25, layer_of_group=np.array([0, 0]), max_distinct_per_layer=max_distinct
        )


def test_distinct_limit_unreachable_raises() -> None:
    # Each group allows only a candidate that the other forbids, so one shared candidate is
    # impossible at any budget.
    loss = np.array([[0.0, np.inf, 1.0], [np.inf, 0.0, np.inf]])
    cost = np.zeros((2, 3))
    with pytest.raises(ConfigError, match=r"infeasible max_distinct_per_layer=1: no choice"):
        solve_knapsack(loss, cost, 1.0, layer_of_group=np.array([0, 0]), max_distinct_per_layer=1)


def test_distinct_uses_dominated_candidate() -> None:
    # Group 0's candidate 1 is dominated by candidate 0, but sharing candidate 1 with group 1
    # is the only way to fit the budget with one candidate per layer.
    loss = np.array([[0.0, 1.0], [5.0, 0.0]])
    cost = np.array([[0.5, 0.6], [0.9, 0.1]])
    solution = solve_knapsack(
        loss, cost, 0.4, layer_of_group=np.array([0, 0]), max_distinct_per_layer=1
    )
    assert solution.choice.tolist() == [1, 1]
    assert solution.total_loss == 1.0


def test_infinite_loss_never_chosen() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        loss = rng.normal(size=(6, 5))
        # Forbid each group's cheapest candidate, the tempting one at a tight budget, and one
        # random candidate.
        cost = rng.random((6, 5))
        loss[np.arange(6), cost.argmin(axis=1)] = np.inf
        loss[np.arange(6), rng.integers(5, size=6)] = np.inf
        budget = float(rng.uniform(0.4, 1.0))
        for max_distinct in (None, 2):
            try:
                solution = solve_knapsack(
                    loss,
                    cost,
                    budget,
                    layer_of_group=np.array([0, 0, 0, 1, 1, 1]),
                    max_distinct_per_layer=max_distinct,
                )
            except ConfigError:
                continue
            assert np.isfinite(loss[np.arange(6), solution.choice]).all()
            assert np.isfinite(solution.total_loss)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # loss and cost disagree in shape
        ({"cost": np.zeros((2, 4))}, r"invalid shapes loss \(2, 3\) and cost \(2, 4\)"),
        # one-dimensional input
        ({"loss": np.zeros(3), "cost": np.zeros(3)}, r"invalid shapes loss \(3,\)"),
        # empty input
        ({"loss": np.zeros((0, 3)), "cost": np.zeros((0, 3))}, r"invalid shapes"),
        # NaN loss
        ({"loss": np.array([[0.0, np.nan, 1.0]] * 2)}, r"invalid loss: NaN or -inf"),
        # -inf loss would make any choice with it unboundedly good
        ({"loss": np.array([[0.0, -np.inf, 1.0]] * 2)}, r"invalid loss: NaN or -inf"),
        # NaN cost
        ({"cost": np.array([[0.0, np.nan, 1.0]] * 2)}, r"invalid cost"),
        # infinite cost
        ({"cost": np.array([[0.0, np.inf, 1.0]] * 2)}, r"invalid cost"),
        # a group with no allowed candidate
        ({"loss": np.array([[0.0, 1.0, 2.0], [np.inf] * 3])}, r"group 1 has \+inf loss"),
        # zero budget
        ({"budget": 0.0}, r"invalid budget=0\.0: use a total cost > 0"),
        # negative budget
        ({"budget": -1.0}, r"invalid budget=-1\.0"),
        # NaN budget
        ({"budget": float("nan")}, r"invalid budget=nan"),
        # weights of the wrong length
        ({"weights": np.ones(3)}, r"invalid weights shape \(3,\): expected \[groups\] = \(2,\)"),
        # non-positive weight
        ({"weights": np.array([1.0, 0.0])}, r"invalid weights: every weight must be finite"),
        # max_distinct_per_layer below 1
        ({"max_distinct_per_layer": 0}, r"invalid max_distinct_per_layer=0: use a whole number"),
        # max_distinct_per_layer given as a bool
        ({"max_distinct_per_layer": True}, r"invalid max_distinct_per_layer=True"),
        # max_distinct_per_layer without layers
        ({"layer_of_group": None}, r"missing layer_of_group"),
        # one layer for three groups
        ({"layer_of_group": np.zeros(3, dtype=int)}, r"invalid layer_of_group shape \(3,\)"),
        # layers as floats
        ({"layer_of_group": np.zeros(2)}, r"invalid layer_of_group dtype float64"),
    ],
)
def test_invalid_input_raises(arguments: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = {
        "loss": np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]),
        "cost": np.array([[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]]),
        "budget": 0.5,
        "layer_of_group": np.array([0, 0]),
        "max_distinct_per_layer": 1,
    }
    call.update(arguments)
    loss, cost, budget = call.pop("loss"), call.pop("cost"), call.pop("budget")
    with pytest.raises(ConfigError, match=message):
        solve_knapsack(loss, cost, budget, **call)


def test_solution_choice_is_read_only() -> None:
    solution = solve_knapsack(np.array([[1.0, 0.0]]), np.array([[0.1, 0.2]]), 0.5)
    with pytest.raises(ValueError, match="read-only"):
        solution.choice[0] = 0


def test_loose_distinct_limit_changes_nothing() -> None:
    # A limit of at least the number of candidates cannot bind.
    instance = random_instance(7)
    plain = solve_or_none(instance, None)
    loose = solve_or_none(instance, instance["loss"].shape[1])
    assert (plain is None) == (loose is None)
    if plain is not None and loose is not None:
        assert plain.choice.tolist() == loose.choice.tolist()


def check_front(
    front: list[KnapsackSolution], solve_at: Callable[[float], KnapsackSolution]
) -> None:
    """Assert that members are sorted, mutually non-dominated and optimal at their own cost."""
    assert front
    costs = [member.total_cost for member in front]
    losses = [member.total_loss for member in front]
    assert costs == sorted(costs)
    for first, second in itertools.combinations(range(len(front)), 2):
        dominated = costs[first] <= costs[second] and losses[first] <= losses[second]
        assert not dominated, f"member {second} is dominated by member {first}"
    for member in front:
        best = solve_at(member.total_cost)
        assert member.total_loss <= best.total_loss + 1e-9


@pytest.mark.parametrize("max_distinct", [None, 2])
@pytest.mark.parametrize("seed", range(6))
def test_front_members_optimal_and_nondominated(seed: int, max_distinct: int | None) -> None:
    rng = np.random.default_rng(100 + seed)
    loss = rng.normal(size=(6, 5)).round(2)
    cost = rng.random((6, 5))
    weights = rng.random(6) + 0.5
    layers = np.repeat([0, 1], 3)
    options: dict[str, Any] = {
        "weights": weights,
        "layer_of_group": layers,
        "max_distinct_per_layer": max_distinct,
    }
    front = solve_front(loss, cost, num_budgets=7, **options)
    check_front(front, lambda budget: solve_knapsack(loss, cost, budget, **options))

    # The default grid spans the cheapest choice to the min-loss choice.
    with pytest.raises(ConfigError, match="infeasible budget"):
        solve_knapsack(loss, cost, front[0].total_cost - 1e-9, **options)
    unlimited = solve_knapsack(loss, cost, float(np.sum(weights * cost.max(axis=1))), **options)
    assert front[-1].total_loss == pytest.approx(unlimited.total_loss, abs=1e-9)


def test_front_at_given_budgets() -> None:
    rng = np.random.default_rng(3)
    loss = np.sort(rng.random((40, 10)), axis=1)[:, ::-1]
    cost = np.sort(rng.random((40, 10)), axis=1)
    budgets = [0.3, 0.5, 0.5, 0.7]
    front = solve_front(loss, cost, budgets=budgets)
    check_front(front, lambda budget: solve_knapsack(loss, cost, budget))
    # The repeated budget gives the same solution, which appears once.
    assert len(front) <= 3
    for budget in budgets:
        best = solve_knapsack(loss, cost, budget)
        assert any(member.total_loss == best.total_loss for member in front)


def test_front_infeasible_budget_raises() -> None:
    loss = np.array([[1.0, 0.0]])
    cost = np.array([[0.2, 0.4]])
    with pytest.raises(
        ConfigError, match=r"infeasible budget=0\.1: .* is 0\.2, so use a budget >= 0\.2$"
    ):
        solve_front(loss, cost, budgets=[0.3, 0.1])


@pytest.mark.parametrize("case", ["error", "infeasible"])
def test_distinct_one_survives_presolve_failures(case: str) -> None:
    """Instances on which HiGHS's presolve fails ("error") or wrongly reports infeasibility."""
    data = np.load(Path(__file__).parent / "data" / "knapsack_presolve.npz")
    loss, cost = data[f"{case}_loss"], data[f"{case}_cost"]
    budget = float(data[f"{case}_budget"])
    layer_of_group = np.arange(20) // 4
    # With one window per layer, a choice is one candidate per layer: 10**5 choices.
    per_layer = np.array(list(itertools.product(range(10), repeat=5)))
    choices = np.repeat(per_layer, 4, axis=1)
    rows = np.arange(20)
    feasible = cost[rows, choices].mean(axis=1) <= budget + BUDGET_TOLERANCE
    expected = float(loss[rows, choices].sum(axis=1)[feasible].min())

    solution = solve_knapsack(
        loss, cost, budget, layer_of_group=layer_of_group, max_distinct_per_layer=1
    )

    assert solution.total_loss == pytest.approx(expected, abs=1e-12)
    assert solution.total_cost <= budget + BUDGET_TOLERANCE
