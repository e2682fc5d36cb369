"""Search spaces: candidate windows, sink tokens and search granularity, read from YAML files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moa_search.errors import ConfigError

# Built-in spaces live in the repository's top-level search_spaces/ folder.
BUILTIN_SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
DEFAULT_SPACE = "default"


class Granularity(str, Enum):
    """Unit that shares one searched window."""

    KV_HEAD = (
        "kv_head"  # query heads of one KV head share a window, so the KV cache really shrinks
    )
    QUERY_HEAD = "query_head"  # every query head has its own window


class SearchSpace(BaseModel):
    """Candidate windows of one search.

    ``windows`` are absolute token counts (or ``full``); ``fractions`` are shares of the calibration length,
    rounded to whole tokens when the space is resolved. Full attention is always a candidate.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    windows: list[int | str] = Field(default_factory=list)
    fractions: list[float] = Field(default_factory=list)
    sink_tokens: int = Field(default=4, ge=0)
    granularity: Granularity = Granularity.KV_HEAD

    @field_validator("windows")
    @classmethod
    def _check_windows(cls, windows: list[int | str]) -> list[int | str]:
        for window in windows:
            if window == "full":
                continue
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ValueError(f"window {window!r} must be a whole number >= 1 or 'full'")
        return windows

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, fractions: list[float]) -> list[float]:
        for fraction in fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"fraction {fraction!r} must be in (0, 1]")
        return fractions

    def candidates(self, seq_len: int) -> tuple[int | None, ...]:
        """Resolve the candidate windows for sequences of ``seq_len`` tokens.

        Returns:
            Distinct windows in ascending order, each below ``seq_len``, then None (full attention)
            last. Windows of ``seq_len`` tokens or more are full attention and collapse into None.
        """
        tokens = {w for w in self.windows if isinstance(w, int)}
        tokens |= {max(1, round(f * seq_len)) for f in self.fractions}
        return (*sorted(w for w in tokens if w < seq_len), None)


def _space_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"search space file {name_or_path!r} does not exist")
        return path
    candidate = BUILTIN_SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(builtin_space_names()) or "none installed"
        raise ConfigError(
            f"unknown search space {name_or_path!r}: use a built-in name ({known}) or a path to a YAML file"
        )
    return candidate


def builtin_space_names() -> list[str]:
    """Return the names of the spaces shipped in ``search_spaces/``."""
    if not BUILTIN_SPACES_DIR.is_dir():
        return []
    return sorted(path.stem for path in BUILTIN_SPACES_DIR.glob("*.yaml"))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Describe a YAML parse error in one line, because the CLI prints errors as one line."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def load_space(name_or_path: str = DEFAULT_SPACE) -> SearchSpace:
    """Load a built-in space by name, or a space from a YAML file path."""
    path = _space_path(name_or_path)
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(
            f"search space {str(path)!r} is not valid YAML: {_yaml_problem(error)}"
        ) from error
    if not isinstance(raw, dict):
        raise ConfigError(
            f"search space {str(path)!r} must be a YAML mapping, got {type(raw).__name__}"
        )
    raw.setdefault("name", path.stem)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(
            f"search space {str(path)!r} is invalid at {where}: {first['msg']}"
        ) from error
    if not space.windows and not space.fractions:
        raise ConfigError(f"search space {str(path)!r} lists no windows and no fractions")
    return space
