"""Search strategies: how an Optuna trial becomes one window per head group."""

from __future__ import annotations

from typing import Any, Protocol

import optuna

from moa_search.search.groups import HeadGroups

# User attribute of an enqueued trial that fixes its group windows (uniform baselines, surrogate
# optima).
SEED_WINDOWS_ATTR = "seed_windows"
SEED_LABEL_ATTR = "seed"


class Strategy(Protocol):
    """Turns a trial into one window per group."""

    name: str

    def suggest(self, trial: optuna.Trial) -> list[int | None]:
        """Return one window per group (None = full attention) for this trial."""
        ...

    def seed_params(self, group_windows: list[int | None]) -> dict[str, Any]:
        """Return the parameters that reproduce ``group_windows``, or {} when the space cannot express it."""
        ...


def seeded_windows(trial: optuna.Trial) -> list[int | None] | None:
    """Return the group windows an enqueued seed trial fixes, or None for a sampled trial."""
    windows = trial.user_attrs.get(SEED_WINDOWS_ATTR)
    return None if windows is None else list(windows)


class DirectStrategy:
    """One integer parameter per group: the index of its window among the candidates.

    The index is ordinal (candidates ascend, full attention last), so TPE and GP can model that
    neighbouring windows behave alike.
    """

    name = "direct"

    def __init__(self, groups: HeadGroups, candidates: list[int | None]):
        self.groups = groups
        self.candidates = candidates

    def suggest(self, trial: optuna.Trial) -> list[int | None]:
        """Sample a candidate index per group."""
        last = len(self.candidates) - 1
        return [
            self.candidates[trial.suggest_int(self.groups.label(group), 0, last)]
            for group in range(self.groups.num_groups)
        ]

    def seed_params(self, group_windows: list[int | None]) -> dict[str, Any]:
        """Express fixed windows as candidate indices."""
        return {
            self.groups.label(group): self.candidates.index(window)
            for group, window in enumerate(group_windows)
        }
