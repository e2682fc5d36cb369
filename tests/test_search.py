"""Search internals: head groups, the objective's reuse of configs, seeds and the profile strategy."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

from moa_search.cli import app
from moa_search.cost import mean_area_density
from moa_search.models import ModelShape
from moa_search.pipeline import _run_fitted_rounds
from moa_search.profile import HeadProfile
from moa_search.search.groups import HeadGroups
from moa_search.search.profile_strategy import (
    PROPOSALS_PER_ROUND,
    ProfileStrategy,
    group_cost,
    group_loss,
    pick_by_hypervolume,
)
from moa_search.search.strategies import DirectStrategy
from moa_search.search.study import (
    DIRECTIONS,
    enqueue_missing_seeds,
    make_objective,
    run_trials,
    uniform_nll_increase,
    uniform_seeds,
)
from moa_search.space import Granularity

# A GQA model: 3 layers, 4 query heads, 2 KV heads.
SHAPE = ModelShape("toy", "ToyForCausalLM", 3, 4, 2, 256)
CANDIDATES: list[int | None] = [8, 32, 128, None]
SEQ_LEN = 256
SINK_TOKENS = 4


class CountingEvaluator:
    """Stands in for WindowEvaluator: perplexity grows as windows shrink, and calls are counted."""

    def __init__(self) -> None:
        self.calls = 0

    def cost(self, windows: list[list[int | None]]) -> tuple[float, float]:
        return mean_area_density(windows, [SEQ_LEN], SINK_TOKENS), 0.5

    def perplexity(self, windows: list[list[int | None]]) -> float:
        self.calls += 1
        flat = [SEQ_LEN if window is None else window for row in windows for window in row]
        return 4.0 + sum(1.0 / window for window in flat)


@pytest.fixture
def kv_groups() -> HeadGroups:
    return HeadGroups(SHAPE, Granularity.KV_HEAD)


def synthetic_profile(seed: int = 0) -> HeadProfile:
    """A profile whose estimates fall with the window, with noise; full attention is 0."""
    rng = np.random.default_rng(seed)
    base = np.array([0.05, 0.02, 0.005, 0.0])
    loss = base[None, None, :] * rng.uniform(0.2, 3.0, size=(3, 4, 1))
    loss[..., :3] += rng.normal(0.0, 0.001, size=(3, 4, 3))
    return HeadProfile(
        windows=tuple(CANDIDATES),
        sink_tokens=SINK_TOKENS,
        seq_len=SEQ_LEN,
        estimator="set",
        loss_increase=loss,
        dense_nll=1.5,
        supervised_tokens=None,
        num_sequences=2,
    )


def make_profile_strategy(groups: HeadGroups, budget: float = 0.5) -> ProfileStrategy:
    profile = synthetic_profile()
    return ProfileStrategy(
        groups,
        CANDIDATES,
        group_loss(profile, groups),
        group_cost(CANDIDATES, groups, [SEQ_LEN], SINK_TOKENS),
        budget,
    )


def test_groups_expand_kv_heads(kv_groups: HeadGroups) -> None:
    windows = kv_groups.expand([8, 32, 128, None, 8, 8])

    assert windows == [[8, 8, 32, 32], [128, 128, None, None], [8, 8, 8, 8]]
    assert kv_groups.label(3) == "L1.kv1"
    assert kv_groups.layer_of(3) == 1


def test_groups_expand_query_heads() -> None:
    groups = HeadGroups(SHAPE, Granularity.QUERY_HEAD)

    windows = groups.expand(list(range(1, 13)))

    assert groups.num_groups == 12
    assert windows[1] == [5, 6, 7, 8]
    assert groups.label(5) == "L1.q1"


def test_group_loss_sums_query_heads(kv_groups: HeadGroups) -> None:
    profile = synthetic_profile()

    loss = group_loss(profile, kv_groups)

    assert loss.shape == (6, 4)
    np.testing.assert_allclose(loss[3], profile.loss_increase[1, 2] + profile.loss_increase[1, 3])


def test_objective_reuses_evaluated_config(kv_groups: HeadGroups) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = DirectStrategy(kv_groups, CANDIDATES)
    evaluator = CountingEvaluator()
    seeds = uniform_seeds(CANDIDATES, kv_groups, SEQ_LEN, SINK_TOKENS)
    # The same uniform config queued twice under two labels.
    enqueue_missing_seeds(study, strategy, seeds + [("again", seeds[0][1])])
    objective = make_objective(strategy, kv_groups, evaluator, 0.5, study)

    run_trials(study, objective, total_trials=5, timeout=None)

    trials = study.get_trials()
    assert evaluator.calls == 4
    assert trials[4].user_attrs["reused_trial"] == 0
    assert trials[4].values == trials[0].values


def test_enqueue_missing_seeds_skips_present(kv_groups: HeadGroups) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = DirectStrategy(kv_groups, CANDIDATES)
    seeds = uniform_seeds(CANDIDATES, kv_groups, SEQ_LEN, SINK_TOKENS)

    first = enqueue_missing_seeds(study, strategy, seeds)
    second = enqueue_missing_seeds(study, strategy, seeds)

    assert first == len(CANDIDATES)
    assert second == 0


def test_enqueue_missing_seeds_requeues_failed(kv_groups: HeadGroups) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = DirectStrategy(kv_groups, CANDIDATES)
    seeds = uniform_seeds(CANDIDATES, kv_groups, SEQ_LEN, SINK_TOKENS)
    enqueue_missing_seeds(study, strategy, seeds[:1])

    def failing(trial: optuna.Trial) -> tuple[float, float]:
        raise RuntimeError("interrupted")

    study.optimize(failing, n_trials=1, catch=(RuntimeError,))

    assert enqueue_missing_seeds(study, strategy, seeds[:1]) == 1


def test_uniform_increase_needs_every_candidate(kv_groups: HeadGroups) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = DirectStrategy(kv_groups, CANDIDATES)
    evaluator = CountingEvaluator()
    enqueue_missing_seeds(study, strategy, uniform_seeds(CANDIDATES, kv_groups, SEQ_LEN, SINK_TOKENS))
    objective = make_objective(strategy, kv_groups, evaluator, 0.5, study)

    run_trials(study, objective, total_trials=2, timeout=None)
    partial = uniform_nll_increase(study, CANDIDATES, kv_groups.num_groups)
    run_trials(study, objective, total_trials=4, timeout=None)
    full = uniform_nll_increase(study, CANDIDATES, kv_groups.num_groups)

    assert partial is None
    assert full is not None
    assert full[-1] == 0.0
    assert full[0] > full[1] > full[2] > 0.0


def test_profile_decode_meets_target(kv_groups: HeadGroups) -> None:
    strategy = make_profile_strategy(kv_groups)

    for target in (0.1, 0.25, 0.5):
        windows = strategy.decode([0.0, 0.0, 0.0], 0.0, target)
        cost = mean_area_density(kv_groups.expand(windows), [SEQ_LEN], SINK_TOKENS)
        assert cost <= target + 1e-12


def test_profile_decode_follows_scales(kv_groups: HeadGroups) -> None:
    """Raising one layer's estimates moves budget to that layer."""
    strategy = make_profile_strategy(kv_groups)

    neutral = strategy.decode([0.0, 0.0, 0.0], 0.0, 0.25)
    boosted = strategy.decode([3.0, 0.0, 0.0], 0.0, 0.25)

    def layer_cost(windows: list[int | None], layer: int) -> float:
        expanded = kv_groups.expand(windows)[layer]
        return mean_area_density([expanded], [SEQ_LEN], SINK_TOKENS)

    assert layer_cost(boosted, 0) >= layer_cost(neutral, 0)


