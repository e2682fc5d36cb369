"""Compare search strategies by exact evaluations to a good front, and fronts against uniform windows.

Prints markdown tables to stdout and progress to stderr. Run from the repository root:

    python benchmarks/bench_search.py

Every method runs the real pipeline (:func:`moa_search.pipeline.run_search`) once per seed on the
same calibration and held-out sequences, into its own run folder:

- ``profile + tpe``: the profile-guided strategy with the TPE sampler, ``--profile-trials`` trials.
- ``direct + tpe`` and ``direct + nsga2``: one parameter per KV head, ``--direct-trials`` trials.

Trial counts include the uniform-window baselines that every study evaluates first.

Exact evaluations are the finished trials whose perplexity was computed, that is, all but those
the objective marked with the ``reused_trial`` attribute because an earlier trial had the same
config. Not counted are the dense perplexity that every run measures before its study, the
profile pass and the held-out validation, but the wall time column includes them.

Hypervolume is measured in (cost, calibration NLL increase) space, both minimised, where the NLL
increase is ``log(perplexity / dense perplexity)``. The reference point is (``--budget``, NLL
increase of the cheapest uniform baseline), so only feasible configs (cost <= budget) that beat
the cheapest uniform window add volume. The reference front is the non-dominated set of every
feasible config that any method and seed evaluated. For each run, the hypervolume of its own
evaluated configs is traced after each exact evaluation, and the table shows the first
evaluation at which it reaches each of ``--hv-shares`` of the reference front's hypervolume.

The front-versus-uniform table compares, at each of ``--compare-budgets``, the best held-out
perplexity of a run's front members with cost <= that budget (the pipeline validates every front
member on the held-out sequences) with the best uniform-window config of cost <= that budget,
also on the held-out sequences. The ratio is the perplexity increase over dense attention of the
front's best divided by that of the uniform one, so below 1 means the search beat uniform windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from moa_search.export import load_run
from moa_search.models import load_model
from moa_search.pipeline import RunHooks, model_info_of, run_search
from moa_search.runs import RunFolder, RunSettings
from moa_search.search.evaluator import WindowEvaluator
from moa_search.search.hypervolume import hypervolume, non_dominated
from moa_search.search.strategies import SEED_LABEL_ATTR
from moa_search.search.study import completed_trials
from moa_search.space import load_space

# Method label -> (strategy, sampler).
METHODS = {
    "profile + tpe": ("profile", "tpe"),
    "direct + tpe": ("direct", "tpe"),
    "direct + nsga2": ("direct", "nsga2"),
}

Point = tuple[float, float]  # (cost, NLL increase)


@dataclass
class RunRecord:
    """Evaluated configs and held-out front of one (method, seed) run."""

    method: str
    seed: int
    seconds: float
    profile_seconds: float
    trials: int
    evaluations: list[Point] = field(default_factory=list)  # in evaluation order
    front: list[dict] = field(default_factory=list)  # front members with held-out perplexities
    dense_perplexity: float = 0.0
    dense_holdout_perplexity: float = 0.0
    uniform: list[dict] = field(default_factory=list)  # uniform baselines: window, cost, NLL increase
    seeded_evaluations: int = 0  # leading evaluations that were seed trials (baselines, surrogate optima)
    hv_trace: list[float] = field(default_factory=list)


def evaluations_to_reach(trace: list[float], target: float) -> int | None:
    """Return the 1-based evaluation at which ``trace`` first reaches ``target``, or None."""
    for index, value in enumerate(trace):
        if value >= target:
            return index + 1
    return None


def median_count(counts: list[int | None]) -> float | None:
    """Return the median, counting None as never reached, or None when the median is never reached."""
    values = sorted(math.inf if count is None else count for count in counts)
    median = statistics.median(values)
    return None if math.isinf(median) else median


def make_settings(
    args: argparse.Namespace, model: torch.nn.Module, folder: RunFolder, method: str, seed: int
) -> RunSettings:
    strategy, sampler = METHODS[method]
    space = load_space(args.space)
    trials = args.profile_trials if strategy == "profile" else args.direct_trials
    return RunSettings(
        model=args.model,
        dataset=args.dataset,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        holdout=args.holdout,
        batch_size=args.batch_size,
        budget=args.budget,
        trials=trials,
        seed=seed,
        sampler=sampler,
        strategy=strategy,
        estimator=args.estimator,
        space=space,
        candidates=list(space.candidates(args.seq_len)),
        cost_lengths=[args.seq_len],
        storage=folder.default_storage(),
        study_name=folder.name,
        model_info=model_info_of(model, args.model),
    )


def run_method(
    args: argparse.Namespace, model: torch.nn.Module, tokenizer, root: Path, method: str, seed: int
) -> RunRecord:
    """Run one study through the pipeline and read back its evaluations and validated front."""
    folder = RunFolder(root / f"{method.replace(' + ', '-')}-seed{seed}")
    settings = make_settings(args, model, folder, method, seed)
    stages: list[tuple[float, str]] = []
    hooks = RunHooks(stage=lambda message: stages.append((time.perf_counter(), message)))
    start = time.perf_counter()
    outcome = run_search(settings, folder, model=model, tokenizer=tokenizer, hooks=hooks)
    seconds = time.perf_counter() - start
    if outcome.interrupted:
        raise SystemExit(f"run {folder.name} was interrupted; its numbers would be incomplete")

    profile_seconds = 0.0
    for index, (stamp, message) in enumerate(stages):
        if message.startswith("profiling heads") and index + 1 < len(stages):
            profile_seconds = stages[index + 1][0] - stamp

    results = outcome.results
    dense = results.metrics["dense_perplexity"]
    record = RunRecord(
        method=method,
        seed=seed,
        seconds=seconds,
        profile_seconds=profile_seconds,
        trials=len(completed_trials(results.study)),
        dense_perplexity=dense,
        dense_holdout_perplexity=results.metrics["dense_holdout_perplexity"],
    )
    for trial in sorted(completed_trials(results.study), key=lambda trial: trial.number):
        increase = math.log(trial.values[0] / dense)
        label = trial.user_attrs.get(SEED_LABEL_ATTR)
        if label is not None and label.startswith("uniform"):
            window = trial.user_attrs["group_windows"][0]
            record.uniform.append({"window": window, "cost": trial.values[1], "increase": increase})
        if "reused_trial" not in trial.user_attrs:
            record.evaluations.append((trial.values[1], increase))
            record.seeded_evaluations += label is not None
    record.front = [
        {
            "trial": member.trial,
            "cost": member.cost,
            "perplexity": member.perplexity,
            "holdout_perplexity": member.holdout_perplexity,
            "group_windows": member.group_windows,
        }
        for member in results.front()
    ]
    return record


def uniform_holdout(model: torch.nn.Module, folder: RunFolder) -> list[dict]:
    """Measure every uniform-window config on the held-out sequences that a run stored."""
    run = load_run(folder)
    groups = run.groups
    evaluator = WindowEvaluator(
        model,
        folder.read_data()["holdout"],
        num_kv_heads=groups.shape.num_kv_heads,
        sink_tokens=run.settings.space.sink_tokens,
        cost_lengths=run.settings.cost_lengths,
        batch_size=run.settings.batch_size,
    )
    rows = []
    for window in run.settings.candidates:
        windows = groups.expand([window] * groups.num_groups)
        cost, _ = evaluator.cost(windows)
        rows.append({"window": window, "cost": cost, "holdout_perplexity": evaluator.perplexity(windows)})
    return rows


def format_count(value: float | None) -> str:
    if value is None:
        return "not reached"
    return f"{value:g}"


def print_efficiency(records: list[RunRecord], args: argparse.Namespace, reference_hv: float) -> dict:
    """Print the evaluations-to-target table; returns the median counts per (method, share)."""
    shares = " | ".join(
        f"evaluations to {share:.0%} of reference HV, per seed | median" for share in args.hv_shares
    )
    print(
        f"| method | trials | exact evaluations, median | {shares} | final HV / reference, median | "
        "HV / reference after the baselines | HV / reference after all seed trials (count) | "
        "wall s, median (profile s) |"
    )
    print("|---|---|---|" + "---|---|" * len(args.hv_shares) + "---|---|---|---|")
    medians = {}
    for method in args.methods:
        runs = [record for record in records if record.method == method]
        cells = []
        for share in args.hv_shares:
            counts = [evaluations_to_reach(record.hv_trace, share * reference_hv) for record in runs]
            medians[method, share] = median_count(counts)
            per_seed = ", ".join(format_count(count) for count in counts)
            cells.append(f"{per_seed} | {format_count(medians[method, share])}")
        baselines = len(runs[0].uniform)
        after_baselines = statistics.median(record.hv_trace[baselines - 1] / reference_hv for record in runs)
        final = statistics.median(record.hv_trace[-1] / reference_hv for record in runs)
        seeded = statistics.median(record.seeded_evaluations for record in runs)
        after_seeds = statistics.median(
            record.hv_trace[record.seeded_evaluations - 1] / reference_hv for record in runs
        )
        wall = statistics.median(record.seconds for record in runs)
        profile = statistics.median(record.profile_seconds for record in runs)
        evaluations = statistics.median(len(record.evaluations) for record in runs)
        print(
            f"| {method} | {runs[0].trials} | {evaluations:g} | {' | '.join(cells)} | {final:.3f} | "
            f"{after_baselines:.3f} | {after_seeds:.3f} ({seeded:g}) | {wall:.0f} ({profile:.1f}) |"
        )
    return medians


def median_share_at(runs: list[RunRecord], evaluations: int, reference_hv: float) -> float | None:
    """Return the median HV share after ``evaluations`` exact evaluations, or None if a run made fewer."""
    if any(len(record.hv_trace) < evaluations for record in runs):
        return None
    return statistics.median(record.hv_trace[evaluations - 1] / reference_hv for record in runs)


def print_checkpoints(records: list[RunRecord], args: argparse.Namespace, reference_hv: float) -> None:
    """Print each method's median HV share after fixed numbers of exact evaluations."""
    print("Median over seeds of HV / reference HV after n exact evaluations (- where a run made fewer):")
    print()
    header = " | ".join(f"n={count}" for count in args.checkpoints)
    print(f"| method | {header} |")
    print("|---|" + "---|" * len(args.checkpoints))
    for method in args.methods:
        runs = [record for record in records if record.method == method]
        cells = []
        for count in args.checkpoints:
            share = median_share_at(runs, count, reference_hv)
            cells.append("-" if share is None else f"{share:.3f}")
        print(f"| {method} | {' | '.join(cells)} |")


