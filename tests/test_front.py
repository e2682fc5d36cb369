"""Unit tests of the Pareto front on synthetic Optuna studies, and of its table and summaries."""

from __future__ import annotations

import random
from typing import Any

import optuna
import pytest

from moa_search.front import (
    FrontMember,
    front_table,
    pareto_front,
    recommended_member,
    summarize_layer,
    summarize_windows,
    with_holdout,
)

BUDGET = 0.5


def add_trial(
    study: optuna.Study,
    perplexity: float,
    cost: float,
    group_windows: list[int | None],
    seed: str | None = None,
) -> int:
    """Add a finished trial with the user attributes that the search objective records.

    Returns:
        The trial number.
    """
    user_attrs: dict[str, Any] = {
        "group_windows": group_windows,
        "cost": cost,
        "kv_fraction": cost / 2,
    }
    if seed is not None:
        user_attrs["seed"] = seed
    study.add_trial(
        optuna.trial.create_trial(values=[perplexity, cost], user_attrs=user_attrs)
    )
    return len(study.trials) - 1


def new_study() -> optuna.Study:
    return optuna.create_study(directions=["minimize", "minimize"])


def brute_force_front(points: dict[int, tuple[float, float]]) -> set[int]:
    """Return the trials that no other point dominates (<= in both objectives and not equal)."""
    front = set()
    for number, point in points.items():
        dominated = any(
            other[0] <= point[0] and other[1] <= point[1] and other != point
            for other_number, other in points.items()
            if other_number != number
        )
        if not dominated:
            front.add(number)
    return front


def member(
    trial: int,
    perplexity: float,
    cost: float,
    holdout: float | None = None,
    seed: str | None = None,
) -> FrontMember:
    return FrontMember(
        trial=trial,
        perplexity=perplexity,
        cost=cost,
        kv_fraction=cost / 2,
        group_windows=[16, 32],
        feasible=cost <= BUDGET,
        seed=seed,
        holdout_perplexity=holdout,
    )


# --- pareto_front --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_front_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    study = new_study()
    points = {}
    for index in range(60):
        # Values on a coarse grid, so ties in one or both objectives occur.
        point = (rng.randint(0, 12) / 4 + 4, rng.randint(0, 12) / 12)
        number = add_trial(study, *point, group_windows=[index, None])
        points[number] = point

    front = pareto_front(study, BUDGET)

    assert {m.trial for m in front} == brute_force_front(points)


@pytest.mark.parametrize(
    ("trials", "expected"),
    [
        # A chain where each point improves one objective and worsens the other: all stay.
        ([(6.0, 0.1), (5.0, 0.2), (4.0, 0.3)], {0, 1, 2}),
        # The middle point is worse than the last in both objectives.
        ([(6.0, 0.1), (5.0, 0.3), (4.0, 0.2)], {0, 2}),
        # Equal cost: only the lower perplexity stays.
        ([(6.0, 0.2), (5.0, 0.2)], {1}),
        # Equal perplexity: only the lower cost stays.
        ([(5.0, 0.3), (5.0, 0.2)], {1}),
        # Two different configs with identical values: neither dominates the other.
        ([(5.0, 0.2), (5.0, 0.2)], {0, 1}),
        # One trial.
        ([(5.0, 0.2)], {0}),
    ],
)
def test_front_cases(trials: list[tuple[float, float]], expected: set[int]) -> None:
    study = new_study()
    for index, (perplexity, cost) in enumerate(trials):
        add_trial(study, perplexity, cost, group_windows=[index])

    assert {m.trial for m in pareto_front(study, BUDGET)} == expected


def test_front_collapses_duplicate_configs() -> None:
    study = new_study()
    add_trial(study, 5.0, 0.2, group_windows=[16, 16])
    best = add_trial(study, 4.5, 0.2, group_windows=[16, 16])
    add_trial(study, 4.8, 0.2, group_windows=[16, 16])
    other = add_trial(study, 4.0, 0.4, group_windows=[32, None])

    front = pareto_front(study, BUDGET)

    assert [m.trial for m in front] == [best, other]


def test_front_duplicate_does_not_hide_other_config() -> None:
    """A worse repeat of a config is dropped before dominance, so it cannot crowd out others."""
    study = new_study()
    add_trial(study, 5.0, 0.2, group_windows=[16])
    add_trial(study, 4.0, 0.2, group_windows=[16])
    kept = add_trial(study, 4.5, 0.1, group_windows=[8])

    assert {m.trial for m in pareto_front(study, BUDGET)} == {1, kept}


def test_front_sorted_by_cost() -> None:
    study = new_study()
    add_trial(study, 4.0, 0.9, group_windows=[None])
    add_trial(study, 6.0, 0.1, group_windows=[8])
    add_trial(study, 5.0, 0.3, group_windows=[16])

    costs = [m.cost for m in pareto_front(study, BUDGET)]

    assert costs == sorted(costs)


def test_front_marks_infeasible() -> None:
    study = new_study()
    add_trial(study, 6.0, 0.25, group_windows=[8])
    add_trial(study, 5.0, BUDGET, group_windows=[16])
    add_trial(study, 4.0, 0.75, group_windows=[None])

    front = pareto_front(study, BUDGET)

    # The budget itself is within the budget.
    assert [(m.cost, m.feasible) for m in front] == [(0.25, True), (BUDGET, True), (0.75, False)]


