"""The ``run`` pipeline: calibration data, dense reference, study, validation of the front."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
import torch

from moa_search.data import load_calibration_data
from moa_search.export import RunResults, load_run
from moa_search.front import pareto_front
from moa_search.models import load_model, model_shape
from moa_search.profile import HeadProfile, profile_heads
from moa_search.runs import PROFILE_FILE, RunFolder, RunSettings
from moa_search.search import interrupts
from moa_search.search.evaluator import WindowEvaluator
from moa_search.search.groups import HeadGroups
from moa_search.search.profile_strategy import ProfileStrategy, group_cost, group_loss
from moa_search.search.strategies import DirectStrategy, Strategy
from moa_search.search.study import (
    completed_trials,
    enqueue_missing_seeds,
    enqueue_seeds,
    evaluated_configs,
    log_interrupted,
    make_objective,
    open_study,
    run_trials,
    uniform_nll_increase,
    uniform_seeds,
)
from moa_search.span_config import ModelInfo

logger = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


@dataclass
class RunHooks:
    """Callbacks through which the CLI shows progress; the library itself never prints."""

    stage: Callable[[str], None] = lambda message: None
    profile_progress: Callable[[int, int], None] = lambda done, total: None
    trial_callbacks: Sequence[TrialCallback] = field(default_factory=tuple)
    validation_progress: Callable[[int, int], None] = lambda done, total: None


@dataclass
class RunOutcome:
    """Result of :func:`run_search`."""

    results: RunResults
    interrupted: bool


def model_info_of(model: torch.nn.Module, model_id: str) -> ModelInfo:
    """Describe a loaded model for settings and span configs."""
    shape = model_shape(model, model_id)
    return ModelInfo(**shape.to_dict())


def _load_data(settings: RunSettings, folder: RunFolder, tokenizer, resume: bool):
    if resume and folder.file("calibration.pt").is_file():
        stored = folder.read_data()
        return stored["calibration"], stored["holdout"], stored["provenance"]
    data = load_calibration_data(
        tokenizer,
        settings.dataset,
        seq_len=settings.seq_len,
        num_samples=settings.num_samples,
        holdout=settings.holdout,
        max_positions=settings.model_info.max_positions,
        dataset_config=settings.dataset_config,
        split=settings.split,
        text_column=settings.text_column,
    )
    provenance = data.provenance()
    folder.write_data(data.calibration, data.holdout, provenance)
    return data.calibration, data.holdout, provenance


def load_or_profile(
    settings: RunSettings,
    folder: RunFolder,
    model: torch.nn.Module,
    calibration: torch.Tensor,
    hooks: RunHooks,
) -> HeadProfile:
    """Return the run's head profile, computing and caching it in the run folder on first use."""
    path = folder.file(PROFILE_FILE)
    if path.is_file():
        profile = HeadProfile.from_file(path)
        if (
            list(profile.windows) == list(settings.candidates)
            and profile.estimator == settings.estimator
        ):
            logger.info("reusing the head profile in %s", path)
            return profile
    hooks.stage(f"profiling heads ({settings.estimator} estimator)")
    profile = profile_heads(
        model,
        calibration,
        settings.candidates,
        sink_tokens=settings.space.sink_tokens,
        estimator=settings.estimator,
        supervised_tokens=settings.supervised_tokens,
        batch_size=settings.batch_size,
        progress=hooks.profile_progress,
    )
    profile.to_file(path)
    return profile


def make_strategy(
    settings: RunSettings, groups: HeadGroups, profile: HeadProfile | None
) -> Strategy:
    """Build the search strategy named in the settings."""
    if settings.strategy == "direct" or profile is None:
        return DirectStrategy(groups, list(settings.candidates))
    return ProfileStrategy(
        groups,
        settings.candidates,
        group_loss(profile, groups),
        group_cost(settings.candidates, groups, settings.cost_lengths, settings.space.sink_tokens),
        settings.budget,
        settings.max_windows_per_layer,
    )