def print_speedups(
    records: list[RunRecord], args: argparse.Namespace, medians: dict, reference_hv: float
) -> None:
    """Print how many times more evaluations each direct method needs than the profile strategy.

    Besides the ``--hv-shares`` targets, the target is also the HV share that the profile strategy's
    runs end with (median), so a ratio exists even when no method reaches the fixed targets.
    """
    reference_method = "profile + tpe"
    if reference_method not in args.methods:
        return
    profile_runs = [record for record in records if record.method == reference_method]
    final_share = statistics.median(record.hv_trace[-1] / reference_hv for record in profile_runs)
    targets = {share: medians for share in args.hv_shares}
    counts = [evaluations_to_reach(record.hv_trace, final_share * reference_hv) for record in profile_runs]
    targets[final_share] = {(reference_method, final_share): median_count(counts)}
    for method in args.methods:
        if method == reference_method:
            continue
        runs = [record for record in records if record.method == method]
        counts = [evaluations_to_reach(record.hv_trace, final_share * reference_hv) for record in runs]
        targets[final_share][method, final_share] = median_count(counts)

    for share, table in targets.items():
        label = f"{share:.1%} of the reference HV"
        if share == final_share:
            label += f" ({reference_method}'s median final share)"
        profile_median = table[reference_method, share]
        if profile_median is None:
            print(f"- {label}: {reference_method} does not reach it (median over seeds); no ratio.")
            continue
        for method in args.methods:
            if method == reference_method:
                continue
            median = table[method, share]
            if median is not None:
                print(
                    f"- {label}: {method} needs {median:g} evaluations, {median / profile_median:.2f}x "
                    f"the {profile_median:g} of {reference_method}."
                )
                continue
            evaluations = statistics.median(len(record.evaluations) for record in records if record.method == method)
            print(
                f"- {label}: {method} does not reach it in {evaluations:g} evaluations, so it needs more than "
                f"{evaluations / profile_median:.2f}x the {profile_median:g} of {reference_method}."
            )


