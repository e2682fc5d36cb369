"""Run folders: the resolved settings, calibration tokens, study storage and results of one search."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moa_search.errors import RunFolderError
from moa_search.space import SearchSpace
from moa_search.span_config import ModelInfo, write_text_atomic

SETTINGS_FILE = "settings.json"
DATA_FILE = "calibration.pt"
METRICS_FILE = "metrics.json"
PROFILE_FILE = "profile.npz"
STUDY_FILE = "study.db"

Sampler = Literal["tpe", "nsga2", "nsga3", "gp", "random"]
Strategy = Literal["direct", "profile"]
Estimator = Literal["set", "additive"]


class RunSettings(BaseModel):
    """Everything that defines a search, resolved and written to ``settings.json`` when the run starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    dataset: str
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    seq_len: int = Field(ge=2)
    num_samples: int = Field(ge=1)
    holdout: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    budget: float = Field(gt=0, le=1)
    trials: int = Field(ge=1)
    timeout: float | None = None
    seed: int = 0
    sampler: Sampler = "tpe"
    strategy: Strategy = "profile"
    estimator: Estimator = "set"
    supervised_tokens: int | None = Field(default=None, ge=1)
    max_windows_per_layer: int | None = Field(default=None, ge=1)
    space: SearchSpace
    candidates: list[int | None]
    cost_lengths: list[int]
    storage: str
    study_name: str
    model_info: ModelInfo


def default_run_name(model: str) -> str:
    """Derive a run name from the model's last path part and the local time, e.g. ``stories260K-20261204-2105``."""
    stem = Path(model.rstrip("/")).name or "model"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "model"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunFolder:
    """The files of one run under ``<output_dir>/<name>/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        """The run's folder name."""
        return self.path.name

    def file(self, name: str) -> Path:
        """Return the path of a file inside the run folder."""
        return self.path / name

    def default_storage(self) -> str:
        """Return the SQLite storage URL of the study file inside the folder."""
        return f"sqlite:///{self.file(STUDY_FILE).resolve()}"

    def exists(self) -> bool:
        """Return whether a run was started in this folder, i.e. its settings were written."""
        return self.file(SETTINGS_FILE).is_file()

    def write_settings(self, settings: RunSettings) -> None:
        """Write ``settings.json``."""
        write_text_atomic(self.file(SETTINGS_FILE), settings.model_dump_json(indent=2) + "\n")

    def read_settings(self) -> RunSettings:
        """Read ``settings.json``.

        Raises:
            RunFolderError: when the folder contains no run or its settings are unreadable.
        """
        path = self.file(SETTINGS_FILE)
        if not path.is_file():
            raise RunFolderError(
                f"{str(self.path)!r} is not a run folder (no {SETTINGS_FILE}); pass the folder that "
                "'moa-search run' created, e.g. results/<run-name>"
            )
        try:
            return RunSettings.model_validate_json(path.read_text())
        except ValidationError as error:
            raise RunFolderError(
                f"{str(path)!r} is invalid: {error.errors()[0]['msg']}"
            ) from error

    def write_data(
        self, calibration: torch.Tensor, holdout: torch.Tensor, provenance: dict
    ) -> None:
        """Store the packed calibration and held-out token ids, so later commands evaluate the same tokens."""
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.file(DATA_FILE + ".tmp")
        torch.save(
            {"calibration": calibration, "holdout": holdout, "provenance": provenance}, temporary
        )
        temporary.replace(self.file(DATA_FILE))

    def read_data(self) -> dict[str, Any]:
        """Load what :meth:`write_data` stored."""
        path = self.file(DATA_FILE)
        if not path.is_file():
            raise RunFolderError(
                f"run folder {str(self.path)!r} has no {DATA_FILE}; start the run again"
            )
        return torch.load(path, weights_only=True)

    def read_metrics(self) -> dict[str, Any]:
        """Read ``metrics.json`` (dense perplexities and held-out results); empty when not written yet."""
        path = self.file(METRICS_FILE)
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_metrics(self, **values: Any) -> dict[str, Any]:
        """Merge ``values`` into ``metrics.json`` and return the new content."""
        metrics = self.read_metrics()
        metrics.update(values)
        write_text_atomic(
            self.file(METRICS_FILE), json.dumps(metrics, indent=2, sort_keys=True) + "\n"
        )
        return metrics


def open_run(run: str | Path, output_dir: str | Path = "results") -> RunFolder:
    """Find an existing run by folder path or by name under ``output_dir``."""
    direct = RunFolder(run)
    if direct.exists():
        return direct
    named = RunFolder(Path(output_dir) / str(run))
    if named.exists():
        return named
    places = {str(direct.path), str(named.path)}
    raise RunFolderError(
        f"run {str(run)!r} not found: no {SETTINGS_FILE} in {' or '.join(sorted(places))}; pass a run "
        f"folder, or a run name with the --output-dir it was written to (now {str(output_dir)!r})"
    )
