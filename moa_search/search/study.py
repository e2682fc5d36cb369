"""The Optuna study: objectives, budget constraint, seed trials and the trial loop."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import TrialState

from moa_search.cost import area_density
from moa_search.errors import ConfigError
from moa_search.search import interrupts
from moa_search.search.evaluator import WindowEvaluator
from moa_search.search.groups import HeadGroups
from moa_search.search.samplers import make_sampler
from moa_search.search.strategies import (
    SEED_LABEL_ATTR,
    SEED_WINDOWS_ATTR,
    Strategy,
    seeded_windows,
)

logger = logging.getLogger(__name__)

# Objective order of every study: calibration perplexity, then cost relative to dense attention.
DIRECTIONS = ("minimize", "minimize")
BUDGET_CONSTRAINT = "cost_over_budget"


def open_study(
    *, study_name: str, storage: str, sampler: str, seed: int, resume: bool
) -> optuna.Study:
    """Create a new two-objective study, or load an existing one when ``resume`` is set.

    Resuming a run that stopped before its study existed creates the study.

    Raises:
        ConfigError: when the storage URL is invalid, or when creating a study that already exists.
    """
    optuna_sampler = make_sampler(sampler, seed=seed)
    try:
        storage_backend = optuna.storages.get_storage(storage)
    except (
        Exception
    ) as error:  # SQLAlchemy raises many types for a bad URL or an unreachable server.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"invalid Optuna storage {storage!r}: {reason}; pass a URL such as sqlite:///study.db"
        ) from error
    if resume:
        try:
            return optuna.load_study(
                study_name=study_name, storage=storage_backend, sampler=optuna_sampler
            )
        except KeyError:
            # The run stopped before its study was created (e.g. Ctrl-C while profiling).
            logger.info("no study %r in %s yet; creating it", study_name, storage)
    try:
        return optuna.create_study(
            study_name=study_name,
            storage=storage_backend,
            sampler=optuna_sampler,
            directions=DIRECTIONS,
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(
            f"study {study_name!r} already exists in {storage}; pass --resume to continue it or "
            "--name to start another"
        ) from None


def make_objective(
    strategy: Strategy,
    groups: HeadGroups,
    evaluator: WindowEvaluator,
    budget: float,
    study: optuna.Study,
) -> Callable[[optuna.Trial], tuple[float, float]]:
    """Build the objective ``trial -> (calibration perplexity, cost)``.

    Every trial is evaluated exactly, feasible or not, and records its windows, cost and KV
    fraction as user attributes. The budget enters as the constraint ``cost - budget <= 0``.
    A config that an earlier trial already evaluated reuses that perplexity, because the forward
    passes are deterministic, and records the earlier trial's number as ``reused_trial``.
    """
    evaluated: dict[tuple[int | None, ...], tuple[int, float]] = {}
    for trial in completed_trials(study):
        if "reused_trial" not in trial.user_attrs:
            key = tuple(trial.user_attrs["group_windows"])
            evaluated.setdefault(key, (trial.number, trial.values[0]))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        group_windows = seeded_windows(trial)
        if group_windows is None or strategy.seed_params(group_windows):
            # Seeds the strategy can express also go through suggest, so the sampler records their
            # params.
            group_windows = strategy.suggest(trial)
        windows = groups.expand(group_windows)
        cost, kv_fraction = evaluator.cost(windows)
        trial.set_user_attr("group_windows", group_windows)
        trial.set_user_attr("cost", cost)
        trial.set_user_attr("kv_fraction", kv_fraction)
        trial.set_constraint(BUDGET_CONSTRAINT, cost - budget)
        key = tuple(group_windows)
        if key in evaluated:
            number, perplexity = evaluated[key]
            trial.set_user_attr("reused_trial", number)
            return perplexity, cost
        perplexity = evaluator.perplexity(windows)
        evaluated[key] = (trial.number, perplexity)
        return perplexity, cost

    return objective


def uniform_seeds(
    candidates: Sequence[int | None], groups: HeadGroups, seq_len: int, sink_tokens: int
) -> list[tuple[str, list[int | None]]]:
    """Return ``(label, group windows)`` for every uniform-window config, cheapest first.

    Uniform windows are the baseline a per-head config has to beat (StreamingLLM-style local
    attention).
    """
    seeds = []
    for window in candidates:
        density = area_density(window, seq_len, sink_tokens)
        label = "uniform full" if window is None else f"uniform W={window} ({density:.2f})"
        seeds.append((label, [window] * groups.num_groups))
    return seeds


def enqueue_missing_seeds(
    study: optuna.Study, strategy: Strategy, seeds: Sequence[tuple[str, list[int | None]]]
) -> int:
    """Queue the seed configs that have neither finished nor been queued yet; return how many were queued.

    A seed whose trial was interrupted (Ctrl-C marks it failed) is queued again, so a resumed study
    still evaluates every baseline.
    """
    present = {
        trial.user_attrs.get(SEED_LABEL_ATTR)
        for trial in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING)
        )
    }
    missing = [(label, windows) for label, windows in seeds if label not in present]
    enqueue_seeds(study, strategy, missing)
    return len(missing)


def enqueue_seeds(
    study: optuna.Study, strategy: Strategy, seeds: Sequence[tuple[str, list[int | None]]]
) -> None:
    """Queue ``(label, group windows)`` configs to be evaluated before the sampler's own trials."""
    for label, group_windows in seeds:
        study.enqueue_trial(
            strategy.seed_params(group_windows),
            user_attrs={SEED_LABEL_ATTR: label, SEED_WINDOWS_ATTR: group_windows},
            skip_if_exists=False,
        )


