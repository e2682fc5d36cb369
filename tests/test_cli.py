"""End-to-end tests of the ``moa-search`` command line on the real stories260K model.

Most tests read one shared search run (``main_run``). Tests that need a run of their own use short
sequences and few trials. The module took 80 to 130 seconds on a loaded 2-core CPU, mostly in
SQLite commits of the Optuna storage.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner, Result

from moa_search import ConfigError, apply_span_config, load_span_config
from moa_search.cli import app, main
from moa_search.cli.app import _state as cli_state
from moa_search.evaluate import perplexity
from moa_search.models import load_model
from moa_search.search.evaluator import WindowEvaluator
from moa_search.search.samplers import SAMPLERS

runner = CliRunner()

# stories260K: 5 layers x 4 KV heads, 2 query heads per KV head.
NUM_LAYERS = 5
NUM_QUERY_HEADS = 8
NUM_KV_HEADS = 4
KV_GROUP_SIZE = NUM_QUERY_HEADS // NUM_KV_HEADS

# The shared run: the default space resolves to 9 windows plus full attention at 128 tokens, so
# 12 trials are the 10 uniform baselines and 2 sampled trials.
MAIN_TRIALS = 12
MAIN_RUN_OPTIONS = [
    "--seq-len", "128",
    "--num-samples", "2",
    "--holdout", "1",
    "--batch-size", "2",
    "--strategy", "direct",
]
# Runs of their own: at 64 tokens the default space also resolves to 10 candidates.
SMALL_RUN_OPTIONS = [
    "--seq-len", "64",
    "--num-samples", "1",
    "--holdout", "1",
    "--batch-size", "1",
    "--strategy", "direct",
]
DEFAULT_SPACE_CANDIDATES = 10

# Loggers whose level the app callback sets on every invocation.
CONFIGURED_LOGGERS = ("", "optuna", "transformers", "datasets", "httpx", "filelock")


def invoke(*args: Any) -> Result:
    """Run the CLI in-process with every argument turned into a string."""
    return runner.invoke(app, [str(arg) for arg in args])


def assert_success(result: Result) -> None:
    assert result.exception is None, result.output
    assert result.exit_code == 0, result.output


def assert_one_error_line(result: Result) -> str:
    """Check exit status 1, one ``error:`` line and no traceback; return the error line."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == error_lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return error_lines[0]


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def load_study_of(folder: Path) -> optuna.Study:
    settings = json.loads((folder / "settings.json").read_text())
    return optuna.load_study(study_name=settings["study_name"], storage=settings["storage"])


def uniform_labels(study: optuna.Study) -> list[str]:
    """Return the seed label of every finished uniform-baseline trial, repeats included."""
    labels = [trial.user_attrs.get("seed") for trial in completed(study)]
    return [label for label in labels if label and label.startswith("uniform")]


def table_trial_cells(stdout: str) -> list[str]:
    """Return the first cell (trial number and markers) of every row of a printed front table.

    A long windows summary folds onto extra lines whose first cell is empty; those are skipped.
    """
    cells = []
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cell = line.split("│")[1].strip()
        if cell:
            cells.append(cell)
    return cells


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run torch on one thread, so parallel test runs on a small CPU do not oversubscribe it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo the logging setup that every CLI invocation installs on the root logger."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in CONFIGURED_LOGGERS}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A space with one window, so a study has only 2 uniform baselines (8 tokens and full)."""
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text("windows: [8]\nsink_tokens: 2\ngranularity: kv_head\n")
    return path


@dataclass
class MainRun:
    """The shared search run and the output of printing its front three ways."""

    output_dir: Path
    folder: Path
    table: Result
    json_output: Result
    csv_output: Result

    def front_rows(self) -> list[dict[str, Any]]:
        return json.loads(self.json_output.stdout)


@pytest.fixture(scope="module")
def main_run(
    tmp_path_factory: pytest.TempPathFactory,
    stories_path: Path,
    tinystories_path: Path,
    single_thread: None,
) -> MainRun:
    """Search 12 trials once, then resume the finished run to print its front as JSON and CSV.

    Resuming a run that already has its trials runs none and only prints the front again.
    """
    output_dir = tmp_path_factory.mktemp("runs")
    common = [
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", output_dir,
        "--name", "main",
    ]
    table = invoke(*common, *MAIN_RUN_OPTIONS, "--trials", MAIN_TRIALS)
    json_output = invoke(*common, "--resume", "--format", "json")
    csv_output = invoke(*common, "--resume", "--format", "csv")
    return MainRun(output_dir, output_dir / "main", table, json_output, csv_output)