def test_profile_large_mix_gives_uniform(kv_groups: HeadGroups) -> None:
    """With the uniform term dominant and a target at a uniform config's cost, that config is optimal."""
    strategy = make_profile_strategy(kv_groups)
    strategy.set_uniform_increase([0.5, 0.2, 0.05, 0.0])
    target = mean_area_density(kv_groups.expand([32] * 6), [SEQ_LEN], SINK_TOKENS)

    windows = strategy.decode([0.0, 0.0, 0.0], 4.0, target)

    assert windows == [32] * 6


def test_profile_surrogate_seeds_within_budget(kv_groups: HeadGroups) -> None:
    strategy = make_profile_strategy(kv_groups, budget=0.4)
    strategy.set_uniform_increase([0.5, 0.2, 0.05, 0.0])

    seeds = strategy.surrogate_seeds()

    assert seeds
    assert len({tuple(windows) for _, windows in seeds}) == len(seeds)
    for label, windows in seeds:
        assert label.startswith("surrogate @ ")
        assert mean_area_density(kv_groups.expand(windows), [SEQ_LEN], SINK_TOKENS) <= 0.4 + 1e-12


def test_profile_suggest_uses_seeded_windows(kv_groups: HeadGroups) -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = make_profile_strategy(kv_groups)
    evaluator = CountingEvaluator()
    enqueue_missing_seeds(study, strategy, [("fixed", [8, 8, 32, 32, 128, None])])
    objective = make_objective(strategy, kv_groups, evaluator, 0.5, study)

    run_trials(study, objective, total_trials=3, timeout=None)

    trials = study.get_trials()
    assert trials[0].user_attrs["group_windows"] == [8, 8, 32, 32, 128, None]
    assert trials[0].params == {}
    expected = {"log2_scale.L0", "log2_scale.L1", "log2_scale.L2", "log2_mix", "budget_share"}
    assert set(trials[1].params) == expected
    assert trials[1].user_attrs["cost"] <= 0.5 + 1e-12


