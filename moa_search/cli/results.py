"""The front and export commands: reading a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moa_search.cli.app import app, handle_errors, stderr, stdout
from moa_search.cli.options import FrontFormat, check_output_file
from moa_search.cli.render import front_rich_table, front_text
from moa_search.errors import ConfigError
from moa_search.export import RunResults, load_run, recommended_trial, span_config_for_trial
from moa_search.front import front_table
from moa_search.runs import open_run
from moa_search.span_config import save_span_config, span_config_json, write_text_atomic


def print_front(results: RunResults, output_format: FrontFormat, output: Path | None) -> None:
    """Print (or write) the front of a run in the requested format."""
    members = results.front()
    table = front_table(
        members,
        dense_perplexity=results.metrics["dense_perplexity"],
        dense_holdout_perplexity=results.metrics.get("dense_holdout_perplexity"),
        groups_per_layer=results.groups.groups_per_layer,
    )
    if output_format is FrontFormat.table:
        dense = results.metrics["dense_perplexity"]
        title = f"Pareto front of {results.folder.name} (dense ppl {dense:.4f})"
        rich_table = front_rich_table(table, title=title, budget=results.settings.budget)
        if output is None:
            stdout.print(rich_table)
        else:
            with output.open("w") as stream:
                Console = type(stdout)
                Console(file=stream, width=200).print(rich_table)
        return
    text = front_text(table, output_format.value)
    if output is None:
        stdout.out(text, end="", highlight=False)
    else:
        write_text_atomic(output, text)


@app.command()
@handle_errors
def front(
    run_path: Annotated[
        str, typer.Argument(metavar="RUN", help="Run folder, or a run name under --output-dir.")
    ],
    output_format: Annotated[
        FrontFormat, typer.Option("--format", help="Output format.")
    ] = FrontFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Folder containing the run folders.")] = Path(
        "results"
    ),
) -> None:
    """Print the Pareto front of a run."""
    results = load_run(open_run(run_path, output_dir))
    print_front(results, output_format, output)


@app.command()
@handle_errors
def export(
    run_path: Annotated[
        str, typer.Argument(metavar="RUN", help="Run folder, or a run name under --output-dir.")
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Span config file to write (a folder with --pareto)."),
    ],
    trial: Annotated[
        int | None,
        typer.Option(
            min=0, help="Trial number to export \\[default: the recommended front member]."
        ),
    ] = None,
    pareto: Annotated[
        bool,
        typer.Option("--pareto", help="Write every front member as trial-<N>.json into --output."),
    ] = False,
    output_dir: Annotated[Path, typer.Option(help="Folder containing the run folders.")] = Path(
        "results"
    ),
) -> None:
    """Write the span config of a trial (or of every front member) as JSON."""
    results = load_run(open_run(run_path, output_dir))
    if pareto:
        if trial is not None:
            raise ConfigError("--pareto exports every front member; drop --trial")
        if str(output) == "-":
            raise ConfigError(
                "--pareto writes one file per front member; pass a folder to --output"
            )
        if output.exists() and not output.is_dir():
            raise ConfigError(f"--output {str(output)!r} is a file; --pareto needs a folder")
        configs = [span_config_for_trial(results, member.trial) for member in results.front()]
        for config in configs:
            save_span_config(config, output / f"trial-{config.search['trial']}.json")
        stderr.print(f"wrote {len(configs)} span configs to {output}", highlight=False)
        return
    if str(output) != "-":
        check_output_file(output)
    number = recommended_trial(results) if trial is None else trial
    config = span_config_for_trial(results, number)
    if str(output) == "-":
        stdout.out(span_config_json(config), end="", highlight=False)
        return
    save_span_config(config, output)
    metrics = config.metrics
    assert metrics is not None
    stderr.print(
        f"wrote trial {number} to {output}: ppl {metrics.perplexity:.4f} "
        f"(dense {metrics.dense_perplexity:.4f}), cost {metrics.cost:.3f}, KV {metrics.kv_fraction:.3f}",
        highlight=False,
    )