@pytest.fixture(scope="module")
def fresh_model(stories_path: Path, single_thread: None) -> torch.nn.Module:
    """stories260K in float32, the dtype of the shared run, loaded apart from the CLI."""
    model, _ = load_model(str(stories_path), dtype="float32")
    return model


# --- run -----------------------------------------------------------------------------------------


def test_run_exits_zero(main_run: MainRun) -> None:
    assert_success(main_run.table)
    assert_success(main_run.json_output)
    assert_success(main_run.csv_output)


def test_run_writes_run_files(main_run: MainRun) -> None:
    for name in ("settings.json", "calibration.pt", "study.db", "metrics.json"):
        assert (main_run.folder / name).is_file(), name


def test_run_records_metrics(main_run: MainRun) -> None:
    metrics = json.loads((main_run.folder / "metrics.json").read_text())

    assert metrics["dense_perplexity"] > 1
    assert metrics["dense_holdout_perplexity"] > 1
    front_trials = {str(row["trial"]) for row in main_run.front_rows()}
    assert set(metrics["holdout"]) == front_trials
    assert metrics["calibration"]["seq_len"] == 128
    assert metrics["calibration"]["num_samples"] == 2
    assert metrics["calibration"]["num_holdout"] == 1


def test_run_stores_calibration_ids(main_run: MainRun) -> None:
    data = torch.load(main_run.folder / "calibration.pt", weights_only=True)

    assert data["calibration"].shape == (2, 128)
    assert data["holdout"].shape == (1, 128)
    assert data["calibration"].dtype == torch.int64
    # Every packed sequence starts with BOS (id 1), the attention sink.
    assert data["calibration"][:, 0].tolist() == [1, 1]
    assert data["holdout"][:, 0].tolist() == [1]


def test_run_study_has_requested_trials(main_run: MainRun) -> None:
    study = load_study_of(main_run.folder)

    assert len(completed(study)) == MAIN_TRIALS
    assert len(study.trials) == MAIN_TRIALS


def test_run_study_contains_every_baseline(main_run: MainRun) -> None:
    settings = json.loads((main_run.folder / "settings.json").read_text())
    study = load_study_of(main_run.folder)
    num_groups = NUM_LAYERS * NUM_KV_HEADS

    candidates = settings["candidates"]
    assert len(candidates) == DEFAULT_SPACE_CANDIDATES
    assert candidates[-1] is None
    uniform = [
        trial.user_attrs["group_windows"]
        for trial in completed(study)
        if str(trial.user_attrs.get("seed", "")).startswith("uniform")
    ]
    assert sorted(uniform, key=str) == sorted(
        ([window] * num_groups for window in candidates), key=str
    )


def test_run_table_marks_baselines(main_run: MainRun) -> None:
    rows = main_run.front_rows()
    cells = table_trial_cells(main_run.table.stdout)

    assert "Pareto front of main" in main_run.table.stdout
    assert len(cells) == len(rows)
    for cell, row in zip(cells, rows):
        assert cell.rstrip("*u") == str(row["trial"])
        assert cell.endswith("u") == (row["baseline"] is not None), cell
        assert ("*" in cell) == row["recommended"], cell
    assert sum(row["recommended"] for row in rows) == 1


def test_run_progress_goes_to_stderr(main_run: MainRun) -> None:
    assert "searching" in main_run.table.stderr
    assert "run folder:" in main_run.table.stderr
    assert "searching" not in main_run.table.stdout


def test_run_json_matches_front_json(main_run: MainRun) -> None:
    result = invoke("front", main_run.folder, "--format", "json")

    assert_success(result)
    assert json.loads(result.stdout) == main_run.front_rows()