# End to end on the real model, through the CLI.

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def profile_run(
    tmp_path_factory: pytest.TempPathFactory, stories_path: Path, tinystories_path: Path
) -> Path:
    """A profile-strategy run of 16 trials on 128-token sequences."""
    output_dir = tmp_path_factory.mktemp("runs")
    result = runner.invoke(
        app,
        [
            "run", "--model", str(stories_path), "--dataset", str(tinystories_path),
            "--budget", "0.5", "--trials", "16", "--seq-len", "128", "--num-samples", "2",
            "--holdout", "1", "--batch-size", "2", "--output-dir", str(output_dir), "--name", "p",
        ],
    )
    assert result.exit_code == 0, result.output
    return output_dir / "p"


def load_study(folder: Path) -> optuna.Study:
    settings = json.loads((folder / "settings.json").read_text())
    return optuna.load_study(study_name=settings["study_name"], storage=settings["storage"])


def test_profile_run_writes_profile(profile_run: Path) -> None:
    profile = HeadProfile.from_file(profile_run / "profile.npz")

    assert profile.loss_increase.shape == (5, 8, 10)
    assert profile.windows[-1] is None
    assert json.loads((profile_run / "settings.json").read_text())["strategy"] == "profile"


def test_profile_run_seeds_surrogates(profile_run: Path) -> None:
    """Uniform baselines run first, then the knapsack optima, then sampled trials."""
    trials = load_study(profile_run).get_trials()
    labels = [trial.user_attrs.get("seed") for trial in trials]

    assert all(label.startswith("uniform") for label in labels[:10])
    assert any(label and label.startswith("surrogate") for label in labels[10:])
    assert len([trial for trial in trials if trial.state.is_finished()]) == 16


def test_profile_run_resume_reuses_profile(profile_run: Path) -> None:
    before = (profile_run / "profile.npz").stat().st_mtime_ns
    result = runner.invoke(
        app,
        [
            "run", "--model", str(json.loads((profile_run / "settings.json").read_text())["model"]),
            "--resume", "--name", "p", "--output-dir", str(profile_run.parent), "--trials", "18",
        ],
    )

    assert result.exit_code == 0, result.output
    assert (profile_run / "profile.npz").stat().st_mtime_ns == before
    finished = load_study(profile_run).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == 18


def test_profile_command_writes_file(tmp_path: Path, stories_path: Path, tinystories_path: Path) -> None:
    output = tmp_path / "profile.npz"

    result = runner.invoke(
        app,
        [
            "profile", "--model", str(stories_path), "--dataset", str(tinystories_path),
            "--seq-len", "64", "--num-samples", "2", "-o", str(output),
        ],
    )

    assert result.exit_code == 0, result.output
    profile = HeadProfile.from_file(output)
    assert profile.loss_increase.shape == (5, 8, 10)
    assert profile.num_sequences == 2
    assert "Smallest window" in result.stdout