def print_front_vs_uniform(records: list[RunRecord], uniform: list[dict], args: argparse.Namespace) -> list[dict]:
    """Print the held-out comparison of the fronts with uniform windows at each budget."""
    dense_holdout = records[0].dense_holdout_perplexity
    print(
        "| budget | best uniform (cost) | uniform held-out ppl | method | front best held-out ppl, median "
        "| Δppl front / Δppl uniform, median [min, max] |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for budget in args.compare_budgets:
        affordable = [row for row in uniform if row["cost"] <= budget]
        if not affordable:
            print(f"| {budget:g} | none | - | - | - | - |")
            continue
        best_uniform = min(affordable, key=lambda row: row["holdout_perplexity"])
        uniform_delta = best_uniform["holdout_perplexity"] - dense_holdout
        window = "full" if best_uniform["window"] is None else f"W={best_uniform['window']}"
        for method in args.methods:
            bests, ratios = [], []
            for record in (record for record in records if record.method == method):
                members = [
                    member["holdout_perplexity"]
                    for member in record.front
                    if member["cost"] <= budget and member["holdout_perplexity"] is not None
                ]
                if not members:
                    continue
                bests.append(min(members))
                ratios.append((min(members) - dense_holdout) / uniform_delta)
            if not bests:
                print(f"| {budget:g} | {window} ({best_uniform['cost']:.3f}) | ... | {method} | none | - |")
                continue
            print(
                f"| {budget:g} | {window} ({best_uniform['cost']:.3f}) | "
                f"{best_uniform['holdout_perplexity']:.4f} | {method} | {statistics.median(bests):.4f} | "
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}] |"
            )
            rows.append(
                {
                    "budget": budget,
                    "method": method,
                    "uniform": best_uniform,
                    "front_best_holdout": bests,
                    "ratios": ratios,
                }
            )
    print()
    print(f"Dense held-out perplexity {dense_holdout:.4f}.")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="../shared/models/stories260K", help="model folder")
    parser.add_argument(
        "--dataset",
        default="../shared/data/tinystories_subset.txt",
        help="text file the sequences are cut from",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--holdout", type=int, default=8, help="held-out sequences")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--budget", type=float, default=0.5, help="cost budget of every study")
    parser.add_argument("--space", default="default", help="search space name or YAML path")
    parser.add_argument("--estimator", default="set", choices=("set", "additive"), help="profile estimator")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds")
    parser.add_argument(
        "--direct-trials", type=int, default=240, help="finished trials per direct study, baselines included"
    )
    parser.add_argument(
        "--profile-trials", type=int, default=120, help="finished trials per profile study, baselines included"
    )
    parser.add_argument(
        "--hv-shares",
        type=float,
        nargs="+",
        default=[0.9, 0.95],
        help="shares of the reference hypervolume a run must reach, one table column pair each",
    )
    parser.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        default=[10, 20, 40, 60, 120, 240],
        help="exact evaluation counts at which the HV share table reads each run's trace",
    )
    parser.add_argument(
        "--compare-budgets",
        type=float,
        nargs="+",
        default=[0.1, 0.25, 0.5],
        help="budgets of the front-versus-uniform table; each at most --budget",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 keeps timings steady on a shared machine"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="keep the run folders here (must not hold runs of the same names); default a temporary folder",
    )
    parser.add_argument("--json", default=None, help="also write every run's evaluations and front here")
    args = parser.parse_args()
    if any(budget > args.budget for budget in args.compare_budgets):
        parser.error(f"--compare-budgets {args.compare_budgets} must not exceed --budget {args.budget}")

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model, tokenizer = load_model(args.model, dtype="float32")

    with tempfile.TemporaryDirectory(prefix="bench-search-") as temporary:
        root = Path(args.output_dir or temporary)
        records: list[RunRecord] = []
        # Seeds outer, methods inner, so a change of machine load hits every method alike.
        for seed in args.seeds:
            for method in args.methods:
                record = run_method(args, model, tokenizer, root, method, seed)
                records.append(record)
                print(
                    f"{method} seed {seed}: {record.trials} trials, {len(record.evaluations)} exact "
                    f"evaluations, {record.seconds:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        first_folder = RunFolder(root / f"{args.methods[0].replace(' + ', '-')}-seed{args.seeds[0]}")
        uniform = uniform_holdout(model, first_folder)

    dense_values = {round(record.dense_perplexity, 10) for record in records}
    if len(dense_values) != 1:
        raise SystemExit(f"runs measured different dense perplexities {sorted(dense_values)}; the data differ")

    cheapest = min(records[0].uniform, key=lambda row: row["cost"])
    reference = (args.budget, cheapest["increase"])
    feasible = [point for record in records for point in record.evaluations if point[0] <= args.budget]
    reference_front = non_dominated(feasible)
    reference_hv = hypervolume(reference_front, reference)
    run_points = [set(record.evaluations) for record in records]
    method_runs = {
        method: [index for index, record in enumerate(records) if record.method == method] for method in args.methods
    }
    for record in records:
        record.hv_trace = [
            hypervolume(record.evaluations[: count + 1], reference) for count in range(len(record.evaluations))
        ]

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"{Path(args.model).name}: {args.num_samples} calibration + {args.holdout} held-out sequences of "
        f"{args.seq_len} tokens, space {args.space!r}, budget {args.budget}, seeds {args.seeds}, "
        f"torch {torch.__version__}, optuna {optuna.__version__}, {args.threads} thread(s), "
        f"load average {load} at the end"
    )
    print()
    print(
        f"Reference point (cost {reference[0]:g}, NLL increase {reference[1]:.4f} of uniform W={cheapest['window']}); "
        f"reference front: {len(reference_front)} configs from {len(feasible)} feasible evaluations, "
        f"hypervolume {reference_hv:.6f}."
    )
    found_by = ", ".join(
        f"{method} {sum(any(point in run_points[record_index] for record_index in indices) for point in reference_front)}"
        for method, indices in method_runs.items()
    )
    print(f"Reference front configs found by each method (any seed): {found_by}.")
    print()
    medians = print_efficiency(records, args, reference_hv)
    print()
    print_checkpoints(records, args, reference_hv)
    print()
    print_speedups(records, args, medians, reference_hv)
    print()
    comparison = print_front_vs_uniform(records, uniform, args)

    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                {
                    "reference_point": reference,
                    "reference_front": reference_front,
                    "reference_hypervolume": reference_hv,
                    "uniform_holdout": uniform,
                    "front_vs_uniform": comparison,
                    "runs": [record.__dict__ for record in records],
                },
                stream,
                indent=2,
            )


if __name__ == "__main__":
    main()
