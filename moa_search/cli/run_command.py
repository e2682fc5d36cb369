"""The run command: a search from the command line, with progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import optuna
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moa_search.cli.app import app, handle_errors, stderr
from moa_search.cli.options import (
    DATA_PANEL,
    DEFAULT_SEQ_LEN,
    OUTPUT_PANEL,
    SEARCH_PANEL,
    DatasetConfigOption,
    EstimatorName,
    FrontFormat,
    SamplerName,
    SeqLenOption,
    SplitOption,
    StrategyName,
    TextColumnOption,
    check_device,
    default_device,
)
from moa_search.cli.results import print_front
from moa_search.cost import mean_area_density
from moa_search.errors import ConfigError, RunFolderError
from moa_search.models import load_model
from moa_search.pipeline import RunHooks, model_info_of, run_search
from moa_search.runs import RunFolder, RunSettings, default_run_name
from moa_search.space import DEFAULT_SPACE, load_space


def _best_feasible(study: optuna.Study, budget: float) -> tuple[float, float] | None:
    best = None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        perplexity, cost = trial.values
        if cost <= budget and (best is None or perplexity < best[0]):
            best = (perplexity, cost)
    return best


def _resolve_settings(
    *,
    folder: RunFolder,
    resume: bool,
    model_id: str,
    model: torch.nn.Module,
    values: dict,
) -> RunSettings:
    """Build the settings of a new run, or read and update those of a resumed one."""
    if resume:
        stored = folder.read_settings()
        if Path(stored.model).name != Path(model_id).name and stored.model != model_id:
            raise ConfigError(
                f"run {folder.name!r} searched model {stored.model!r}, not {model_id!r}; "
                "resume with the same --model"
            )
        updates = {key: values[key] for key in ("trials", "batch_size") if values[key] is not None}
        # A timeout limits one invocation, so a resumed run does not inherit the last one's.
        updates["timeout"] = values["timeout"]
        return stored.model_copy(update=updates)
    space = load_space(values["space"])
    info = model_info_of(model, model_id)
    seq_len = values["seq_len"] or min(DEFAULT_SEQ_LEN, info.max_positions or DEFAULT_SEQ_LEN)
    candidates = list(space.candidates(seq_len))
    cost_lengths = values["cost_lengths"] or [seq_len]
    cheapest = mean_area_density([[candidates[0]]], cost_lengths, space.sink_tokens)
    if values["budget"] < cheapest:
        raise ConfigError(
            f"--budget {values['budget']} is below {cheapest:.4f}, the cost of the cheapest config "
            f"(every head at window {candidates[0]}) in space {space.name!r}; raise --budget or use a "
            "space with smaller windows"
        )
    supervised = values["supervised_tokens"]
    if supervised is not None and supervised >= seq_len:
        raise ConfigError(
            f"invalid --supervised-tokens {supervised}: use 1 to {seq_len - 1} (below --seq-len)"
        )
    storage = values["storage"] or folder.default_storage()
    return RunSettings(
        model=model_id,
        dtype=values["dtype"],
        device=values["device"],
        dataset=values["dataset"],
        dataset_config=values["dataset_config"],
        split=values["split"],
        text_column=values["text_column"],
        seq_len=seq_len,
        num_samples=values["num_samples"],
        holdout=values["holdout"],
        batch_size=values["batch_size"],
        budget=values["budget"],
        trials=values["trials"] or 100,
        timeout=values["timeout"],
        seed=values["seed"],
        sampler=values["sampler"],
        strategy=values["strategy"],
        estimator=values["estimator"],
        supervised_tokens=values["supervised_tokens"],
        max_windows_per_layer=values["max_windows_per_layer"],
        space=space,
        candidates=candidates,
        cost_lengths=cost_lengths,
        storage=storage,
        study_name=folder.name,
        model_info=info,
    )


# Options whose value is fixed by the stored settings of a resumed run.
_RESUME_FIXED = (
    "dataset",
    "dataset_config",
    "split",
    "text_column",
    "seq_len",
    "num_samples",
    "holdout",
    "budget",
    "strategy",
    "estimator",
    "supervised_tokens",
    "max_windows_per_layer",
    "sampler",
    "seed",
    "dtype",
    "storage",
)


def _check_resume_options(ctx: typer.Context, settings: RunSettings, values: dict) -> None:
    """Reject options given on the command line that differ from the resumed run's settings."""
    stored = settings.model_dump()
    stored["space"] = settings.space.name
    for option in (*_RESUME_FIXED, "space", "cost_lengths"):
        source = ctx.get_parameter_source(option)
        if source is None or source.name != "COMMANDLINE":
            continue
        given = Path(values[option]).stem if option == "space" else values[option]
        if given != stored[option]:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(
                f"{flag} {values[option]!r} differs from the resumed run's {stored[option]!r}; drop it "
                "or start a new run with --name"
            )


