"""Option types and defaults shared by the commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer

from moa_search.errors import ConfigError
from moa_search.search.samplers import SAMPLERS

SamplerName = Enum("SamplerName", {name: name for name in SAMPLERS}, type=str)  # type: ignore[misc]


class StrategyName(str, Enum):
    """Mapping from a trial to windows."""

    direct = "direct"
    profile = "profile"


class EstimatorName(str, Enum):
    """First-order estimators of a head's loss increase."""

    set = "set"
    additive = "additive"


class FrontFormat(str, Enum):
    """Output formats of the front."""

    table = "table"
    csv = "csv"
    json = "json"


DEFAULT_SEQ_LEN = 1024
DATA_PANEL = "Calibration data"
SEARCH_PANEL = "Search"
OUTPUT_PANEL = "Output"


# Options that select and cut the calibration text, shared by run and profile.
DatasetConfigOption = Annotated[
    str | None, typer.Option(help="Config name of a hub dataset.", rich_help_panel=DATA_PANEL)
]
SplitOption = Annotated[str, typer.Option(help="Dataset split.", rich_help_panel=DATA_PANEL)]
TextColumnOption = Annotated[
    str,
    typer.Option(help="Column holding the text in tabular data.", rich_help_panel=DATA_PANEL),
]
SeqLenOption = Annotated[
    int | None,
    typer.Option(
        min=2,
        help=f"Tokens per sequence \\[default: {DEFAULT_SEQ_LEN} or the model's positions].",
        rich_help_panel=DATA_PANEL,
    ),
]


def default_device() -> str:
    """Return cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """Return ``device`` if torch can use it; raise :class:`ConfigError` otherwise."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"invalid --device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} is not available: torch sees no CUDA GPU; use cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device!r} is not available on this machine; use cpu")
    return device


def check_output_file(path: Path) -> None:
    """Raise :class:`ConfigError` unless ``path`` can be written as a file in an existing folder."""
    if path.is_dir():
        raise ConfigError(f"--output {str(path)!r} is a folder; pass a file path")
    if not path.parent.is_dir():
        raise ConfigError(
            f"--output {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first"
        )