def run_search(
    settings: RunSettings,
    folder: RunFolder,
    *,
    resume: bool = False,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    hooks: RunHooks | None = None,
) -> RunOutcome:
    """Run (or resume) a search and validate its Pareto front on the held-out sequences.

    Args:
        settings: Resolved settings; written to the run folder before any trial runs.
        folder: The run folder; created when missing.
        resume: Continue the study stored for this run instead of creating one.
        model, tokenizer: An already loaded model, e.g. from tests; loaded from ``settings.model``
        when None.
    """
    hooks = hooks or RunHooks()
    created_folder = not folder.path.exists()
    try:
        return _run_search(settings, folder, resume, model, tokenizer, hooks)
    except BaseException:
        # A new run that stopped before its study had a trial leaves nothing worth resuming, so
        # its folder is removed. A run with finished trials keeps its folder.
        if created_folder and not _has_trials(settings):
            shutil.rmtree(folder.path, ignore_errors=True)
        raise


def _has_trials(settings: RunSettings) -> bool:
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    except Exception:  # no study yet, or no storage at all
        return False
    return len(study.get_trials(deepcopy=False)) > 0


def _run_search(
    settings: RunSettings,
    folder: RunFolder,
    resume: bool,
    model: torch.nn.Module | None,
    tokenizer,
    hooks: RunHooks,
) -> RunOutcome:
    if model is None:
        hooks.stage(f"loading {settings.model}")
        model, tokenizer = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    hooks.stage("preparing calibration data")
    calibration, holdout, provenance = _load_data(settings, folder, tokenizer, resume)
    folder.write_settings(settings)

    groups = HeadGroups(model_shape(model, settings.model), settings.space.granularity)
    sink_tokens = settings.space.sink_tokens
    evaluator = WindowEvaluator(
        model,
        calibration,
        num_kv_heads=groups.shape.num_kv_heads,
        sink_tokens=sink_tokens,
        cost_lengths=settings.cost_lengths,
        batch_size=settings.batch_size,
    )
    metrics = folder.read_metrics()
    if "dense_perplexity" not in metrics:
        hooks.stage("measuring dense perplexity")
        dense = groups.expand([None] * groups.num_groups)
        metrics = folder.update_metrics(
            dense_perplexity=evaluator.perplexity(dense), calibration=provenance
        )
    logger.info("dense calibration perplexity %.4f", metrics["dense_perplexity"])

    profile = None
    if settings.strategy == "profile":
        profile = load_or_profile(settings, folder, model, calibration, hooks)
    strategy = make_strategy(settings, groups, profile)
    study = open_study(
        study_name=settings.study_name,
        storage=settings.storage,
        sampler=settings.sampler,
        seed=settings.seed,
        resume=resume,
    )
    already = len(completed_trials(study))
    if resume and already >= settings.trials:
        logger.warning(
            "the run already has %d finished trials, --trials %d; "
            "pass a larger --trials to search on",
            already,
            settings.trials,
        )
    hooks.stage("searching")
    objective = make_objective(strategy, groups, evaluator, settings.budget, study)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout

    def run(queued_only: bool = False) -> bool:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return False
        return run_trials(
            study,
            objective,
            total_trials=settings.trials,
            timeout=timeout,
            callbacks=hooks.trial_callbacks,
            queued_only=queued_only,
        )

    enqueue_missing_seeds(
        study, strategy, uniform_seeds(settings.candidates, groups, settings.seq_len, sink_tokens)
    )
    interrupted = False
    with interrupts.deferred():
        if isinstance(strategy, ProfileStrategy):
            try:
                interrupted = _run_profile_seeds(study, strategy, settings, groups, run)
                if not interrupted:
                    interrupted = _run_fitted_rounds(
                        study,
                        strategy,
                        metrics["dense_perplexity"],
                        settings.trials,
                        run,
                        deadline,
                    )
            except KeyboardInterrupt:
                # Ctrl-C outside a trial loop, while the knapsack or the surrogate works.
                log_interrupted(study)
                interrupted = True
        if not interrupted:
            interrupted = run()
    finished = len(completed_trials(study))
    if not interrupted and deadline is not None and finished < settings.trials:
        logger.warning(
            "--timeout %g s reached after %d of %d trials; continue with --resume",
            settings.timeout,
            finished,
            settings.trials,
        )
    if holdout.shape[0] > 0:
        hooks.stage("validating the front on held-out sequences")
        try:
            validate_front(study, settings, groups, evaluator, holdout, folder, hooks)
        except KeyboardInterrupt:
            # Members measured so far are stored; --resume measures the rest.
            logger.warning("held-out validation interrupted")
            interrupted = True
    return RunOutcome(load_run(folder), interrupted)


