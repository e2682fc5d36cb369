"""Option types and defaults shared by the commands."""

from __future__ import annotations

from enum import Enum

import torch

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


def default_device() -> str:
    """Return cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"
