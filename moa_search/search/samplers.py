"""Optuna samplers by name."""

from __future__ import annotations

import warnings

import optuna

from moa_search.errors import ConfigError

SAMPLERS = ("tpe", "nsga2", "nsga3", "gp", "random")


def make_sampler(
    name: str, *, seed: int, population_size: int = 20
) -> optuna.samplers.BaseSampler:
    """Create a seeded sampler; every one reads the budget constraint set with ``trial.set_constraint``.

    Args:
        name: One of :data:`SAMPLERS`.
        population_size: Generation size of the genetic samplers (nsga2, nsga3).
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    # Both are marked experimental in Optuna 5; the warning is not actionable for our users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga3":
            return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population_size)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