def test_run_csv_matches_front_json(main_run: MainRun) -> None:
    csv_rows = pd.read_csv(io.StringIO(main_run.csv_output.stdout)).to_dict("records")
    json_rows = main_run.front_rows()

    assert len(csv_rows) == len(json_rows)
    assert list(csv_rows[0]) == list(json_rows[0])
    for csv_row, json_row in zip(csv_rows, json_rows):
        assert csv_row["trial"] == json_row["trial"]
        assert csv_row["windows"] == json_row["windows"]
        assert bool(csv_row["feasible"]) == json_row["feasible"]
        assert bool(csv_row["recommended"]) == json_row["recommended"]
        # The JSON writer keeps 10 decimals, the CSV writer every digit.
        assert csv_row["perplexity"] == pytest.approx(json_row["perplexity"], rel=1e-9)
        assert csv_row["cost"] == pytest.approx(json_row["cost"], rel=1e-9)
        assert csv_row["holdout_perplexity"] == pytest.approx(
            json_row["holdout_perplexity"], rel=1e-9
        )


def test_run_front_marks_budget(main_run: MainRun) -> None:
    rows = main_run.front_rows()

    for row in rows:
        assert row["feasible"] == (row["cost"] <= 0.5), row
    costs = [row["cost"] for row in rows]
    assert costs == sorted(costs)


# --- front ---------------------------------------------------------------------------------------


def test_front_by_name_matches_path(main_run: MainRun) -> None:
    by_path = invoke("front", main_run.folder, "--format", "json")
    by_name = invoke("front", "main", "--output-dir", main_run.output_dir, "--format", "json")

    assert_success(by_path)
    assert_success(by_name)
    assert by_name.stdout == by_path.stdout


def test_front_table_by_name(main_run: MainRun) -> None:
    result = invoke("front", "main", "--output-dir", main_run.output_dir)

    assert_success(result)
    assert table_trial_cells(result.stdout) == table_trial_cells(main_run.table.stdout)


def test_front_output_file(main_run: MainRun, tmp_path: Path) -> None:
    csv_path = tmp_path / "front.csv"
    table_path = tmp_path / "front.txt"

    csv_result = invoke("front", main_run.folder, "--format", "csv", "-o", csv_path)
    table_result = invoke("front", main_run.folder, "-o", table_path)

    assert_success(csv_result)
    assert_success(table_result)
    assert csv_result.stdout == ""
    assert csv_path.read_text() == main_run.csv_output.stdout
    assert table_result.stdout == ""
    assert "Pareto front of main" in table_path.read_text()


# --- export --------------------------------------------------------------------------------------


def test_export_recommended_member(main_run: MainRun, tmp_path: Path) -> None:
    path = tmp_path / "spans.json"
    result = invoke("export", main_run.folder, "-o", path)

    assert_success(result)
    config = load_span_config(path)
    rows = main_run.front_rows()
    feasible = [row for row in rows if row["feasible"]]
    best = min(feasible, key=lambda row: row["holdout_perplexity"])
    assert config.search["trial"] == best["trial"]
    assert [row["trial"] for row in rows if row["recommended"]] == [best["trial"]]
    assert config.metrics is not None
    assert config.metrics.cost <= 0.5
    assert f"wrote trial {best['trial']}" in result.stderr


def test_export_to_stdout(main_run: MainRun, tmp_path: Path) -> None:
    path = tmp_path / "spans.json"
    to_file = invoke("export", main_run.folder, "-o", path)
    to_stdout = invoke("export", main_run.folder, "-o", "-")

    assert_success(to_file)
    assert_success(to_stdout)
    assert to_stdout.stdout == path.read_text()
    assert json.loads(to_stdout.stdout)["schema"] == "moa-search/span-config"
    assert not Path("-").exists()


