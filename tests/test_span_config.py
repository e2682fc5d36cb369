"""Unit tests of span configs: schema checks, JSON round trip, atomic writes and applying them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moa_search import ConfigError, apply_span_config, apply_windows, load_span_config
from moa_search.masks import WINDOW_CONVENTION
from moa_search.models import model_shape
from moa_search.space import Granularity
from moa_search.span_config import (
    ModelInfo,
    SpanConfig,
    SpanMetrics,
    build_span_config,
    save_span_config,
    span_config_json,
)

# 2 layers, 4 query heads over 2 KV heads: query heads 0-1 read KV head 0, heads 2-3 KV head 1.
MODEL = ModelInfo(
    id="tiny",
    architecture="Qwen2ForCausalLM",
    num_layers=2,
    num_query_heads=4,
    num_kv_heads=2,
    max_positions=128,
)
KV_HEAD_WINDOWS: list[list[int | None]] = [[8, 8, None, None], [16, 16, 4, 4]]
QUERY_HEAD_WINDOWS: list[list[int | None]] = [[2, 8, None, 4], [16, 3, 5, 5]]
METRICS = SpanMetrics(
    perplexity=5.25,
    dense_perplexity=5.0,
    holdout_perplexity=5.5,
    dense_holdout_perplexity=5.125,
    cost=0.375,
    kv_fraction=0.25,
    cost_lengths=[64, 128],
)


def build(
    windows: list[list[int | None]] = KV_HEAD_WINDOWS,
    granularity: Granularity = Granularity.KV_HEAD,
    model: ModelInfo = MODEL,
) -> SpanConfig:
    return build_span_config(
        model=model,
        granularity=granularity,
        sink_tokens=2,
        windows=windows,
        metrics=METRICS,
        calibration={"source": "stories.txt", "seq_len": 64, "token_ids_sha256": "ab" * 32},
        search={"run": "tiny-run", "trial": 7, "sampler": "tpe"},
    )


def raw_config(**changes: Any) -> dict[str, Any]:
    """Return the JSON dict of a valid config with top-level fields replaced."""
    raw = json.loads(span_config_json(build()))
    raw.update(changes)
    return raw


def write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content))
    return path


# --- building and validation ---------------------------------------------------------------------


def test_build_derives_kv_windows() -> None:
    config = build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD)

    # Each KV head keeps the largest window of its two query heads; full attention (None) wins.
    assert config.kv_windows == [[8, None], [16, 5]]


def test_build_fills_fixed_fields() -> None:
    config = build()

    assert config.schema_name == "moa-search/span-config"
    assert config.schema_version == 1
    assert config.convention == WINDOW_CONVENTION
    assert config.granularity is Granularity.KV_HEAD


def test_kv_head_rejects_split_group() -> None:
    # Query heads 0 and 1 share KV head 0 but get different windows.
    windows: list[list[int | None]] = [[8, 16, None, None], [4, 4, 4, 4]]

    with pytest.raises(ConfigError, match=r"layer 0 query heads 0\.\.1 have different windows"):
        build(windows, Granularity.KV_HEAD)


def test_query_head_accepts_split_group() -> None:
    config = build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD)

    assert config.windows == QUERY_HEAD_WINDOWS


@pytest.mark.parametrize(
    ("windows", "match"),
    [
        # One layer too few.
        ([[8, 8, 8, 8]], "2 layers x 4 query heads"),
        # One layer too many.
        ([[8, 8, 8, 8]] * 3, "2 layers x 4 query heads"),
        # A row with 3 heads.
        ([[8, 8, 8, 8], [8, 8, 8]], "2 layers x 4 query heads"),
        # Window 0 would hide every key, even the query's own position.
        ([[0, 0, 8, 8], [8, 8, 8, 8]], r"window 0 must be a whole number from 1 to 2\*\*62"),
        # Negative windows are as invalid as 0.
        ([[-4, -4, 8, 8], [8, 8, 8, 8]], r"window -4 must be a whole number from 1"),
        # Beyond the full-window marker, a window would overflow int64.
        ([[10**30] * 4, [8, 8, 8, 8]], r"must be a whole number from 1 to 2\*\*62"),
        # A boolean is not a window, even though Python treats True as 1.
        ([[True, True, 8, 8], [8, 8, 8, 8]], r"valid integer"),
    ],
)
def test_build_rejects_bad_windows(windows: list[list[int | None]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(windows, Granularity.QUERY_HEAD)


def test_build_rejects_uneven_kv_split() -> None:
    model = MODEL.model_copy(update={"num_kv_heads": 3})

    with pytest.raises(ConfigError, match="4 query heads do not split over 3 KV heads"):
        build(model=model)


def test_load_rejects_wrong_kv_windows(tmp_path: Path) -> None:
    path = write_json(tmp_path / "spans.json", raw_config(kv_windows=[[8, 8], [16, 4]]))

    with pytest.raises(ConfigError, match="kv_windows must be the largest window"):
        load_span_config(path)


def test_load_rejects_unknown_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "spans.json", raw_config(windows_extra=[]))

    with pytest.raises(ConfigError, match="windows_extra"):
        load_span_config(path)


def test_load_rejects_edited_convention(tmp_path: Path) -> None:
    convention = WINDOW_CONVENTION.replace("i - j < window", "i - j <= window")
    assert convention != WINDOW_CONVENTION
    path = write_json(tmp_path / "spans.json", raw_config(convention=convention))

    with pytest.raises(ConfigError, match="convention text differs"):
        load_span_config(path)


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_load_rejects_other_schema_version(tmp_path: Path, version: Any) -> None:
    path = write_json(tmp_path / "spans.json", raw_config(schema_version=version))

    with pytest.raises(ConfigError, match="schema_version"):
        load_span_config(path)


def test_load_rejects_other_schema_name(tmp_path: Path) -> None:
    path = write_json(tmp_path / "spans.json", raw_config(schema="someone-else/spans"))

    with pytest.raises(ConfigError, match="schema"):
        load_span_config(path)


def test_load_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_span_config(tmp_path / "absent.json")


def test_load_invalid_json_fails(tmp_path: Path) -> None:
    path = tmp_path / "spans.json"
    path.write_text('{"schema": ')

    with pytest.raises(ConfigError, match="not valid JSON"):
        load_span_config(path)


# --- saving --------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD)
    path = save_span_config(config, tmp_path / "nested" / "spans.json")

    loaded = load_span_config(path)

    assert loaded == config
    assert json.loads(path.read_text()) == json.loads(span_config_json(loaded))
    assert span_config_json(loaded) == path.read_text()


def test_json_keeps_windows_rows_on_one_line(tmp_path: Path) -> None:
    path = save_span_config(build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD), tmp_path / "s.json")
    lines = path.read_text().splitlines()

    assert "    [2, 8, null, 4]," in lines
    assert "    [16, 3, 5, 5]" in lines
    assert "    [8, null]," in lines
    assert '  "windows": [' in lines
    assert '    "cost_lengths": [64, 128]' in lines


def test_json_uses_schema_alias() -> None:
    raw = json.loads(span_config_json(build()))

    assert raw["schema"] == "moa-search/span-config"
    assert "schema_name" not in raw
    assert list(raw)[:3] == ["schema", "schema_version", "convention"]


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_replace(source: Any, target: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)

    with pytest.raises(OSError, match="disk full"):
        save_span_config(build(), tmp_path / "spans.json")

    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_span_config(build(), tmp_path / "spans.json")
    before = path.read_text()

    def fail_replace(source: Any, target: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)

    with pytest.raises(OSError):
        save_span_config(build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD), path)

    assert path.read_text() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["spans.json"]


# --- applying ------------------------------------------------------------------------------------


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Random ids ``[2, 40]``, longer than every window in QUERY_HEAD_WINDOWS."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (2, 40), generator=generator)


def test_apply_matches_apply_windows(
    tiny_qwen2_f64: Callable[[], torch.nn.Module], input_ids: torch.Tensor, tmp_path: Path
) -> None:
    dense = tiny_qwen2_f64()
    from_config = tiny_qwen2_f64()
    direct = tiny_qwen2_f64()
    info = ModelInfo(**model_shape(from_config).to_dict())
    config = build(QUERY_HEAD_WINDOWS, Granularity.QUERY_HEAD, model=info)
    path = save_span_config(config, tmp_path / "spans.json")

    applied = apply_span_config(from_config, path)
    apply_windows(direct, QUERY_HEAD_WINDOWS, sink_tokens=2)

    assert applied == config
    windowed_logits = logits_of(from_config, input_ids)
    assert torch.equal(windowed_logits, logits_of(direct, input_ids))
    # The windows are shorter than the input, so they change the output.
    assert not torch.allclose(windowed_logits, logits_of(dense, input_ids))


def test_apply_accepts_config_object(
    tiny_qwen2_f64: Callable[[], torch.nn.Module], input_ids: torch.Tensor
) -> None:
    from_object = tiny_qwen2_f64()
    direct = tiny_qwen2_f64()
    info = ModelInfo(**model_shape(from_object).to_dict())
    config = build(KV_HEAD_WINDOWS, Granularity.KV_HEAD, model=info)

    apply_span_config(from_object, config)
    apply_windows(direct, KV_HEAD_WINDOWS, sink_tokens=2)

    assert torch.equal(logits_of(from_object, input_ids), logits_of(direct, input_ids))


@pytest.mark.parametrize(
    "change",
    [
        {"num_layers": 3},
        {"num_query_heads": 8, "num_kv_heads": 2},
        {"num_kv_heads": 4},
    ],
)
def test_apply_rejects_other_shape(
    change: dict[str, int], tiny_qwen2_f64: Callable[[], torch.nn.Module]
) -> None:
    model = tiny_qwen2_f64()
    info = MODEL.model_copy(update=change)
    layers, heads = info.num_layers, info.num_query_heads
    config = build([[None] * heads for _ in range(layers)], Granularity.QUERY_HEAD, model=info)

    with pytest.raises(ConfigError, match=r"but the model has 2 x 4 x 2"):
        apply_span_config(model, config)


def test_load_rejects_missing_convention(tmp_path: Path) -> None:
    """A file without the convention sentence cannot say how its windows are meant."""
    raw = json.loads(span_config_json(build(KV_HEAD_WINDOWS, Granularity.KV_HEAD)))
    del raw["convention"]
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(raw))

    with pytest.raises(ConfigError, match="convention"):
        load_span_config(path)
