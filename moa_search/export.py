"""Span configs from finished runs: one trial, the recommended member, or the whole front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from moa_search import __version__
from moa_search.errors import RunFolderError
from moa_search.front import FrontMember, pareto_front, recommended_member, with_holdout
from moa_search.models import ModelShape
from moa_search.runs import RunFolder, RunSettings
from moa_search.search.groups import HeadGroups
from moa_search.search.study import completed_trials
from moa_search.span_config import SpanConfig, SpanMetrics, build_span_config


@dataclass
class RunResults:
    """A finished (or interrupted) run read back from its folder."""

    folder: RunFolder
    settings: RunSettings
    study: optuna.Study
    metrics: dict[str, Any]

    @property
    def groups(self) -> HeadGroups:
        """The head groups the run searched over."""
        info = self.settings.model_info
        shape = ModelShape(
            model_id=info.id,
            architecture=info.architecture,
            num_layers=info.num_layers,
            num_query_heads=info.num_query_heads,
            num_kv_heads=info.num_kv_heads,
            max_positions=info.max_positions,
        )
        return HeadGroups(shape, self.settings.space.granularity)

    def front(self) -> list[FrontMember]:
        """Return the Pareto front, with held-out perplexities where the run measured them."""
        members = pareto_front(self.study, self.settings.budget)
        return with_holdout(members, self.metrics.get("holdout", {}))


def load_run(folder: RunFolder) -> RunResults:
    """Read a run's settings, study and metrics.

    Raises:
        RunFolderError: when the folder has no settings or its study cannot be found in the
        storage.
    """
    settings = folder.read_settings()
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    except KeyError:
        raise RunFolderError(
            f"study {settings.study_name!r} not found in {settings.storage}; the run may not have started"
        ) from None
    return RunResults(folder, settings, study, folder.read_metrics())


def span_config_for_trial(run: RunResults, trial_number: int) -> SpanConfig:
    """Build the span config of one finished trial, with its metrics and provenance.

    Raises:
        RunFolderError: when the trial does not exist or did not finish.
    """
    finished = {trial.number: trial for trial in completed_trials(run.study)}
    if trial_number not in finished:
        numbers = sorted(finished)
        span = f"{numbers[0]}..{numbers[-1]}" if numbers else "none"
        raise RunFolderError(
            f"trial {trial_number} is not a finished trial of run {run.folder.name!r} "
            f"(finished trials: {span}); see 'moa-search front {run.folder.path}'"
        )
    trial = finished[trial_number]
    settings = run.settings
    groups = run.groups
    holdout = run.metrics.get("holdout", {}).get(str(trial_number))
    metrics = SpanMetrics(
        perplexity=trial.values[0],
        dense_perplexity=run.metrics["dense_perplexity"],
        holdout_perplexity=holdout,
        dense_holdout_perplexity=run.metrics.get("dense_holdout_perplexity"),
        cost=trial.values[1],
        kv_fraction=trial.user_attrs["kv_fraction"],
        cost_lengths=settings.cost_lengths,
    )
    return build_span_config(
        model=settings.model_info,
        granularity=settings.space.granularity,
        sink_tokens=settings.space.sink_tokens,
        windows=groups.expand(list(trial.user_attrs["group_windows"])),
        metrics=metrics,
        calibration=run.metrics.get("calibration", {}),
        search={
            "run": run.folder.name,
            "study": settings.study_name,
            "trial": trial_number,
            "sampler": settings.sampler,
            "strategy": settings.strategy,
            "seed": settings.seed,
            "budget": settings.budget,
            "space": settings.space.name,
            "moa_search_version": __version__,
        },
    )


def recommended_trial(run: RunResults) -> int:
    """Return the trial number of the recommended front member.

    Raises:
        RunFolderError: when no finished trial is within the budget.
    """
    member = recommended_member(run.front())
    if member is None:
        raise RunFolderError(
            f"run {run.folder.name!r} has no finished trial within its budget {run.settings.budget}; "
            "pass --trial N to export a trial above the budget"
        )
    return member.trial
