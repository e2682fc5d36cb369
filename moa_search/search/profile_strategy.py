"""Profile-guided search: per-head windows decoded by an exact knapsack from a model of the loss.

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
cost target, and the study is seeded with these optima at several budgets.

Then :meth:`ProfileStrategy.fitted_configs` runs round after round: it fits an additive Bayesian
model (:class:`~moa_search.search.surrogate.AdditiveSurrogate`, built on the same two terms plus a
learned step per group and window) to every exact evaluation so far, and proposes the few knapsack
optima of the model that are predicted to add the most hypervolume to the measured front. When a
round proposes nothing, the remaining trials go to the Optuna sampler, which searches what
neither term can know: a log2 correction per layer, the log2 mixing weight, and the cost target
between the cheapest config and the budget. Every config is evaluated exactly, like in the direct
strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import optuna

from moa_search.cost import area_density
from moa_search.knapsack import solve_front, solve_knapsack
from moa_search.profile import HeadProfile
from moa_search.search.groups import HeadGroups
from moa_search.search.hypervolume import hypervolume
from moa_search.search.strategies import seeded_windows
from moa_search.search.surrogate import AdditiveSurrogate

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
# Cost targets, evenly spaced from the cheapest config to the budget, at which each fitted round
# takes the knapsack optima of the surrogate as candidates.
POOL_BUDGETS = 64
# The same with at most K distinct windows per layer, where every target is a MILP that can take
# a minute on a 1,024-group model.
DISTINCT_POOL_BUDGETS = 16
# Configs each fitted round proposes. Fewer means more refits per evaluation: on stories260K, 4
# reached 95% of the best known hypervolume sooner than 8 or 14.
PROPOSALS_PER_ROUND = 4
# Standard deviations subtracted from the surrogate's mean when scoring candidates, so configs far
# from every evaluation still get tried.
OPTIMISM = 1.0


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


def pick_by_hypervolume(
    measured: Sequence[tuple[float, float]],
    candidates: Sequence[tuple[float, float]],
    reference: tuple[float, float],
    count: int,
) -> list[int]:
    """Pick candidates greedily, each the one that adds the most hypervolume to the points so far.

    Args:
        measured: ``(cost, loss)`` points already on hand.
        candidates: ``(cost, loss)`` points to choose from.
        reference: Reference point of the hypervolume.
        count: At most this many picks.

    Returns:
        Indices into ``candidates`` in the order picked. Picking stops early when no candidate
        adds volume.
    """
    points = list(measured)
    volume = hypervolume(points, reference)
    picked: list[int] = []
    for _ in range(count):
        best, best_gain = -1, 0.0
        for index, candidate in enumerate(candidates):
            if index in picked:
                continue
            gain = hypervolume([*points, candidate], reference) - volume
            if gain > best_gain:
                best, best_gain = index, gain
        if best < 0:
            break
        picked.append(best)
        points.append(candidates[best])
        volume += best_gain
    return picked


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
        self.uniform_measured = False  # whether set_uniform_increase has been called
        self._decode = lru_cache(maxsize=4096)(self._decode_uncached)

    def set_uniform_increase(self, nll_increase: Sequence[float]) -> None:
        """Set the measured NLL increase of each candidate's uniform config ``[candidates]``."""
        self.uniform = np.asarray(nll_increase, dtype=np.float64) / self.groups.num_groups
        self.uniform_measured = True
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

    def fitted_configs(
        self, configs: Sequence[Sequence[int | None]], nll_increase: Sequence[float]
    ) -> list[tuple[str, list[int | None]]]:
        """Fit the additive surrogate to exact evaluations and propose configs that extend the front.

        The candidates are the knapsack optima of the surrogate's posterior mean at
        :data:`POOL_BUDGETS` cost targets (:data:`DISTINCT_POOL_BUDGETS` with a distinct-window
        limit) from the cheapest config to the budget. Each is scored by its optimistic
        prediction, the posterior mean minus :data:`OPTIMISM` standard deviations. Then up to
        :data:`PROPOSALS_PER_ROUND` of them are picked one at a time, each the one that adds the
        most hypervolume to the measured front together with the picks before it.

        Args:
            configs: Evaluated configs, one window per group each.
            nll_increase: Their measured ``log(ppl / dense ppl)``.

        Returns:
            ``(label, group windows)`` of configs not evaluated yet, in the order picked; empty
            when no candidate is predicted to improve the front.
        """
        column = {window: index for index, window in enumerate(self.candidates)}
        choices = np.array([[column[window] for window in config] for config in configs])
        increases = np.asarray(nll_increase, dtype=np.float64)
        # An overflowed perplexity gives the model nothing to fit, but its config still counts as
        # evaluated.
        finite = np.isfinite(increases)
        surrogate = AdditiveSurrogate(self.loss, self.uniform, self.layer_of_group)
        surrogate.fit(choices[finite], increases[finite])

        upper = max(self.budget, self.min_cost)
        pool_budgets = DISTINCT_POOL_BUDGETS if self.max_windows_per_layer else POOL_BUDGETS
        front = solve_front(
            surrogate.table(),
            self.cost,
            budgets=np.linspace(self.min_cost, upper, pool_budgets),
            layer_of_group=self.layer_of_group if self.max_windows_per_layer else None,
            max_distinct_per_layer=self.max_windows_per_layer,
        )
        evaluated = {tuple(row) for row in choices.tolist()}
        pool = np.array(
            sorted({tuple(solution.choice.tolist()) for solution in front} - evaluated),
            dtype=np.int64,
        )
        if len(pool) == 0:
            return []
        mean, std = surrogate.predict(pool)
        optimistic = mean - OPTIMISM * std
        pool_cost = self.config_cost(pool)

        measured_cost = self.config_cost(choices)
        measured = [
            (float(cost), float(loss))
            for cost, loss in zip(measured_cost, increases, strict=True)
            if cost <= self.budget and np.isfinite(loss)
        ]
        reference = (
            self.budget,
            max((loss for _, loss in measured), default=float(optimistic.max())),
        )
        candidates = list(zip(pool_cost.tolist(), optimistic.tolist(), strict=True))
        picked = pick_by_hypervolume(measured, candidates, reference, PROPOSALS_PER_ROUND)
        return [
            (
                f"fitted @ {pool_cost[index]:.3g}",
                [self.candidates[candidate] for candidate in pool[index]],
            )
            for index in picked
        ]

    def config_cost(self, choices: np.ndarray) -> np.ndarray:
        """Return the float64 ``[configs]`` cost of configs given as indices ``[configs, groups]``."""
        return self.cost[np.arange(self.groups.num_groups), choices].mean(axis=1)

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
