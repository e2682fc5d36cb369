"""The Pareto front of a study, as records and as a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
import pandas as pd

from moa_search.search.study import completed_trials
from moa_search.search.strategies import SEED_LABEL_ATTR


@dataclass(frozen=True)
class FrontMember:
    """One non-dominated trial: calibration perplexity against cost."""

    trial: int
    perplexity: float
    cost: float
    kv_fraction: float
    group_windows: list[int | None]
    feasible: bool
    seed: str | None
    holdout_perplexity: float | None = None


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def pareto_front(study: optuna.Study, budget: float) -> list[FrontMember]:
    """Return the non-dominated trials of a study, cheapest first, one per distinct config.

    Infeasible trials (cost above ``budget``) stay in the front, marked, because a trial can only
    be dominated by a cheaper one and so never hides a feasible member.
    """
    best: dict[tuple, optuna.trial.FrozenTrial] = {}
    for trial in completed_trials(study):
        key = tuple(trial.user_attrs["group_windows"])
        if key not in best or trial.values[0] < best[key].values[0]:
            best[key] = trial
    points = {number: (t.values[0], t.values[1]) for number, t in enumerate(best.values())}
    trials = list(best.values())
    members = []
    for index, trial in enumerate(trials):
        if any(_dominates(points[other], points[index]) for other in points if other != index):
            continue
        members.append(
            FrontMember(
                trial=trial.number,
                perplexity=trial.values[0],
                cost=trial.values[1],
                kv_fraction=trial.user_attrs["kv_fraction"],
                group_windows=list(trial.user_attrs["group_windows"]),
                feasible=trial.values[1] <= budget,
                seed=trial.user_attrs.get(SEED_LABEL_ATTR),
            )
        )
    return sorted(members, key=lambda member: (member.cost, member.perplexity))


def with_holdout(members: list[FrontMember], holdout: dict[str, float]) -> list[FrontMember]:
    """Attach held-out perplexities (keyed by trial number as a string) to front members."""
    return [
        dataclasses.replace(member, holdout_perplexity=holdout.get(str(member.trial)))
        for member in members
    ]


def recommended_member(members: list[FrontMember]) -> FrontMember | None:
    """Pick the feasible member with the lowest held-out perplexity, or calibration perplexity without one."""
    feasible = [member for member in members if member.feasible]
    if not feasible:
        return None
    if all(member.holdout_perplexity is not None for member in feasible):
        return min(feasible, key=lambda member: member.holdout_perplexity or 0.0)
    return min(feasible, key=lambda member: member.perplexity)


def summarize_layer(windows: list[int | None]) -> str:
    """Write one layer's group windows compactly: ``64`` when uniform, else ``16x2,64,f`` (f = full)."""
    labels = ["f" if window is None else str(window) for window in windows]
    if len(set(labels)) == 1:
        return labels[0]
    parts: list[str] = []
    for label in labels:
        if parts and parts[-1].split("x")[0] == label:
            count = int(parts[-1].split("x")[1]) if "x" in parts[-1] else 1
            parts[-1] = f"{label}x{count + 1}"
        else:
            parts.append(label)
    return ",".join(parts)


def summarize_windows(group_windows: list[int | None], groups_per_layer: int) -> str:
    """Summarise every layer, layers separated by ``/``; a uniform config reads ``all 64``."""
    if len(set(group_windows)) == 1:
        return f"all {summarize_layer(group_windows[:1])}"
    layers = [
        group_windows[start : start + groups_per_layer]
        for start in range(0, len(group_windows), groups_per_layer)
    ]
    return " / ".join(summarize_layer(layer) for layer in layers)


def front_table(
    members: list[FrontMember],
    *,
    dense_perplexity: float,
    dense_holdout_perplexity: float | None,
    groups_per_layer: int,
) -> pd.DataFrame:
    """Build the front as a DataFrame, one row per member, cheapest first.

    Columns: trial, perplexity, delta_pct (vs dense, %), holdout_perplexity, holdout_delta_pct,
    cost, kv_fraction, feasible, baseline (the seed label of uniform baselines), recommended,
    windows.
    """
    recommended = recommended_member(members)
    rows = []
    for member in members:
        holdout_delta = None
        if member.holdout_perplexity is not None and dense_holdout_perplexity:
            holdout_delta = 100 * (member.holdout_perplexity / dense_holdout_perplexity - 1)
        rows.append(
            {
                "trial": member.trial,
                "perplexity": member.perplexity,
                "delta_pct": 100 * (member.perplexity / dense_perplexity - 1),
                "holdout_perplexity": member.holdout_perplexity,
                "holdout_delta_pct": holdout_delta,
                "cost": member.cost,
                "kv_fraction": member.kv_fraction,
                "feasible": member.feasible,
                "baseline": member.seed
                if member.seed and member.seed.startswith("uniform")
                else None,
                "recommended": recommended is not None and member.trial == recommended.trial,
                "windows": summarize_windows(member.group_windows, groups_per_layer),
            }
        )
    return pd.DataFrame(rows)