def test_export_trial(main_run: MainRun, tmp_path: Path) -> None:
    study = load_study_of(main_run.folder)
    trial = completed(study)[-1]
    path = tmp_path / "trial.json"

    result = invoke("export", main_run.folder, "--trial", trial.number, "-o", path)

    assert_success(result)
    config = load_span_config(path)
    assert config.search["trial"] == trial.number
    assert config.metrics is not None
    assert config.metrics.perplexity == trial.values[0]
    assert config.metrics.cost == trial.values[1]
    group_windows = trial.user_attrs["group_windows"]
    expected = [
        [group_windows[layer * NUM_KV_HEADS + head // KV_GROUP_SIZE] for head in range(NUM_QUERY_HEADS)]
        for layer in range(NUM_LAYERS)
    ]
    assert config.windows == expected


def test_export_pareto_writes_every_member(main_run: MainRun, tmp_path: Path) -> None:
    folder = tmp_path / "spans"
    result = invoke("export", main_run.folder, "--pareto", "-o", folder)

    assert_success(result)
    expected = {f"trial-{row['trial']}.json" for row in main_run.front_rows()}
    assert {path.name for path in folder.iterdir()} == expected
    for path in folder.iterdir():
        config = load_span_config(path)
        assert path.name == f"trial-{config.search['trial']}.json"


def test_export_kv_head_windows_shared(main_run: MainRun, tmp_path: Path) -> None:
    study = load_study_of(main_run.folder)
    sampled = [trial for trial in completed(study) if "seed" not in trial.user_attrs]
    assert sampled

    for trial in sampled:
        path = tmp_path / f"trial-{trial.number}.json"
        assert_success(invoke("export", main_run.folder, "--trial", trial.number, "-o", path))
        config = load_span_config(path)
        assert config.granularity.value == "kv_head"
        for row, kv_row in zip(config.windows, config.kv_windows):
            for kv_head in range(NUM_KV_HEADS):
                group = row[kv_head * KV_GROUP_SIZE : (kv_head + 1) * KV_GROUP_SIZE]
                assert group == [kv_row[kv_head]] * KV_GROUP_SIZE


def test_export_round_trip_reproduces_perplexity(
    main_run: MainRun, fresh_model: torch.nn.Module, tmp_path: Path
) -> None:
    """Check that every exported front member reproduces its perplexities on a fresh model."""
    folder = tmp_path / "spans"
    assert_success(invoke("export", main_run.folder, "--pareto", "-o", folder))
    data = torch.load(main_run.folder / "calibration.pt", weights_only=True)
    batch_size = json.loads((main_run.folder / "settings.json").read_text())["batch_size"]

    paths = sorted(folder.iterdir())
    assert paths
    for path in paths:
        config = apply_span_config(fresh_model, path)
        assert config.metrics is not None
        calibration = perplexity(fresh_model, data["calibration"], batch_size=batch_size)
        holdout = perplexity(fresh_model, data["holdout"], batch_size=batch_size)
        assert calibration == pytest.approx(config.metrics.perplexity, rel=1e-9), path.name
        assert config.metrics.holdout_perplexity is not None
        assert holdout == pytest.approx(config.metrics.holdout_perplexity, rel=1e-9), path.name


def test_export_records_provenance(main_run: MainRun, tmp_path: Path) -> None:
    path = tmp_path / "spans.json"
    assert_success(invoke("export", main_run.folder, "-o", path))
    config = load_span_config(path)
    metrics = json.loads((main_run.folder / "metrics.json").read_text())

    assert config.model.num_layers == NUM_LAYERS
    assert config.model.num_query_heads == NUM_QUERY_HEADS
    assert config.model.num_kv_heads == NUM_KV_HEADS
    assert config.calibration == metrics["calibration"]
    assert config.search["run"] == "main"
    assert config.search["sampler"] == "tpe"
    assert config.search["strategy"] == "direct"
    assert config.metrics is not None
    assert config.metrics.dense_perplexity == metrics["dense_perplexity"]
    assert config.metrics.cost_lengths == [128]


# --- resume, Ctrl-C and storage ------------------------------------------------------------------


def test_resume_adds_trials_without_baselines(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    common = [
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "resumed",
    ]
    first = invoke(*common, *SMALL_RUN_OPTIONS, "--trials", 10)
    assert_success(first)
    # The model, the data and the budget come from the run's settings.
    second = invoke(
        "run", "--output-dir", tmp_path, "--name", "resumed", "--resume", "--trials", 14
    )
    assert_success(second)

    study = load_study_of(tmp_path / "resumed")
    assert len(completed(study)) == 14
    labels = uniform_labels(study)
    assert len(labels) == DEFAULT_SPACE_CANDIDATES
    assert len(set(labels)) == len(labels)
    settings = json.loads((tmp_path / "resumed" / "settings.json").read_text())
    assert settings["trials"] == 14


def test_resume_drops_stored_timeout(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    common = ["run", "--output-dir", tmp_path, "--name", "timed"]
    first = invoke(
        *common,
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        *SMALL_RUN_OPTIONS,
        "--trials", 12,
        "--timeout", "0.001",
    )
    assert_success(first)
    assert "--timeout 0.001 s reached" in first.output
    assert len(completed(load_study_of(tmp_path / "timed"))) < 12

    second = invoke(*common, "--resume")
    assert_success(second)

    assert len(completed(load_study_of(tmp_path / "timed"))) == 12
    settings = json.loads((tmp_path / "timed" / "settings.json").read_text())
    assert settings["timeout"] is None


def test_zero_timeout_fails(tmp_path: Path, stories_path: Path, tinystories_path: Path) -> None:
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--timeout", "0",
    )

    line = assert_one_error_line(result)
    assert "invalid --timeout 0" in line
    assert not any(tmp_path.iterdir())


def test_run_without_model_fails(tmp_path: Path, tinystories_path: Path) -> None:
    result = invoke(
        "run", "--dataset", tinystories_path, "--budget", "0.5", "--output-dir", tmp_path
    )

    line = assert_one_error_line(result)
    assert "missing --model" in line
    assert not any(tmp_path.iterdir())


def test_resume_unknown_name_fails(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "missing",
        "--resume",
    )

    line = assert_one_error_line(result)
    assert "missing" in line
    assert not (tmp_path / "missing").exists()


def test_run_into_existing_folder_fails(
    main_run: MainRun, stories_path: Path, tinystories_path: Path
) -> None:
    before = (main_run.folder / "settings.json").read_text()
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", main_run.output_dir,
        "--name", "main",
    )

    line = assert_one_error_line(result)
    assert "already exists" in line
    assert "--resume" in line
    assert (main_run.folder / "settings.json").read_text() == before


def test_ctrl_c_keeps_finished_trials(
    tmp_path: Path,
    stories_path: Path,
    tinystories_path: Path,
    tiny_space: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interrupt the 4th trial with Ctrl-C, then check the kept trials, the front and the resume.

    The tiny space has 2 baselines, so the interrupted trial is a sampled one.
    """
    original = WindowEvaluator.perplexity
    calls = {"count": 0}

    def interrupt_once(self: WindowEvaluator, windows: Any, input_ids: Any = None) -> float:
        calls["count"] += 1
        # Call 1 measures the dense model; calls 2-4 are trials 0-2.
        if calls["count"] == 5:
            raise KeyboardInterrupt
        return original(self, windows, input_ids)

    monkeypatch.setattr(WindowEvaluator, "perplexity", interrupt_once)
    common = [
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "stopped",
        "--space", tiny_space,
        "--format", "json",
    ]
    stopped = invoke(*common, *SMALL_RUN_OPTIONS, "--trials", 6)

    # 130 = 128 + SIGINT, after the front is printed.
    assert stopped.exit_code == 130, stopped.output
    assert "interrupted" in stopped.stderr
    rows = json.loads(stopped.stdout)
    assert {row["trial"] for row in rows} <= {0, 1, 2}
    study = load_study_of(tmp_path / "stopped")
    assert [trial.number for trial in completed(study)] == [0, 1, 2]
    metrics = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert set(metrics["holdout"]) == {str(row["trial"]) for row in rows}

    monkeypatch.setattr(WindowEvaluator, "perplexity", original)
    resumed = invoke(*common, "--resume")

    assert_success(resumed)
    study = load_study_of(tmp_path / "stopped")
    assert len(completed(study)) == 6
    assert len(uniform_labels(study)) == 2


def test_ctrl_c_resume_runs_every_baseline(
    tmp_path: Path,
    stories_path: Path,
    tinystories_path: Path,
    tiny_space: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interrupt the second baseline with Ctrl-C, then check that resuming evaluates it."""
    original = WindowEvaluator.perplexity
    calls = {"count": 0}

    def interrupt_once(self: WindowEvaluator, windows: Any, input_ids: Any = None) -> float:
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(self, windows, input_ids)

    monkeypatch.setattr(WindowEvaluator, "perplexity", interrupt_once)
    common = [
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "stopped",
        "--space", tiny_space,
    ]
    assert invoke(*common, *SMALL_RUN_OPTIONS, "--trials", 3).exit_code == 130
    monkeypatch.setattr(WindowEvaluator, "perplexity", original)
    assert_success(invoke(*common, "--resume"))

    study = load_study_of(tmp_path / "stopped")
    labels = uniform_labels(study)
    assert len(labels) == 2
    assert "uniform full" in labels


def test_storage_url_holds_study(
    tmp_path: Path, stories_path: Path, tinystories_path: Path, tiny_space: Path
) -> None:
    database = tmp_path / "other.db"
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "elsewhere",
        "--space", tiny_space,
        "--storage", f"sqlite:///{database}",
        "--trials", 3,
        *SMALL_RUN_OPTIONS,
    )

    assert_success(result)
    assert database.is_file()
    assert not (tmp_path / "elsewhere" / "study.db").exists()
    study = optuna.load_study(study_name="elsewhere", storage=f"sqlite:///{database}")
    assert len(completed(study)) == 3
    front = invoke("front", tmp_path / "elsewhere", "--format", "json")
    assert_success(front)
    assert json.loads(front.stdout)


# --- samplers and spaces -------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_runs(
    sampler: str, tmp_path: Path, stories_path: Path, tinystories_path: Path, tiny_space: Path
) -> None:
    """Each sampler finishes 2 sampled trials after the 2 uniform baselines of the tiny space."""
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", sampler,
        "--space", tiny_space,
        "--sampler", sampler,
        "--trials", 4,
        "--format", "json",
        *SMALL_RUN_OPTIONS,
    )

    assert_success(result)
    study = load_study_of(tmp_path / sampler)
    assert len(completed(study)) == 4
    assert len(uniform_labels(study)) == 2
    settings = json.loads((tmp_path / sampler / "settings.json").read_text())
    assert settings["sampler"] == sampler
    assert json.loads(result.stdout)


