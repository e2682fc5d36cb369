"""Rendering of the Pareto front for the terminal and for machines."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from rich.table import Table

from moa_search.search.groups import HeadGroups


def _number(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _signed(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.2f}"


def front_rich_table(table: pd.DataFrame, *, title: str, budget: float) -> Table:
    """Build a Rich table of the front: one row per member, cheapest first.

    ``*`` marks the recommended member and ``u`` a uniform-window baseline.
    """
    has_holdout = table["holdout_perplexity"].notna().any() if len(table) else False
    rich_table = Table(
        title=title,
        caption=f"budget {budget:g}; * recommended; u uniform baseline; f full attention",
    )
    rich_table.add_column("trial", justify="right")
    rich_table.add_column("ppl", justify="right")
    rich_table.add_column("Δ%", justify="right")
    if has_holdout:
        rich_table.add_column("held-out", justify="right")
        rich_table.add_column("Δ%", justify="right")
    rich_table.add_column("cost", justify="right")
    rich_table.add_column("KV", justify="right")
    rich_table.add_column("ok")
    rich_table.add_column("windows by layer", overflow="fold", min_width=16)
    for row in table.itertuples(index=False):
        marker = ""
        if row.recommended:
            marker += "*"
        if isinstance(row.baseline, str):
            marker += "u"
        cells = [f"{row.trial}{marker}", _number(row.perplexity, 3), _signed(row.delta_pct)]
        if has_holdout:
            cells += [_number(row.holdout_perplexity, 3), _signed(row.holdout_delta_pct)]
        cells += [
            _number(row.cost, 3),
            _number(row.kv_fraction, 3),
            "yes" if row.feasible else "[red]no[/]",
            row.windows,
        ]
        rich_table.add_row(*cells, style="bold" if row.recommended else None)
    return rich_table


def front_text(table: pd.DataFrame, output_format: str) -> str:
    """Serialise the front table as CSV or JSON (records)."""
    if output_format == "csv":
        return table.to_csv(index=False)
    records = json.loads(table.to_json(orient="records", double_precision=15))
    return json.dumps(records, indent=2) + "\n"


def span_map_table(
    losses: np.ndarray, candidates: list[int | None], groups: HeadGroups, tolerance: float
) -> Table:
    """Tabulate, per layer and head group, the smallest window whose estimated NLL increase <= tolerance.

    Args:
        losses: ``[groups, candidates]`` estimated NLL increases, candidates ascending with full
        last.
    """
    table = Table(title=f"Smallest window with estimated NLL increase <= {tolerance:g} (f = full)")
    table.add_column("layer", justify="right")
    for index in range(groups.groups_per_layer):
        table.add_column(groups.label(index).split(".")[1], justify="right")
    for layer in range(groups.shape.num_layers):
        cells = []
        for index in range(groups.groups_per_layer):
            row = losses[layer * groups.groups_per_layer + index]
            window = next(
                (candidates[c] for c, value in enumerate(row) if value <= tolerance), None
            )
            cells.append("f" if window is None else str(window))
        table.add_row(str(layer), *cells)
    return table
