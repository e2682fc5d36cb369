"""Profile-guided search: a few Optuna parameters decoded into per-head windows by an exact knapsack.

The profile estimates each head group's loss increase under every candidate window, one head at a
time. Those estimates carry some signal about single heads (on stories260K, Spearman 0.54 against
measured single-head changes) but do not add up: restricting many heads at once costs far more
than the sum of the single-head estimates (on stories260K, uniform 16-token windows raise the
NLL by 0.175 while the estimates sum to -0.02), because errors compound through the layers. The
measured uniform-window baselines carry exactly that compounding, so the decoded loss of group g
under candidate c is

    2**s[layer(g)] * estimate[g, c] + 2**mix * uniform[c]

where ``uniform[c]`` is the measured NLL increase of the uniform config at window c divided by the
number of groups. The multiple-choice knapsack gives the config with the least decoded loss under a
cost target. Optuna searches what neither term can know: a log2 correction per layer, the log2
mixing weight, and the cost target between the cheapest config and the budget. Every decoded config
is evaluated exactly, like in the direct strategy.

Before the sampler's trials, :meth:`ProfileStrategy.fitted_configs` fits per-layer weights of both
terms to all exact evaluations so far and proposes the knapsack optima of the fitted loss across
the budget; the pipeline repeats this until a round proposes no new config.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import optuna

from moa_search.cost import area_density
from moa_search.knapsack import solve_knapsack
from moa_search.profile import HeadProfile
from moa_search.search.groups import HeadGroups
from moa_search.search.strategies import seeded_windows

# Range of the per-layer log2 correction factors: estimates scaled by 1/8 to 8.
LOG2_SCALE_RANGE = (-3.0, 3.0)
# Range of the log2 weight of the uniform-window term.
LOG2_MIX_RANGE = (-4.0, 4.0)
# Budgets at which the surrogate-optimal configs seed the study, besides shares of the run's
# budget.
SEED_BUDGETS = (0.1, 0.25, 0.5)
SEED_BUDGET_SHARES = (0.25, 0.5, 0.75, 1.0)
# Mixing weights (log2) of the seeded surrogate configs.
SEED_MIXES = (0.0, 2.0)
# Cost targets of each fitted round, evenly spaced from the cheapest config to the budget.
FIT_BUDGETS = 14
# Ridge weight that pulls the fitted layer weights towards the prior (estimates 0, uniform term 1) while
# there are few exact evaluations; in units of squared NLL increase.
FIT_RIDGE = 1e-3


def group_loss(profile: HeadProfile, groups: HeadGroups) -> np.ndarray:
    """Sum the profile's per-head estimates over the heads of each group.

    Returns:
        float64 ``[groups, candidates]``, in mean NLL per predicted token.
    """
    layers, heads, candidates = profile.loss_increase.shape
    per_group = groups.heads_per_group
    return (
        profile.loss_increase.reshape(layers, heads // per_group, per_group, candidates)
        .sum(axis=2)
        .reshape(groups.num_groups, candidates)
    )


def group_cost(
    candidates: Sequence[int | None],
    groups: HeadGroups,
    cost_lengths: Sequence[int],
    sink_tokens: int,
) -> np.ndarray:
    """Return the area density of each candidate, averaged over the cost lengths, for every group.

    Returns:
        float64 ``[groups, candidates]``; with equal group weights their mean is the config's cost.
    """
    row = [
        float(np.mean([area_density(window, length, sink_tokens) for length in cost_lengths]))
        for window in candidates
    ]
    return np.tile(np.asarray(row), (groups.num_groups, 1))


class ProfileStrategy:
    """Decodes per-layer correction factors and a cost target into windows with the exact knapsack.

    Args:
        groups: The searched head groups.
        candidates: Candidate windows, matching the profile's columns.
        loss: float64 ``[groups, candidates]`` estimated loss increases (see :func:`group_loss`).
        cost: float64 ``[groups, candidates]`` costs (see :func:`group_cost`).
        budget: The run's cost budget.
        max_windows_per_layer: At most this many distinct windows in one layer, or None.
    """

    name = "profile"

    def __init__(
        self,
        groups: HeadGroups,
        candidates: Sequence[int | None],
        loss: np.ndarray,
        cost: np.ndarray,
        budget: float,
        max_windows_per_layer: int | None = None,
    ):
        self.groups = groups
        self.candidates = list(candidates)
        self.loss = loss
        self.cost = cost
        self.budget = budget
        self.max_windows_per_layer = max_windows_per_layer
        self.layer_of_group = np.arange(groups.num_groups) // groups.groups_per_layer
        self.min_cost = float(cost.min(axis=1).mean())
        self.uniform = np.zeros(len(self.candidates))
        self._decode = lru_cache(maxsize=4096)(self._decode_uncached)

    def set_uniform_increase(self, nll_increase: Sequence[float]) -> None:
        """Set the measured NLL increase of each candidate's uniform config ``[candidates]``."""
        self.uniform = np.asarray(nll_increase, dtype=np.float64) / self.groups.num_groups
        self._decode.cache_clear()

    def decode(
        self, log2_scales: Sequence[float], log2_mix: float, target: float
    ) -> list[int | None]:
        """Solve the knapsack for the decoded loss under a cost target; returns one window per group."""
        scales = tuple(float(value) for value in log2_scales)
        return list(self._decode(scales, float(log2_mix), float(target)))

    def _decode_uncached(
        self, log2_scales: tuple[float, ...], log2_mix: float, target: float
    ) -> tuple[int | None, ...]:
        scale = np.exp2(np.asarray(log2_scales))[self.layer_of_group]
        decoded = self.loss * scale[:, None] + np.exp2(log2_mix) * self.uniform[None, :]
        solution = solve_knapsack(
            decoded,
            self.cost,
            max(target, self.min_cost),
            layer_of_group=self.layer_of_group if self.max_windows_per_layer else None,
            max_distinct_per_layer=self.max_windows_per_layer,
        )
        return tuple(self.candidates[index] for index in solution.choice)

    def suggest(self, trial: optuna.Trial) -> list[int | None]:
        """Sample correction factors and a cost target, then decode them."""
        seeded = seeded_windows(trial)
        if seeded is not None:
            return seeded
        low, high = LOG2_SCALE_RANGE
        scales = [
            trial.suggest_float(f"log2_scale.L{layer}", low, high)
            for layer in range(self.groups.shape.num_layers)
        ]
        mix = trial.suggest_float("log2_mix", *LOG2_MIX_RANGE)
        share = trial.suggest_float("budget_share", 0.0, 1.0)
        target = self.min_cost + share * (self.budget - self.min_cost)
        return self.decode(scales, mix, target)

    def layer_features(self, group_windows: Sequence[int | None]) -> np.ndarray:
        """Sum the estimates and the uniform term of a config per layer.

        Returns:
            float64 ``[2 * layers]``: per-layer estimate sums, then per-layer uniform-term sums.
        """
        column = {window: index for index, window in enumerate(self.candidates)}
        chosen = np.array([column[window] for window in group_windows])
        groups = np.arange(self.groups.num_groups)
        layers = self.groups.shape.num_layers
        estimates = np.bincount(self.layer_of_group, self.loss[groups, chosen], minlength=layers)
        uniform = np.bincount(self.layer_of_group, self.uniform[chosen], minlength=layers)
        return np.concatenate([estimates, uniform])

    def fitted_configs(
        self, configs: Sequence[Sequence[int | None]], nll_increase: Sequence[float]
    ) -> list[tuple[str, list[int | None]]]:
        """Fit per-layer weights of both terms to exact evaluations and decode across the budget.

        The measured NLL increase of a config is modelled as
        ``sum over layers of a[l] * estimates[l] + b[l] * uniform[l]`` (see :meth:`layer_features`),
        fitted by ridge regression towards ``a = 0, b = 1``. Unlike the sampled trials, this learns
        from every exact evaluation how much each layer's windows compound.

        Args:
            configs: Evaluated configs, one window per group each.
            nll_increase: Their measured ``log(ppl / dense ppl)``.

        Returns:
            ``(label, group windows)`` of the knapsack optimum under the fitted loss at
            :data:`FIT_BUDGETS` cost targets, cheapest first, without repeats.
        """
        layers = self.groups.shape.num_layers
        features = np.array([self.layer_features(config) for config in configs])
        target = np.asarray(nll_increase, dtype=np.float64)
        prior = np.concatenate([np.zeros(layers), np.ones(layers)])
        gram = features.T @ features + FIT_RIDGE * np.eye(2 * layers)
        weights = np.linalg.solve(gram, features.T @ target + FIT_RIDGE * prior)
        estimate_weight = weights[:layers][self.layer_of_group]
        uniform_weight = np.maximum(weights[layers:], 0.0)[self.layer_of_group]
        fitted = estimate_weight[:, None] * self.loss + uniform_weight[:, None] * self.uniform[None, :]
        seeds: list[tuple[str, list[int | None]]] = []
        seen: set[tuple[int | None, ...]] = set()
        for target_cost in np.linspace(self.min_cost, self.budget, FIT_BUDGETS):
            solution = solve_knapsack(
                fitted,
                self.cost,
                max(float(target_cost), self.min_cost),
                layer_of_group=self.layer_of_group if self.max_windows_per_layer else None,
                max_distinct_per_layer=self.max_windows_per_layer,
            )
            windows = [self.candidates[index] for index in solution.choice]
            if tuple(windows) not in seen:
                seen.add(tuple(windows))
                seeds.append((f"fitted @ {target_cost:.3g}", windows))
        return seeds

    def seed_params(self, group_windows: list[int | None]) -> dict[str, Any]:
        """Seeds are fixed windows; this strategy's parameters cannot express them."""
        return {}

    def surrogate_seeds(self) -> list[tuple[str, list[int | None]]]:
        """Return the surrogate-optimal configs at several budgets up to the run's budget, cheapest first."""
        budgets = {b for b in SEED_BUDGETS if b <= self.budget}
        budgets |= {share * self.budget for share in SEED_BUDGET_SHARES}
        seeds: list[tuple[str, list[int | None]]] = []
        seen: set[tuple[int | None, ...]] = set()
        neutral = [0.0] * self.groups.shape.num_layers
        for budget in sorted(budgets):
            if budget < self.min_cost:
                continue
            for mix in SEED_MIXES:
                windows = self.decode(neutral, mix, budget)
                if tuple(windows) not in seen:
                    seen.add(tuple(windows))
                    seeds.append((f"surrogate @ {budget:.3g} mix {mix:g}", windows))
        return seeds