def test_front_copies_user_attrs() -> None:
    study = new_study()
    number = add_trial(study, 5.0, 0.4, group_windows=[8, None], seed="uniform W=8 (0.12)")

    [front_member] = pareto_front(study, BUDGET)

    assert front_member.trial == number
    assert front_member.perplexity == 5.0
    assert front_member.cost == 0.4
    assert front_member.kv_fraction == 0.2
    assert front_member.group_windows == [8, None]
    assert front_member.seed == "uniform W=8 (0.12)"
    assert front_member.holdout_perplexity is None


def test_front_ignores_unfinished_trials() -> None:
    study = new_study()
    finished = add_trial(study, 5.0, 0.4, group_windows=[8])
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, user_attrs={"group_windows": [4]}
        )
    )

    assert [m.trial for m in pareto_front(study, BUDGET)] == [finished]


def test_front_of_empty_study() -> None:
    assert pareto_front(new_study(), BUDGET) == []


# --- held-out perplexity and the recommended member ----------------------------------------------


def test_with_holdout_attaches_by_trial() -> None:
    members = [member(3, 5.0, 0.2), member(7, 4.0, 0.4)]

    attached = with_holdout(members, {"7": 4.25})

    assert [m.holdout_perplexity for m in attached] == [None, 4.25]
    assert [m.trial for m in attached] == [3, 7]
    assert members[1].holdout_perplexity is None


def test_recommended_prefers_holdout() -> None:
    members = [
        member(0, 5.0, 0.2, holdout=4.5),
        # Lowest calibration perplexity, but not the lowest held-out one.
        member(1, 4.0, 0.4, holdout=4.75),
        # Lowest held-out perplexity of all, but above the budget.
        member(2, 3.0, 0.8, holdout=3.5),
    ]

    recommended = recommended_member(members)

    assert recommended is not None
    assert recommended.trial == 0


def test_recommended_without_holdout_uses_calibration() -> None:
    members = [member(0, 5.0, 0.2, holdout=4.5), member(1, 4.0, 0.4)]

    recommended = recommended_member(members)

    assert recommended is not None
    assert recommended.trial == 1


def test_recommended_none_when_all_infeasible() -> None:
    assert recommended_member([member(0, 4.0, 0.8, holdout=4.0)]) is None
    assert recommended_member([]) is None


# --- summaries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        ([64, 64, 64], "64"),
        ([None, None], "f"),
        ([16, 16, 64, None], "16x2,64,f"),
        ([16, 64, 16], "16,64,16"),
        ([None, None, None, 8], "fx3,8"),
        # 1 and 16 share no prefix once split at "x".
        ([1, 1, 16, 16, 16], "1x2,16x3"),
        ([8], "8"),
    ],
)
def test_summarize_layer(windows: list[int | None], expected: str) -> None:
    assert summarize_layer(windows) == expected


@pytest.mark.parametrize(
    ("group_windows", "groups_per_layer", "expected"),
    [
        ([64] * 8, 4, "all 64"),
        ([None] * 8, 4, "all f"),
        ([16, 16, 64, None, 32, 32, 32, 32], 4, "16x2,64,f / 32"),
        ([8, 16, 8, 16, 8, 16], 2, "8,16 / 8,16 / 8,16"),
    ],
)
def test_summarize_windows(
    group_windows: list[int | None], groups_per_layer: int, expected: str
) -> None:
    assert summarize_windows(group_windows, groups_per_layer) == expected


# --- front_table ---------------------------------------------------------------------------------

TABLE_COLUMNS = [
    "trial",
    "perplexity",
    "delta_pct",
    "holdout_perplexity",
    "holdout_delta_pct",
    "cost",
    "kv_fraction",
    "feasible",
    "baseline",
    "recommended",
    "windows",
]


def test_front_table_columns() -> None:
    members = [
        member(0, 6.0, 0.2, holdout=6.5, seed="uniform W=16 (0.20)"),
        member(4, 5.0, 0.4, holdout=5.2),
        member(9, 4.0, 0.9, holdout=4.4, seed="uniform full"),
    ]

    table = front_table(
        members, dense_perplexity=4.0, dense_holdout_perplexity=4.0, groups_per_layer=1
    )

    assert list(table.columns) == TABLE_COLUMNS
    assert table["trial"].tolist() == [0, 4, 9]
    assert table["delta_pct"].tolist() == pytest.approx([50.0, 25.0, 0.0])
    assert table["holdout_delta_pct"].tolist() == pytest.approx([62.5, 30.0, 10.0])
    assert table["feasible"].tolist() == [True, True, False]
    # pandas stores a missing label as None or NaN depending on the column's dtype.
    assert table["baseline"].isna().tolist() == [False, True, False]
    assert table["baseline"].dropna().tolist() == ["uniform W=16 (0.20)", "uniform full"]
    assert table["recommended"].tolist() == [False, True, False]
    assert table["windows"].tolist() == ["16 / 32"] * 3


def test_front_table_without_holdout() -> None:
    members = [member(0, 6.0, 0.2), member(4, 5.0, 0.4)]

    table = front_table(
        members, dense_perplexity=5.0, dense_holdout_perplexity=None, groups_per_layer=2
    )

    assert table["holdout_perplexity"].isna().all()
    assert table["holdout_delta_pct"].isna().all()
    assert table["recommended"].tolist() == [False, True]
    assert table["windows"].tolist() == ["16,32"] * 2


def test_front_table_ignores_non_uniform_seeds() -> None:
    members = [member(0, 6.0, 0.2, seed="surrogate optimum")]

    table = front_table(
        members, dense_perplexity=5.0, dense_holdout_perplexity=None, groups_per_layer=2
    )

    assert table["baseline"].isna().all()
