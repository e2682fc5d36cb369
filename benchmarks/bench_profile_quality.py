"""Measure how well the head profile predicts the exact NLL increase of windowed configs.

Prints markdown tables to stdout. Run from the repository root:

    python benchmarks/bench_profile_quality.py

The model is profiled once with both estimators (:func:`moa_search.profile.profile_estimators`)
on the calibration sequences, with the candidate windows of ``--space`` and its sink tokens. Then
three sets of configs are evaluated exactly with :func:`moa_search.evaluate.negative_log_likelihood`
over the same sequences, and each exact NLL increase (mean NLL per predicted token minus the dense
one) is compared with predictions:

- single heads: every (layer, query head) alone at each of ``--single-windows``, all other heads
  full. The prediction is that head's estimate.
- random configs: one window per KV head. Each config draws a centre ``c`` uniformly from the
  candidate indices, where full attention is the last index. Each KV head then takes the
  candidate at ``round(c + N(0, --spread))``, clipped to the index range. So the configs spread
  from nearly all-smallest to nearly all-full windows.
- shuffled configs: the ``--single-windows`` and full attention, spread equally over the KV heads
  and shuffled. Every config has the same cost, so only the choice of which heads get the small
  windows differs, which is the choice the profile has to guide.

Predictions of a whole config:

- ``set`` and ``additive``: :meth:`moa_search.profile.HeadProfile.predict_loss_increase`, the sum
  of the heads' estimates.
- ``set + uniform term``: the decoded loss of the profile strategy
  (:mod:`moa_search.search.profile_strategy`) with all its parameters neutral (log2 scales and log2
  mix 0). Each KV head adds its estimate plus the measured NLL increase of the uniform config at its
  window divided by the number of KV heads. The uniform configs are measured here too.
- ``uniform term only`` and ``negated cost only``: references that use no profile. The modelled
  attention cost is negated so that, like the others, a larger value predicts a larger loss. It is
  not in NLL units, so its scale column is left empty.

Spearman's rho measures whether a predictor ranks configs right, which is what a search needs.
Pearson's r and the ratio of summed measured to summed predicted increase show whether the
estimates also have the right scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from moa_search.attention import apply_windows, set_windows
from moa_search.cost import mean_area_density
from moa_search.data import load_calibration_data
from moa_search.evaluate import negative_log_likelihood
from moa_search.models import load_model, model_shape
from moa_search.profile import HeadProfile, profile_estimators
from moa_search.search.groups import HeadGroups
from moa_search.search.profile_strategy import group_loss
from moa_search.space import load_space

ESTIMATORS = ("set", "additive")

Windows = list[list[int | None]]
GroupWindows = list[int | None]


def mean_nll(model: torch.nn.Module, ids: torch.Tensor, windows: Windows, sink_tokens: int, batch_size: int) -> float:
    """Return the exact mean NLL per predicted token of the model restricted to ``windows``."""
    set_windows(model, windows, sink_tokens)
    total, count = negative_log_likelihood(model, ids, batch_size=batch_size)
    return total / count


def correlation_row(
    label: str, predictor: str, predicted: np.ndarray, measured: np.ndarray, in_nll: bool = True
) -> dict:
    """Compare a predictor with the measured NLL increases of one set of configs."""
    return {
        "set": label,
        "predictor": predictor,
        "configs": len(measured),
        "spearman": float(spearmanr(predicted, measured).statistic),
        "pearson": float(pearsonr(predicted, measured).statistic),
        "measured_over_predicted": float(measured.sum() / predicted.sum()) if in_nll else None,
    }


def single_head_configs(
    layers: int, heads: int, windows: list[int]
) -> list[tuple[int, int, int, Windows]]:
    """Return ``(layer, head, window, windows)`` for every head alone at every window."""
    configs = []
    for layer in range(layers):
        for head in range(heads):
            for window in windows:
                config: Windows = [[None] * heads for _ in range(layers)]
                config[layer][head] = window
                configs.append((layer, head, window, config))
    return configs


def random_group_windows(
    candidates: GroupWindows, num_groups: int, spread: float, rng: np.random.Generator
) -> GroupWindows:
    """Draw one config: every group's candidate index scatters around a random centre."""
    last = len(candidates) - 1
    centre = rng.uniform(0, last)
    indices = np.clip(np.rint(centre + rng.normal(0.0, spread, num_groups)), 0, last).astype(int)
    return [candidates[index] for index in indices]


