"""Ctrl-C during a search: deferred between storage writes, immediate inside computation."""

from __future__ import annotations

import signal

import optuna
import pytest

from moa_search.search import interrupts
from moa_search.search.study import DIRECTIONS, run_trials


def press_ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)


def test_deferred_records_request() -> None:
    with interrupts.deferred():
        press_ctrl_c()
        requested = interrupts.stop_requested()

    assert requested
    assert not interrupts.stop_requested()


def test_immediate_raises_inside_deferred() -> None:
    with interrupts.deferred(), pytest.raises(KeyboardInterrupt), interrupts.immediate():
        press_ctrl_c()


def test_second_ctrl_c_raises() -> None:
    with interrupts.deferred():
        press_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            press_ctrl_c()


def test_immediate_raises_on_pending_request() -> None:
    with interrupts.deferred():
        press_ctrl_c()
        with pytest.raises(KeyboardInterrupt), interrupts.immediate():
            pass


def test_default_handler_restored() -> None:
    with interrupts.deferred():
        pass

    with pytest.raises(KeyboardInterrupt):
        press_ctrl_c()


def objective(trial: optuna.Trial) -> tuple[float, float]:
    value = trial.suggest_float("x", 0.0, 1.0)
    with interrupts.immediate():
        return value, 1.0 - value


def test_run_trials_stops_after_deferred_request() -> None:
    """Ctrl-C between trials (here in a callback) ends the loop after that trial, which finishes."""
    study = optuna.create_study(directions=DIRECTIONS)

    def ctrl_c_after_second(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 1:
            press_ctrl_c()

    with interrupts.deferred():
        interrupted = run_trials(
            study, objective, total_trials=10, timeout=None, callbacks=[ctrl_c_after_second]
        )

    states = [trial.state for trial in study.get_trials()]
    assert interrupted is True
    assert states == [optuna.trial.TrialState.COMPLETE] * 2


def test_run_trials_fails_interrupted_evaluation() -> None:
    """Ctrl-C inside an evaluation stops it at once; the trial is marked failed, not left running."""
    study = optuna.create_study(directions=DIRECTIONS)

    def interrupted_objective(trial: optuna.Trial) -> tuple[float, float]:
        if trial.number == 2:
            with interrupts.immediate():
                press_ctrl_c()
        return objective(trial)

    with interrupts.deferred():
        interrupted = run_trials(study, interrupted_objective, total_trials=10, timeout=None)

    states = [trial.state for trial in study.get_trials()]
    assert interrupted is True
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