def evaluated_configs(
    study: optuna.Study, dense_perplexity: float
) -> tuple[list[list[int | None]], list[float]]:
    """Return every config the study evaluated and its measured ``log(ppl / dense ppl)``."""
    configs: list[list[int | None]] = []
    increases: list[float] = []
    for trial in completed_trials(study):
        if "reused_trial" in trial.user_attrs:
            continue
        configs.append(list(trial.user_attrs["group_windows"]))
        increases.append(math.log(trial.values[0] / dense_perplexity))
    return configs, increases


def uniform_nll_increase(
    study: optuna.Study, candidates: Sequence[int | None], num_groups: int
) -> list[float] | None:
    """Return the measured NLL increase over full attention of each candidate's uniform config.

    Returns:
        ``[candidates]`` values of ``log(ppl(uniform c) / ppl(full))``, or None when some uniform config has
        not finished.
    """
    perplexities: dict[int | None, float] = {}
    for trial in completed_trials(study):
        windows = trial.user_attrs["group_windows"]
        if len(set(windows)) == 1 and len(windows) == num_groups:
            perplexities[windows[0]] = trial.values[0]
    if any(candidate not in perplexities for candidate in candidates):
        return None
    dense = perplexities[None]
    return [math.log(perplexities[candidate] / dense) for candidate in candidates]


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Return the study's finished trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], tuple[float, float]],
    *,
    total_trials: int,
    timeout: float | None,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    queued_only: bool = False,
) -> bool:
    """Run trials until the study contains ``total_trials`` finished ones, the timeout passes, or Ctrl-C.

    Args:
        queued_only: Stop once the queued (seed) trials are done, before the sampler proposes any.

    Returns:
        True when the loop was interrupted by Ctrl-C; every trial finished before that is kept.
    """
    if interrupts.stop_requested():
        return True
    remaining = total_trials - len(completed_trials(study))
    if queued_only:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        remaining = min(remaining, len(waiting))
    if remaining <= 0:
        logger.info("study already has %d finished trials", total_trials - remaining)
        return False

    def stop_on_request(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # A Ctrl-C deferred by interrupts.deferred() ends the loop after the trial that it hit.
        if interrupts.stop_requested():
            study.stop()

    try:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout,
            callbacks=[*callbacks, stop_on_request],
        )
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = interrupts.stop_requested()
    if interrupted:
        log_interrupted(study)
    return interrupted


def log_interrupted(study: optuna.Study) -> None:
    """Log that Ctrl-C stopped the search, with the number of finished trials it keeps."""
    logger.warning("interrupted; keeping %d finished trials", len(completed_trials(study)))
