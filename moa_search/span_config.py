"""The span config: the exported per-head windows, its JSON schema, and applying it to a model."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from moa_search.attention import apply_windows
from moa_search.cost import kv_windows
from moa_search.errors import ConfigError
from moa_search.masks import FULL_WINDOW, WINDOW_CONVENTION
from moa_search.models import model_shape
from moa_search.space import Granularity

SCHEMA_NAME = "moa-search/span-config"
SCHEMA_VERSION = 1


class ModelInfo(BaseModel):
    """The model a span config was searched for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    architecture: str
    num_layers: int = Field(ge=1)
    num_query_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    max_positions: int | None = None


class SpanMetrics(BaseModel):
    """Measured quality and modelled cost of one config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    perplexity: float
    dense_perplexity: float
    holdout_perplexity: float | None = None
    dense_holdout_perplexity: float | None = None
    cost: float = Field(
        description="mean visible (query, key) pairs relative to dense causal attention"
    )
    kv_fraction: float = Field(description="mean share of the KV cache kept per (layer, KV head)")
    cost_lengths: list[int] = Field(
        description="sequence lengths the cost and KV fraction are averaged over"
    )


class SpanConfig(BaseModel):
    """Per-head windows for one model, in the versioned schema ``moa-search/span-config`` v1.

    ``windows[layer][query_head]`` is a window under ``convention`` (null = full attention);
    ``kv_windows[layer][kv_head]`` is the largest window among the query heads of each KV head, which is what a
    runtime must keep in its KV cache.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_name: Literal["moa-search/span-config"] = Field(default=SCHEMA_NAME, alias="schema")
    schema_version: Literal[1] = SCHEMA_VERSION
    convention: str
    model: ModelInfo
    granularity: Granularity
    sink_tokens: int = Field(ge=0)
    windows: list[list[StrictInt | None]]
    kv_windows: list[list[StrictInt | None]]
    metrics: SpanMetrics | None = None
    calibration: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_consistency(self) -> SpanConfig:
        if self.convention != WINDOW_CONVENTION:
            raise ValueError(
                "convention text differs from this version's window convention; the windows would be "
                "read with a different meaning"
            )
        layers, heads = self.model.num_layers, self.model.num_query_heads
        if heads % self.model.num_kv_heads:
            raise ValueError(
                f"{heads} query heads do not split over {self.model.num_kv_heads} KV heads"
            )
        if len(self.windows) != layers or any(len(row) != heads for row in self.windows):
            raise ValueError(f"windows must be {layers} layers x {heads} query heads")
        for row in self.windows:
            for window in row:
                if window is not None and not 1 <= window < FULL_WINDOW:
                    raise ValueError(
                        f"window {window} must be a whole number from 1 to 2**62 or null"
                    )
        if self.kv_windows != kv_windows(self.windows, self.model.num_kv_heads):
            raise ValueError("kv_windows must be the largest window of each KV head's query heads")
        if self.granularity is Granularity.KV_HEAD:
            group = heads // self.model.num_kv_heads
            for layer, row in enumerate(self.windows):
                for start in range(0, heads, group):
                    if len(set(row[start : start + group])) > 1:
                        raise ValueError(
                            f"granularity kv_head but layer {layer} query heads {start}..{start + group - 1} "
                            "have different windows"
                        )
        return self


def build_span_config(
    *,
    model: ModelInfo,
    granularity: Granularity,
    sink_tokens: int,
    windows: list[list[int | None]],
    metrics: SpanMetrics | None = None,
    calibration: dict[str, Any] | None = None,
    search: dict[str, Any] | None = None,
) -> SpanConfig:
    """Build a validated span config; ``kv_windows`` is derived from ``windows``."""
    try:
        return SpanConfig(
            convention=WINDOW_CONVENTION,
            model=model,
            granularity=granularity,
            sink_tokens=sink_tokens,
            windows=windows,
            kv_windows=kv_windows(windows, model.num_kv_heads),
            metrics=metrics,
            calibration=calibration or {},
            search=search or {},
        )
    except ValidationError as error:
        raise ConfigError(f"invalid span config: {_first_error(error)}") from error


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


# A JSON array of numbers and nulls, as json.dumps(indent=2) spreads it over lines.
_SCALAR_ARRAY = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def span_config_json(config: SpanConfig) -> str:
    """Serialise a span config to the JSON text that :func:`save_span_config` writes.

    Rows of windows stay on one line each, so a 32-layer config reads as 32 lines.
    """
    text = json.dumps(config.model_dump(mode="json", by_alias=True), indent=2)
    text = _SCALAR_ARRAY.sub(lambda match: "[" + re.sub(r"\s+", " ", match.group(1)) + "]", text)
    return text + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a failed write leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file as 0600; give it the permissions an ordinary new file would get.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_span_config(config: SpanConfig, path: str | Path) -> Path:
    """Write a span config as JSON; the file appears whole or not at all."""
    target = Path(path)
    write_text_atomic(target, span_config_json(config))
    return target


def load_span_config(path: str | Path) -> SpanConfig:
    """Read and validate a span config JSON file.

    Raises:
        ConfigError: when the file is missing, not JSON, or does not match the schema.
    """
    source = Path(path)
    try:
        raw = json.loads(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"span config {str(source)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"span config {str(source)!r} is not valid JSON: {error}") from error
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ConfigError(
            f"span config {str(source)!r} has schema_version {raw.get('schema_version')!r}; "
            f"this version of moa-search reads version {SCHEMA_VERSION}"
        )
    try:
        return SpanConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(
            f"span config {str(source)!r} is invalid: {_first_error(error)}"
        ) from error


def apply_span_config(model: torch.nn.Module, config: SpanConfig | str | Path) -> SpanConfig:
    """Apply a span config's windows to a loaded transformers model.

    Args:
        model: The model to modify in place; its layer and head counts must match the config.
        config: A :class:`SpanConfig` or the path of a span config JSON file.

    Returns:
        The applied config.

    Raises:
        ConfigError: when the config's layer or head counts differ from the model's.
        UnsupportedModelError: when the model's attention cannot be windowed per head.
    """
    span = config if isinstance(config, SpanConfig) else load_span_config(config)
    shape = model_shape(model)
    expected = (span.model.num_layers, span.model.num_query_heads, span.model.num_kv_heads)
    actual = (shape.num_layers, shape.num_query_heads, shape.num_kv_heads)
    if expected != actual:
        raise ConfigError(
            f"span config is for {expected[0]} layers x {expected[1]} query heads x {expected[2]} KV heads "
            f"({span.model.id}), but the model has {actual[0]} x {actual[1]} x {actual[2]}"
        )
    apply_windows(model, span.windows, span.sink_tokens)
    return span