def _run_profile_seeds(
    study: optuna.Study,
    strategy: ProfileStrategy,
    settings: RunSettings,
    groups: HeadGroups,
    run: Callable[..., bool],
) -> bool:
    """Run the uniform baselines, then the knapsack optima seeded from them.

    Returns:
        True when interrupted by Ctrl-C.
    """
    # The surrogate needs the measured uniform baselines, so they run before anything else.
    if run(queued_only=True):
        return True
    increase = uniform_nll_increase(study, settings.candidates, groups.num_groups)
    if increase is None:
        return False
    strategy.set_uniform_increase(increase)
    with interrupts.immediate():
        seeds = strategy.surrogate_seeds()
    enqueue_missing_seeds(study, strategy, seeds)
    return run(queued_only=True)


def _run_fitted_rounds(
    study: optuna.Study,
    strategy: ProfileStrategy,
    dense_perplexity: float,
    total_trials: int,
    run: Callable[..., bool],
    deadline: float | None,
) -> bool:
    """Refit the profile strategy to all exact evaluations and evaluate its new optima, round by round.

    Stops when a round proposes no config that was not evaluated yet, when the study has
    ``total_trials`` finished trials, when ``deadline`` (``time.monotonic()`` seconds) has passed,
    when a round finishes no trial, or on Ctrl-C. The sampler takes the trials left after that.

    Returns:
        True when interrupted by Ctrl-C.
    """
    if not strategy.uniform_measured:
        return False  # a baseline has not finished, so the surrogate has nothing to start from
    while len(completed_trials(study)) < total_trials:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        configs, increases = evaluated_configs(study, dense_perplexity)
        evaluated = {tuple(config) for config in configs}
        with interrupts.immediate():
            fitted = strategy.fitted_configs(configs, increases)
        proposals = [
            (label, windows) for label, windows in fitted if tuple(windows) not in evaluated
        ]
        if not proposals:
            return False
        finished = len(completed_trials(study))
        enqueue_seeds(study, strategy, proposals)
        if run(queued_only=True):
            return True
        if len(completed_trials(study)) == finished:
            return False  # the timeout passed before any proposal ran
    return False


def validate_front(
    study: optuna.Study,
    settings: RunSettings,
    groups: HeadGroups,
    evaluator: WindowEvaluator,
    holdout: torch.Tensor,
    folder: RunFolder,
    hooks: RunHooks,
) -> None:
    """Measure the held-out perplexity of dense attention and of every front member not measured yet."""
    metrics = folder.read_metrics()
    measured: dict[str, float] = dict(metrics.get("holdout", {}))
    members = [m for m in pareto_front(study, settings.budget) if str(m.trial) not in measured]
    total = len(members) + ("dense_holdout_perplexity" not in metrics)
    done = 0
    if "dense_holdout_perplexity" not in metrics:
        dense = groups.expand([None] * groups.num_groups)
        folder.update_metrics(dense_holdout_perplexity=evaluator.perplexity(dense, holdout))
        done += 1
        hooks.validation_progress(done, total)
    for member in members:
        measured[str(member.trial)] = evaluator.perplexity(
            groups.expand(member.group_windows), holdout
        )
        folder.update_metrics(holdout=measured)
        done += 1
        hooks.validation_progress(done, total)