def shuffled_group_windows(windows: GroupWindows, num_groups: int, count: int, seed: int) -> list[GroupWindows]:
    """Spread ``windows`` equally over the groups, then return ``count`` distinct shuffles.

    Raises:
        ValueError: when fewer than ``count`` distinct arrangements exist.
    """
    base = [windows[index % len(windows)] for index in range(num_groups)]
    arrangements = math.factorial(num_groups)
    for window in set(base):
        arrangements //= math.factorial(base.count(window))
    if count > arrangements:
        raise ValueError(f"{count} shuffled configs requested, but only {arrangements} distinct ones exist")
    generator = random.Random(seed)
    configs: list[GroupWindows] = []
    seen: set[tuple[int | None, ...]] = set()
    while len(configs) < count:
        config = base[:]
        generator.shuffle(config)
        if tuple(config) not in seen:
            seen.add(tuple(config))
            configs.append(config)
    return configs


def measure(
    evaluate: Callable[[Windows], float], configs: list[Windows], dense: float
) -> tuple[np.ndarray, float]:
    """Return the exact NLL increase of every config and the seconds it took."""
    start = time.perf_counter()
    increases = np.array([evaluate(config) - dense for config in configs])
    return increases, time.perf_counter() - start


def whole_config_predictions(
    group_configs: list[GroupWindows],
    groups: HeadGroups,
    profiles: dict[str, HeadProfile],
    candidates: GroupWindows,
    uniform_increase: np.ndarray,
    costs: list[float],
) -> dict[str, tuple[np.ndarray, bool]]:
    """Return predictor name -> (prediction per config, whether it is in NLL units)."""
    columns = np.array([[candidates.index(window) for window in config] for config in group_configs])
    rows = np.arange(groups.num_groups)
    set_per_group = group_loss(profiles["set"], groups)  # [groups, candidates]
    uniform_term = (uniform_increase / groups.num_groups)[columns].sum(axis=1)
    predictions = {
        name: (np.array([profile.predict_loss_increase(groups.expand(c)) for c in group_configs]), True)
        for name, profile in profiles.items()
    }
    predictions["set + uniform term"] = (set_per_group[rows, columns].sum(axis=1) + uniform_term, True)
    predictions["uniform term only"] = (uniform_term, True)
    predictions["negated cost only"] = (-np.asarray(costs), False)
    return predictions


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
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--space", default="default", help="search space name or YAML path")
    parser.add_argument(
        "--single-windows",
        type=int,
        nargs="+",
        default=[16, 64, 128],
        help="windows in tokens tried on every head alone; each must be a candidate of --space",
    )
    parser.add_argument("--configs", type=int, default=60, help="random whole configs")
    parser.add_argument(
        "--spread",
        type=float,
        default=2.0,
        help="standard deviation, in candidate indices, of a KV head's window around its config's centre",
    )
    parser.add_argument("--shuffled-configs", type=int, default=30, help="shuffled configs of equal cost")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random and shuffled configs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 keeps timings steady on a shared machine"
    )
    parser.add_argument("--json", default=None, help="also write every prediction and measurement here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    space = load_space(args.space)
    candidates = list(space.candidates(args.seq_len))
    missing = [window for window in args.single_windows if window not in candidates]
    if missing:
        parser.error(f"--single-windows {missing} are not candidates of space {space.name!r}: {candidates}")
    sink_tokens = space.sink_tokens

    model, tokenizer = load_model(args.model, dtype="float32")
    shape = model_shape(model)
    groups = HeadGroups(shape, space.granularity)
    ids = load_calibration_data(
        tokenizer,
        args.dataset,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        holdout=0,
        max_positions=shape.max_positions,
    ).calibration

    start = time.perf_counter()
    profiles: dict[str, HeadProfile] = profile_estimators(
        model,
        ids,
        candidates,
        sink_tokens=sink_tokens,
        estimators=ESTIMATORS,
        batch_size=args.batch_size,
    )
    profile_seconds = time.perf_counter() - start

    full = groups.expand([None] * groups.num_groups)
    apply_windows(model, full, sink_tokens)

    def evaluate(windows: Windows) -> float:
        return mean_nll(model, ids, windows, sink_tokens, args.batch_size)

    dense = evaluate(full)

    # Single heads.
    singles = single_head_configs(shape.num_layers, shape.num_query_heads, args.single_windows)
    single_measured, single_seconds = measure(evaluate, [entry[3] for entry in singles], dense)
    single_predicted = {
        name: np.array(
            [profile.loss_increase[layer, head, candidates.index(window)] for layer, head, window, _ in singles]
        )
        for name, profile in profiles.items()
    }

    # Uniform configs, for the profile strategy's uniform term.
    uniform_configs = [groups.expand([window] * groups.num_groups) for window in candidates]
    uniform_increase, uniform_seconds = measure(evaluate, uniform_configs, dense)

    # Random and shuffled whole configs.
    rng = np.random.default_rng(args.seed)
    random_groups = [
        random_group_windows(candidates, groups.num_groups, args.spread, rng) for _ in range(args.configs)
    ]
    shuffle_windows: GroupWindows = [*args.single_windows, None]
    shuffled_groups = shuffled_group_windows(shuffle_windows, groups.num_groups, args.shuffled_configs, args.seed)
    whole_sets = {"random configs": random_groups, "shuffled configs": shuffled_groups}
    whole_results = {}
    for label, group_configs in whole_sets.items():
        configs = [groups.expand(config) for config in group_configs]
        measured, seconds = measure(evaluate, configs, dense)
        costs = [mean_area_density(config, [args.seq_len], sink_tokens) for config in configs]
        predictions = whole_config_predictions(
            group_configs, groups, profiles, candidates, uniform_increase, costs
        )
        whole_results[label] = (group_configs, measured, seconds, costs, predictions)

    rows = []
    for name in ESTIMATORS:
        rows.append(correlation_row("single heads", name, single_predicted[name], single_measured))
        for window in args.single_windows:
            chosen = np.array([entry[2] == window for entry in singles])
            rows.append(
                correlation_row(
                    f"single heads, W={window}", name, single_predicted[name][chosen], single_measured[chosen]
                )
            )
    for label, (_, measured, _, _, predictions) in whole_results.items():
        for name, (predicted, in_nll) in predictions.items():
            if np.allclose(predicted, predicted[0], rtol=1e-9, atol=0.0):
                continue  # Constant over the set, like cost on shuffled configs, so it ranks nothing.
            rows.append(correlation_row(label, name, predicted, measured, in_nll))

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"{shape.architecture}, {args.num_samples} x {args.seq_len} tokens, space {space.name!r} "
        f"(candidates {candidates}), sink_tokens {sink_tokens}, dense mean NLL {dense:.5f} "
        f"(profile's {profiles['set'].dense_nll:.5f}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {load} at the end"
    )
    print()
    print("| configs | predictor | n | Spearman rho | Pearson r | measured / predicted (sums) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        scale = "-" if row["measured_over_predicted"] is None else f"{row['measured_over_predicted']:.2f}"
        print(
            f"| {row['set']} | {row['predictor']} | {row['configs']} | {row['spearman']:.3f} | "
            f"{row['pearson']:.3f} | {scale} |"
        )
    print()
    for label, (_, measured, _, costs, _) in whole_results.items():
        print(
            f"- {label}: cost {min(costs):.3f} to {max(costs):.3f}, measured NLL increase "
            f"{measured.min():.4f} to {measured.max():.4f}."
        )
    print(
        "- uniform configs, measured NLL increase: "
        + ", ".join(
            f"{'full' if window is None else window}: {increase:.4f}"
            for window, increase in zip(candidates, uniform_increase, strict=True)
        )
        + "."
    )
    print()
    print("| step | exact evaluations | seconds |")
    print("|---|---|---|")
    print(f"| profile, both estimators, one pass | - | {profile_seconds:.1f} |")
    print(f"| single heads | {len(singles)} | {single_seconds:.1f} |")
    print(f"| uniform configs | {len(uniform_configs)} | {uniform_seconds:.1f} |")
    for label, (group_configs, _, seconds, _, _) in whole_results.items():
        print(f"| {label} | {len(group_configs)} | {seconds:.1f} |")

    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                {
                    "dense_nll": dense,
                    "candidates": candidates,
                    "uniform_increase": uniform_increase.tolist(),
                    "rows": rows,
                    "seconds": {
                        "profile": profile_seconds,
                        "single_heads": single_seconds,
                        "uniform": uniform_seconds,
                        **{label: result[2] for label, result in whole_results.items()},
                    },
                    "single_heads": [
                        {
                            "layer": layer,
                            "head": head,
                            "window": window,
                            "measured": float(single_measured[index]),
                            **{name: float(single_predicted[name][index]) for name in ESTIMATORS},
                        }
                        for index, (layer, head, window, _) in enumerate(singles)
                    ],
                    **{
                        label: [
                            {
                                "group_windows": group_configs[index],
                                "cost": costs[index],
                                "measured": float(measured[index]),
                                **{name: float(values[index]) for name, (values, _) in predictions.items()},
                            }
                            for index in range(len(group_configs))
                        ]
                        for label, (group_configs, measured, _, costs, predictions) in whole_results.items()
                    },
                },
                stream,
                indent=2,
            )


if __name__ == "__main__":
    main()