def test_fitted_configs_extend_true_front(kv_groups: HeadGroups) -> None:
    """When only layer 2's windows raise the loss, the first proposal beats every evaluated config at its cost."""
    strategy = make_profile_strategy(kv_groups, budget=0.6)
    strategy.set_uniform_increase([0.5, 0.2, 0.05, 0.0])
    column = {window: index for index, window in enumerate(CANDIDATES)}
    uniform_share = strategy.uniform

    def true_increase(config: list[int | None]) -> float:
        return 10 * sum(uniform_share[column[window]] for window in config[4:])

    def config_cost(config: list[int | None]) -> float:
        return mean_area_density(kv_groups.expand(config), [SEQ_LEN], SINK_TOKENS)

    rng = np.random.default_rng(0)
    # The uniform baselines, as every study evaluates them first, then random configs.
    configs = [[window] * 6 for window in CANDIDATES]
    configs += [list(rng.choice(np.array(CANDIDATES, dtype=object), size=6)) for _ in range(40)]

    proposals = strategy.fitted_configs(configs, [true_increase(config) for config in configs])

    assert 0 < len(proposals) <= PROPOSALS_PER_ROUND
    assert all(label.startswith("fitted @ ") for label, _ in proposals)
    assert not {tuple(windows) for _, windows in proposals} & {tuple(config) for config in configs}
    for _, windows in proposals:
        assert config_cost(windows) <= 0.6 + 1e-12
    first = proposals[0][1]
    best_before = min(
        true_increase(config) for config in configs if config_cost(config) <= config_cost(first)
    )
    assert true_increase(first) < best_before


def test_pick_by_hypervolume_skips_dominated() -> None:
    measured = [(0.2, 0.5)]
    # Gains over the measured point: 0.1 * 0.1, then 0.5 * 0.3, then none (dominated).
    candidates = [(0.1, 0.9), (0.5, 0.2), (0.3, 0.6)]

    picked = pick_by_hypervolume(measured, candidates, (1.0, 1.0), count=3)

    assert picked == [1, 0]


def test_profile_run_has_fitted_round(profile_run: Path) -> None:
    labels = [trial.user_attrs.get("seed") for trial in load_study(profile_run).get_trials()]

    assert any(label and label.startswith("fitted @ ") for label in labels)


def test_fitted_configs_skip_infinite_increase(kv_groups: HeadGroups) -> None:
    """A config whose perplexity overflowed is left out of the fit and never proposed again."""
    strategy = make_profile_strategy(kv_groups)
    strategy.set_uniform_increase([0.4, 0.2, 0.05, 0.0])
    configs = [[window] * 6 for window in CANDIDATES]
    overflowed: list[int | None] = [8, 8, 8, 8, None, None]
    configs.append(overflowed)
    increases = [0.4, 0.2, 0.05, 0.0, math.inf]

    proposals = strategy.fitted_configs(configs, increases)

    assert proposals
    assert overflowed not in [windows for _, windows in proposals]


def profile_study_with_baselines(kv_groups: HeadGroups) -> tuple[optuna.Study, ProfileStrategy]:
    """Return a study whose uniform baselines finished, and a profile strategy set up with their increases."""
    study = optuna.create_study(directions=DIRECTIONS)
    strategy = make_profile_strategy(kv_groups)
    evaluator = CountingEvaluator()
    enqueue_missing_seeds(study, strategy, uniform_seeds(CANDIDATES, kv_groups, SEQ_LEN, SINK_TOKENS))
    objective = make_objective(strategy, kv_groups, evaluator, 0.5, study)
    run_trials(study, objective, total_trials=4, timeout=None)
    increase = uniform_nll_increase(study, CANDIDATES, kv_groups.num_groups)
    assert increase is not None
    strategy.set_uniform_increase(increase)
    return study, strategy


def test_fitted_rounds_stop_without_progress(kv_groups: HeadGroups) -> None:
    """When the timeout keeps the queued proposals from running, one round is queued, not endless ones."""
    study, strategy = profile_study_with_baselines(kv_groups)
    calls = []

    def run_nothing(queued_only: bool = False) -> bool:
        calls.append(queued_only)
        if len(calls) > 3:
            raise AssertionError("the fitted rounds kept going without finishing a trial")
        return False

    interrupted = _run_fitted_rounds(study, strategy, 1.0, 40, run_nothing, deadline=None)

    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert interrupted is False
    assert calls == [True]
    assert 0 < len(waiting) <= PROPOSALS_PER_ROUND


def test_fitted_rounds_stop_at_deadline(kv_groups: HeadGroups) -> None:
    study, strategy = profile_study_with_baselines(kv_groups)

    def run_unexpectedly(queued_only: bool = False) -> bool:
        raise AssertionError("a round ran after the deadline")

    interrupted = _run_fitted_rounds(
        study, strategy, 1.0, 40, run_unexpectedly, deadline=time.monotonic() - 1.0
    )

    assert interrupted is False
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