def test_query_head_space_exports_own_windows(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    result = invoke(
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", tmp_path,
        "--name", "query",
        "--space", "query-heads",
        "--trials", DEFAULT_SPACE_CANDIDATES + 1,
        *SMALL_RUN_OPTIONS,
    )
    assert_success(result)
    study = load_study_of(tmp_path / "query")
    sampled = [trial for trial in completed(study) if "seed" not in trial.user_attrs]
    assert len(sampled) == 1
    assert len(sampled[0].user_attrs["group_windows"]) == NUM_LAYERS * NUM_QUERY_HEADS

    path = tmp_path / "query.json"
    assert_success(invoke("export", tmp_path / "query", "--trial", sampled[0].number, "-o", path))
    config = load_span_config(path)

    assert config.granularity.value == "query_head"
    groups = [
        row[kv_head * KV_GROUP_SIZE : (kv_head + 1) * KV_GROUP_SIZE]
        for row in config.windows
        for kv_head in range(NUM_KV_HEADS)
    ]
    # 20 KV groups of 2 independently sampled windows: some group differs for this seed.
    assert any(len(set(group)) > 1 for group in groups)
    for row, kv_row in zip(config.windows, config.kv_windows):
        for kv_head in range(NUM_KV_HEADS):
            group = row[kv_head * KV_GROUP_SIZE : (kv_head + 1) * KV_GROUP_SIZE]
            expected = None if None in group else max(group)
            assert kv_row[kv_head] == expected


# --- errors --------------------------------------------------------------------------------------


def run_args(
    stories_path: Path, tinystories_path: Path, output_dir: Path, *extra: Any
) -> list[Any]:
    """Return the arguments of a small run named ``failed``, which tests edit to make it fail."""
    return [
        "run",
        "--model", stories_path,
        "--dataset", tinystories_path,
        "--budget", "0.5",
        "--output-dir", output_dir,
        "--name", "failed",
        *SMALL_RUN_OPTIONS,
        "--trials", 3,
        *extra,
    ]


def test_budget_zero_fails(tmp_path: Path, stories_path: Path, tinystories_path: Path) -> None:
    args = run_args(stories_path, tinystories_path, tmp_path)
    args[args.index("--budget") + 1] = "0"

    line = assert_one_error_line(invoke(*args))

    assert "--budget" in line
    assert "(0, 1]" in line
    assert not (tmp_path / "failed").exists()


def test_budget_above_one_fails(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    args = run_args(stories_path, tinystories_path, tmp_path)
    args[args.index("--budget") + 1] = "1.5"

    line = assert_one_error_line(invoke(*args))

    assert "--budget 1.5" in line
    assert "(0, 1]" in line
    assert not (tmp_path / "failed").exists()


def test_console_script_usage_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console entry point prints Click's usage errors in the same one-line form, status 2."""
    monkeypatch.setattr("sys.argv", ["moa-search", "run", "--model", "m", "--sampler", "annealing"])

    with pytest.raises(SystemExit) as exit_info:
        main()

    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: Invalid value for '--sampler'")
    assert "moa-search run --help" in lines[0]


def test_unknown_sampler_is_usage_error(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    result = invoke(*run_args(stories_path, tinystories_path, tmp_path, "--sampler", "annealing"))

    assert result.exit_code == 2
    assert "Invalid value for '--sampler'" in result.stderr
    for name in SAMPLERS:
        assert name in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "failed").exists()


def test_missing_model_folder_fails(tmp_path: Path, tinystories_path: Path) -> None:
    args = run_args(tmp_path / "no-model", tinystories_path, tmp_path)

    line = assert_one_error_line(invoke(*args))

    assert "no-model" in line
    assert not (tmp_path / "failed").exists()


def test_missing_dataset_fails(tmp_path: Path, stories_path: Path) -> None:
    args = run_args(stories_path, tmp_path / "no-text.txt", tmp_path)

    line = assert_one_error_line(invoke(*args))

    assert "no-text.txt" in line
    assert not (tmp_path / "failed").exists()


def test_seq_len_above_positions_fails(
    tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    args = run_args(stories_path, tinystories_path, tmp_path)
    args[args.index("--seq-len") + 1] = "600"

    line = assert_one_error_line(invoke(*args))

    assert "--seq-len 600" in line
    assert "512" in line
    assert not (tmp_path / "failed").exists()


def test_too_little_text_fails(tmp_path: Path, stories_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time there was a cat.\n")
    args = run_args(stories_path, text, tmp_path)

    line = assert_one_error_line(invoke(*args))

    assert "too little text" in line
    assert not (tmp_path / "failed").exists()


def test_unknown_space_fails(tmp_path: Path, stories_path: Path, tinystories_path: Path) -> None:
    args = run_args(stories_path, tinystories_path, tmp_path, "--space", "no-such-space")

    line = assert_one_error_line(invoke(*args))

    assert "no-such-space" in line
    assert "default" in line
    assert not (tmp_path / "failed").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Not YAML at all: an unclosed flow sequence.
        ("fractions: [0.5, 0.25\n", "not valid YAML"),
        # Valid YAML, but a fraction outside (0, 1].
        ("fractions: [1.5]\n", "fractions"),
        # Valid YAML, but a key the schema does not know.
        ("fractions: [0.5]\nwindow: [8]\n", "window"),
        # A list, not a mapping.
        ("- 0.5\n", "mapping"),
    ],
)
def test_malformed_space_fails(
    text: str, expected: str, tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    space = tmp_path / "broken.yaml"
    space.write_text(text)
    args = run_args(stories_path, tinystories_path, tmp_path, "--space", space)

    line = assert_one_error_line(invoke(*args))

    assert "broken.yaml" in line
    assert expected in line
    assert not (tmp_path / "failed").exists()


def test_debug_shows_exception(
    tmp_path: Path,
    stories_path: Path,
    tinystories_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The debug flag is module state; monkeypatch restores it after the test.
    monkeypatch.setitem(cli_state, "debug", False)
    args = run_args(stories_path, tinystories_path, tmp_path)
    args[args.index("--budget") + 1] = "0"

    result = invoke("--debug", *args)

    assert isinstance(result.exception, ConfigError)
    assert "(0, 1]" in str(result.exception)


def test_front_non_run_folder_fails(tmp_path: Path) -> None:
    line = assert_one_error_line(invoke("front", tmp_path))

    assert str(tmp_path) in line


def test_front_unknown_name_fails(tmp_path: Path) -> None:
    line = assert_one_error_line(invoke("front", "nothing", "--output-dir", tmp_path))

    assert "'nothing' not found" in line


def test_export_unknown_trial_fails(main_run: MainRun, tmp_path: Path) -> None:
    path = tmp_path / "spans.json"

    line = assert_one_error_line(invoke("export", main_run.folder, "--trial", 9999, "-o", path))

    assert "trial 9999" in line
    assert f"0..{MAIN_TRIALS - 1}" in line
    assert not path.exists()


def test_export_pareto_with_trial_fails(main_run: MainRun, tmp_path: Path) -> None:
    folder = tmp_path / "spans"

    line = assert_one_error_line(
        invoke("export", main_run.folder, "--pareto", "--trial", 0, "-o", folder)
    )

    assert "--trial" in line
    assert not folder.exists()


@pytest.fixture(scope="module")
def exported_config(main_run: MainRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The recommended member of the shared run as raw JSON."""
    path = tmp_path_factory.mktemp("export") / "spans.json"
    assert_success(invoke("export", main_run.folder, "-o", path))
    return json.loads(path.read_text())


def test_apply_to_other_shape_fails(
    exported_config: dict[str, Any], tiny_qwen2_f64: Any, tmp_path: Path
) -> None:
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(exported_config))

    with pytest.raises(ConfigError, match=r"5 layers x 8 query heads x 4 KV heads"):
        apply_span_config(tiny_qwen2_f64(), path)


def test_edited_convention_fails(exported_config: dict[str, Any], tmp_path: Path) -> None:
    edited = dict(exported_config)
    convention = exported_config["convention"]
    edited["convention"] = convention.replace("i - j < window", "i - j <= window")
    assert edited["convention"] != exported_config["convention"]
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(edited))

    with pytest.raises(ConfigError, match="convention"):
        load_span_config(path)


def test_schema_version_two_fails(exported_config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "spans.json"
    path.write_text(json.dumps({**exported_config, "schema_version": 2}))

    with pytest.raises(ConfigError, match="schema_version 2"):
        load_span_config(path)


# --- help ----------------------------------------------------------------------------------------


def command_names() -> list[str]:
    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_help_lists_commands() -> None:
    result = invoke("--help")

    assert_success(result)
    for name in ("run", "front", "export"):
        assert name in result.stdout


@pytest.mark.parametrize("command", command_names())
def test_command_help(command: str) -> None:
    result = invoke(command, "--help")

    assert_success(result)
    assert "Usage:" in result.stdout


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        # The cheapest config of the default space costs about 0.12 at 128 tokens.
        (["--budget", "0.001"], r"--budget 0\.001 is below 0\.1\d+, the cost of the cheapest config"),
        # The profile counts at most seq_len - 1 predicted tokens.
        (["--supervised-tokens", "1000"], r"invalid --supervised-tokens 1000: use 1 to 127"),
        # The window-count limit only shapes the knapsack decoding of the profile strategy.
        (["--strategy", "direct", "--max-windows-per-layer", "1"], "needs --strategy profile"),
        # A run name is one folder below --output-dir.
        (["--name", "../escape"], r"invalid --name '\.\./escape'"),
        # This torch build has no CUDA.
        (["--device", "cuda:7"], "not available|invalid --device"),
        (["--device", "toaster"], "invalid --device 'toaster'"),
        # SQLAlchemy has no such dialect.
        (["--storage", "foo://bar"], "invalid Optuna storage 'foo://bar'"),
    ],
)
def test_run_rejects_bad_settings(
    extra: list[str], match: str, tmp_path: Path, stories_path: Path, tinystories_path: Path
) -> None:
    args = [
        "run", "--model", stories_path, "--dataset", tinystories_path, "--budget", "0.5",
        "--output-dir", tmp_path, "--seq-len", "128", "--num-samples", "1", "--holdout", "0",
        "--trials", "2",
    ]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]

    line = assert_one_error_line(invoke(*args))

    assert re.search(match, line), line
    assert list(tmp_path.iterdir()) == []


def test_export_to_missing_folder_fails(main_run: MainRun, tmp_path: Path) -> None:
    line = assert_one_error_line(
        invoke("export", main_run.folder, "-o", tmp_path / "missing" / "spans.json")
    )

    assert "does not exist" in line
    assert not (tmp_path / "missing").exists()


def test_export_pareto_to_stdout_fails(main_run: MainRun) -> None:
    line = assert_one_error_line(invoke("export", main_run.folder, "--pareto", "-o", "-"))

    assert "pass a folder" in line