@app.command()
@handle_errors
def run(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Hugging Face hub id or local model folder \\[default with --resume: the run's model].",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Calibration text: a .txt/.jsonl/.csv/.parquet file, a folder of them, or a datasets hub id "
            "(required for a new run).",
            rich_help_panel=DATA_PANEL,
        ),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Largest allowed attention cost relative to dense causal attention, in (0, 1] "
            "(required for a new run).",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    dataset_config: DatasetConfigOption = None,
    split: SplitOption = "train",
    text_column: TextColumnOption = "text",
    seq_len: SeqLenOption = None,
    num_samples: Annotated[
        int, typer.Option(min=1, help="Calibration sequences.", rich_help_panel=DATA_PANEL)
    ] = 16,
    holdout: Annotated[
        int,
        typer.Option(
            min=0,
            help="Held-out sequences for validating the front (0 = none).",
            rich_help_panel=DATA_PANEL,
        ),
    ] = 8,
    space: Annotated[
        str,
        typer.Option(
            help="Search space: a built-in name or a YAML file.", rich_help_panel=SEARCH_PANEL
        ),
    ] = DEFAULT_SPACE,
    strategy: Annotated[
        StrategyName,
        typer.Option(
            help="profile: Optuna tunes per-layer corrections of a head profile, decoded by an exact "
            "knapsack; direct: one parameter per head group.",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = StrategyName.profile,
    estimator: Annotated[
        EstimatorName,
        typer.Option(
            help="Profile estimator: set (masked keys renormalised together) or additive.",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = EstimatorName.set,
    supervised_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Profile the loss of only the last N tokens of each sequence \\[default: all].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    max_windows_per_layer: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="At most this many distinct windows in one layer (profile strategy).",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    sampler: Annotated[
        SamplerName, typer.Option(help="Optuna sampler.", rich_help_panel=SEARCH_PANEL)
    ] = SamplerName("tpe"),
    trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Total finished trials, uniform baselines included \\[default: 100].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Stop starting trials after this many seconds of search; applies to this invocation only.",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.", rich_help_panel=SEARCH_PANEL)] = 0,
    cost_lengths: Annotated[
        list[int] | None,
        typer.Option(
            "--cost-length",
            min=1,
            help="Sequence length the cost is modelled at; repeat to average \\[default: --seq-len].",
            rich_help_panel=SEARCH_PANEL,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 4,
    dtype: Annotated[
        str, typer.Option(help="Model dtype: float32, bfloat16, float16, float64.")
    ] = "float32",
    device: Annotated[
        str | None, typer.Option(help="Torch device \\[default: cuda when available, else cpu].")
    ] = None,
    output_dir: Annotated[
        Path, typer.Option(help="Folder containing the run folders.", rich_help_panel=OUTPUT_PANEL)
    ] = Path("results"),
    name: Annotated[
        str | None,
        typer.Option(
            help="Run name \\[default: model name and time].", rich_help_panel=OUTPUT_PANEL
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL \\[default: SQLite file in the run folder].",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run given by --name instead of starting one.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    output_format: Annotated[
        FrontFormat,
        typer.Option("--format", help="How to print the front.", rich_help_panel=OUTPUT_PANEL),
    ] = FrontFormat.table,
) -> None:
    """Search per-head windows under a cost budget and print the Pareto front."""
    if resume and name is None:
        raise ConfigError("--resume needs --name of the run to continue")
    if not resume:
        if model is None:
            raise ConfigError(
                "missing --model: pass a Hugging Face hub id or a local model folder"
            )
        if dataset is None:
            raise ConfigError("missing --dataset: pass a text file, a folder or a datasets hub id")
        if budget is None:
            raise ConfigError(
                "missing --budget: pass the allowed cost relative to dense attention, e.g. 0.5"
            )
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"invalid --timeout {timeout}: use a positive number of seconds")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"invalid --budget {budget}: use a value in (0, 1], e.g. 0.5")
    if max_windows_per_layer is not None and strategy is not StrategyName.profile:
        raise ConfigError(
            "--max-windows-per-layer needs --strategy profile; the direct strategy samples every "
            "head group freely"
        )
    if name is not None and (Path(name).name != name or name in {".", ".."}):
        raise ConfigError(f"invalid --name {name!r}: use a plain folder name without '/'")
    folder = RunFolder(output_dir / (name or default_run_name(model)))
    if resume and not folder.exists():
        raise RunFolderError(
            f"no run to resume in {str(folder.path)!r}; check --name and --output-dir"
        )
    if not resume and folder.exists():
        raise RunFolderError(
            f"run folder {str(folder.path)!r} already exists; pass --resume to continue it or another --name"
        )
    if model is None:
        model = folder.read_settings().model
    device = check_device(device or default_device())
    stderr.print(f"loading {model} …", highlight=False)
    loaded, tokenizer = load_model(model, dtype=dtype, device=device)
    values = dict(
        dataset=dataset,
        dataset_config=dataset_config,
        split=split,
        text_column=text_column,
        seq_len=seq_len,
        num_samples=num_samples,
        holdout=holdout,
        space=space,
        strategy=strategy.value,
        sampler=sampler.value,
        trials=trials,
        timeout=timeout,
        seed=seed,
        cost_lengths=cost_lengths,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        storage=storage,
        budget=budget,
        estimator=estimator.value,
        supervised_tokens=supervised_tokens,
        max_windows_per_layer=max_windows_per_layer,
    )
    settings = _resolve_settings(
        folder=folder, resume=resume, model_id=model, model=loaded, values=values
    )
    if resume:
        _check_resume_options(ctx, settings, values)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[best]}"),
        console=stderr,
        transient=True,
    )
    with progress:
        trials_task = progress.add_task("trials", total=settings.trials, visible=False, best="")
        validation_task = progress.add_task("held-out", total=None, visible=False, best="")
        profile_task = progress.add_task("profile", total=None, visible=False, best="")

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            done = len(
                study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            )
            best = _best_feasible(study, settings.budget)
            text = (
                "no feasible trial yet"
                if best is None
                else f"best ppl {best[0]:.4f} @ cost {best[1]:.3f}"
            )
            progress.update(trials_task, completed=done, visible=True, best=text)

        def on_stage(message: str) -> None:
            if message == "searching":
                progress.update(trials_task, visible=True)
            progress.console.print(f"{message} …", highlight=False)

        def on_validation(done: int, total: int) -> None:
            progress.update(validation_task, completed=done, total=total, visible=True)

        def on_profile(done: int, total: int) -> None:
            progress.update(profile_task, completed=done, total=total, visible=True)

        hooks = RunHooks(
            stage=on_stage,
            trial_callbacks=(on_trial,),
            validation_progress=on_validation,
            profile_progress=on_profile,
        )
        outcome = run_search(
            settings, folder, resume=resume, model=loaded, tokenizer=tokenizer, hooks=hooks
        )
    print_front(outcome.results, output_format, None)
    stderr.print(f"run folder: {folder.path}", highlight=False)
    if outcome.interrupted:
        stderr.print("[yellow]interrupted:[/] finished trials are kept; continue with --resume")
        # 130 = 128 + SIGINT, as shells report an interrupted command.
        raise typer.Exit(code=130)
