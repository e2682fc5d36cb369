"""The profile command: the per-head loss estimates alone, without a search."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moa_search.cli.app import app, handle_errors, stderr, stdout
from moa_search.cli.options import (
    DATA_PANEL,
    DEFAULT_SEQ_LEN,
    DatasetConfigOption,
    EstimatorName,
    SeqLenOption,
    SplitOption,
    TextColumnOption,
    check_device,
    check_output_file,
    default_device,
)
from moa_search.cli.render import span_map_table
from moa_search.data import load_calibration_data
from moa_search.models import load_model, model_shape
from moa_search.pipeline import model_info_of
from moa_search.profile import profile_heads
from moa_search.search.groups import HeadGroups
from moa_search.search.profile_strategy import group_loss
from moa_search.space import DEFAULT_SPACE, load_space


@app.command()
@handle_errors
def profile(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hugging Face hub id or local model folder.")
    ],
    dataset: Annotated[
        str,
        typer.Option(
            help="Calibration text: a file, a folder or a datasets hub id.",
            rich_help_panel=DATA_PANEL,
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile file to write (.npz).")],
    dataset_config: DatasetConfigOption = None,
    split: SplitOption = "train",
    text_column: TextColumnOption = "text",
    seq_len: SeqLenOption = None,
    num_samples: Annotated[
        int, typer.Option(min=1, help="Sequences to profile.", rich_help_panel=DATA_PANEL)
    ] = 16,
    space: Annotated[
        str, typer.Option(help="Search space whose candidate windows are profiled.")
    ] = DEFAULT_SPACE,
    estimator: Annotated[
        EstimatorName, typer.Option(help="set (masked keys renormalised together) or additive.")
    ] = EstimatorName.set,
    supervised_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Count the loss of only the last N tokens of each sequence."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="The printed map shows the smallest window whose estimated NLL increase is at most this.",
        ),
    ] = 1e-3,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Sequences per forward and backward pass.")
    ] = 1,
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    device: Annotated[
        str | None, typer.Option(help="Torch device \\[default: cuda when available].")
    ] = None,
) -> None:
    """Estimate every head's loss increase under every candidate window and write the profile."""
    check_output_file(output)
    search_space = load_space(space)
    stderr.print(f"loading {model} …", highlight=False)
    loaded, tokenizer = load_model(
        model, dtype=dtype, device=check_device(device or default_device())
    )
    info = model_info_of(loaded, model)
    length = seq_len or min(DEFAULT_SEQ_LEN, info.max_positions or DEFAULT_SEQ_LEN)
    data = load_calibration_data(
        tokenizer,
        dataset,
        seq_len=length,
        num_samples=num_samples,
        holdout=0,
        max_positions=info.max_positions,
        dataset_config=dataset_config,
        split=split,
        text_column=text_column,
    )
    candidates = list(search_space.candidates(length))
    with Progress(
        TextColumn("[bold]profile"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as progress:
        task = progress.add_task("profile", total=num_samples)
        result = profile_heads(
            loaded,
            data.calibration,
            candidates,
            sink_tokens=search_space.sink_tokens,
            estimator=estimator.value,
            supervised_tokens=supervised_tokens,
            batch_size=batch_size,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    result.to_file(output)
    groups = HeadGroups(model_shape(loaded, model), search_space.granularity)
    stdout.print(span_map_table(group_loss(result, groups), candidates, groups, tolerance))
    stderr.print(
        f"wrote {output}: {info.num_layers} layers x {info.num_query_heads} query heads x "
        f"{len(candidates)} windows, dense ppl {math.exp(result.dense_nll):.4f}",
        highlight=False,
    )
