"""Time the exact knapsack solver on a random instance shaped like a 32-layer, 32-head model.

Also times one fitted round of the profile strategy on that instance: fitting the additive
surrogate to ``--fit-evaluations`` random configs, solving its front and picking the proposals.
Prints a markdown table of median wall times to stdout. Run from the repository root, with the
package installed (``pip install -e .``) or on the path:

    PYTHONPATH=. python benchmarks/bench_knapsack.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
import scipy

from moa_search.knapsack import KnapsackSolution, solve_front, solve_knapsack
from moa_search.models import ModelShape
from moa_search.search.groups import HeadGroups
from moa_search.search.profile_strategy import ProfileStrategy
from moa_search.space import Granularity

Result = TypeVar("Result")


def build_instance(
    layers: int, heads: int, candidates: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build loss, cost ``[groups, candidates]`` and layer ``[groups]`` for random heads.

    Windows grow geometrically from 32 tokens to ``seq_len`` (dense). Cost is the share of the
    causal triangle that a window keeps. Loss falls with the window at a per-head rate and scale,
    with noise that makes some rows non-monotone, and is 0 for the dense candidate.
    """
    rng = np.random.default_rng(seed)
    windows = np.geomspace(32, seq_len, candidates).round()
    pairs = windows * (windows + 1) / 2 + (seq_len - windows) * windows
    cost = np.broadcast_to(
        pairs / (seq_len * (seq_len + 1) / 2), (layers * heads, candidates)
    ).copy()

    scale = rng.lognormal(mean=-3.0, sigma=1.5, size=(layers * heads, 1))
    reach = rng.lognormal(mean=np.log(seq_len / 16), sigma=1.0, size=(layers * heads, 1))
    loss = scale * np.exp(-windows[None, :] / reach)
    loss += scale * rng.normal(scale=0.03, size=loss.shape)
    loss[:, -1] = 0.0
    layer = np.repeat(np.arange(layers), heads)
    return loss, cost, layer


def time_calls(function: Callable[[], Result], repeats: int) -> tuple[Result, float]:
    """Call ``function`` ``repeats`` times and return the last result and the median wall time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def table_row(
    call: str, budget: str, limit: str, solution: KnapsackSolution | None, seconds: float
) -> str:
    if solution is None:
        return f"| {call} | {budget} | {limit} | - | - | {seconds:.3f} |"
    return (
        f"| {call} | {budget} | {limit} | {solution.total_loss:.6g} | "
        f"{solution.total_cost:.6g} | {seconds:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="number of layers")
    parser.add_argument("--heads", type=int, default=32, help="groups (heads) per layer")
    parser.add_argument("--candidates", type=int, default=48, help="candidate windows per group")
    parser.add_argument("--seq-len", type=int, default=8192, help="sequence length in tokens")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.1, 0.25, 0.5, 0.75],
        help="budgets to time, as mean relative attention cost in (0, 1]",
    )
    parser.add_argument(
        "--distinct",
        type=int,
        nargs="*",
        default=[2, 4, 8, 16],
        help="max_distinct_per_layer values to time at --distinct-budget",
    )
    parser.add_argument(
        "--distinct-budget", type=float, default=0.25, help="budget for the distinct rows"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per row without the distinct limit"
    )
    parser.add_argument(
        "--distinct-repeats", type=int, default=1, help="timed calls per distinct row"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instance")
    parser.add_argument(
        "--fit-evaluations",
        type=int,
        nargs="*",
        default=[100, 300],
        help="numbers of evaluated configs the timed fitted rounds learn from",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.distinct_repeats < 1:
        parser.error("--repeats and --distinct-repeats must be >= 1")

    loss, cost, layer = build_instance(
        args.layers, args.heads, args.candidates, args.seq_len, args.seed
    )
    print(
        f"{loss.shape[0]} groups x {args.candidates} candidates, seq_len {args.seq_len}, "
        f"seed {args.seed}; python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, {os.cpu_count()} CPUs; median of {args.repeats} "
        f"({args.distinct_repeats} for distinct rows)"
    )
    print()
    print("| call | budget | max distinct | total loss | total cost | seconds |")
    print("|---|---|---|---|---|---|")

    # Warm up imports and HiGHS so that the first timed row does not pay for them.
    solve_knapsack(loss[:64], cost[:64], 0.2, layer_of_group=layer[:64], max_distinct_per_layer=2)

    for budget in args.budgets:
        call = partial(solve_knapsack, loss, cost, budget)
        solution, seconds = time_calls(call, args.repeats)
        print(table_row("solve_knapsack", str(budget), "-", solution, seconds))

    for limit in args.distinct:
        call = partial(
            solve_knapsack,
            loss,
            cost,
            args.distinct_budget,
            layer_of_group=layer,
            max_distinct_per_layer=limit,
        )
        solution, seconds = time_calls(call, args.distinct_repeats)
        print(
            table_row("solve_knapsack", str(args.distinct_budget), str(limit), solution, seconds)
        )

    front, seconds = time_calls(partial(solve_front, loss, cost), args.repeats)
    print(table_row(f"solve_front, default grid, {len(front)} points", "-", "-", None, seconds))
    front_call = partial(solve_front, loss, cost, budgets=args.budgets)
    front, seconds = time_calls(front_call, args.repeats)
    print(table_row(f"solve_front, {len(args.budgets)} budgets", "-", "-", None, seconds))

    for evaluations in args.fit_evaluations:
        strategy, configs, increases = fitted_round_inputs(loss, cost, args, evaluations)
        call = partial(strategy.fitted_configs, configs, increases)
        _, seconds = time_calls(call, args.repeats)
        label = f"fitted round, {evaluations} evaluations"
        print(table_row(label, str(args.budgets[-1]), "-", None, seconds))


def fitted_round_inputs(
    loss: np.ndarray, cost: np.ndarray, args: argparse.Namespace, evaluations: int
) -> tuple[ProfileStrategy, list[list[int | None]], list[float]]:
    """Build a profile strategy over the instance and random evaluated configs to fit it to.

    The measured NLL increase of a config is twice the sum of its losses, with noise: restrictions
    compound, so the measurements exceed what the estimates add up to.
    """
    rng = np.random.default_rng(args.seed + 1)
    shape = ModelShape(
        model_id="synthetic",
        architecture="synthetic",
        num_layers=args.layers,
        num_query_heads=args.heads,
        num_kv_heads=args.heads,
        max_positions=args.seq_len,
    )
    groups = HeadGroups(shape, Granularity.KV_HEAD)
    windows: list[int | None] = [
        int(w) for w in np.geomspace(32, args.seq_len, args.candidates)[:-1].round()
    ]
    windows.append(None)
    strategy = ProfileStrategy(groups, windows, loss, cost, budget=args.budgets[-1])
    strategy.set_uniform_increase(2 * loss.sum(axis=0))
    choices = rng.integers(0, args.candidates, size=(evaluations, loss.shape[0]))
    rows = np.arange(loss.shape[0])
    increases = [2 * loss[rows, choice].sum() + rng.normal(0.0, 0.01) for choice in choices]
    configs = [[windows[index] for index in choice] for choice in choices]
    return strategy, configs, increases


if __name__ == "__main__":
    main()
