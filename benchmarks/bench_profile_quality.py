"""Measure how well the head profile predicts the exact NLL increase of windowed configs.

Prints markdown tables to stdout. Run from the repository root:

    python benchmarks/bench_profile_quality.py

The model is profiled once with both estimators (:func:`moa_search.profile.profile_estimators`)
on the calibration sequences, with the candidate windows of ``--space`` and its sink tokens. Then
two sets of configs are evaluated exactly with :func:`moa_search.evaluate.negative_log_likelihood`
over the same sequences, and each exact NLL increase (mean NLL per predicted token minus the dense
one) is compared with the prediction:

- single heads: every (layer, query head) alone at each of ``--single-windows``, all other heads
  full; the prediction is that head's estimate.
- random configs: one window per KV head. Each config draws a centre ``c`` uniformly from the
  candidate indices, where full attention is the last index. Each KV head then takes the
  candidate at ``round(c + N(0, --spread))``, clipped to the index range. So the configs spread
  from nearly all-smallest to nearly all-full windows. The prediction is
  :meth:`moa_search.profile.HeadProfile.predict_loss_increase`, the sum of the heads' estimates.

Spearman's rho measures whether the profile ranks configs right, which is what a search needs.
Pearson's r and the ratio of summed measured to summed predicted increase show whether the
estimates also have the right scale.
"""

from __future__ import annotations

import argparse
import json
import os
import time

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
from moa_search.space import load_space

ESTIMATORS = ("set", "additive")

Windows = list[list[int | None]]


def mean_nll(model: torch.nn.Module, ids: torch.Tensor, windows: Windows, sink_tokens: int, batch_size: int) -> float:
    """Return the exact mean NLL per predicted token of the model restricted to ``windows``."""
    set_windows(model, windows, sink_tokens)
    total, count = negative_log_likelihood(model, ids, batch_size=batch_size)
    return total / count


def correlation_row(label: str, estimator: str, predicted: np.ndarray, measured: np.ndarray) -> dict:
    """Compare predicted and measured NLL increases of one set of configs."""
    rho = spearmanr(predicted, measured).statistic
    r = pearsonr(predicted, measured).statistic
    return {
        "set": label,
        "estimator": estimator,
        "configs": len(measured),
        "spearman": float(rho),
        "pearson": float(r),
        "measured_over_predicted": float(measured.sum() / predicted.sum()),
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
    candidates: list[int | None], num_groups: int, spread: float, rng: np.random.Generator
) -> list[int | None]:
    """Draw one config: every group's candidate index scatters around a random centre."""
    last = len(candidates) - 1
    centre = rng.uniform(0, last)
    indices = np.clip(np.rint(centre + rng.normal(0.0, spread, num_groups)), 0, last).astype(int)
    return [candidates[index] for index in indices]


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the random configs")
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

    full: Windows = [[None] * shape.num_query_heads for _ in range(shape.num_layers)]
    apply_windows(model, full, sink_tokens)
    dense = mean_nll(model, ids, full, sink_tokens, args.batch_size)

    # Single heads.
    start = time.perf_counter()
    singles = single_head_configs(shape.num_layers, shape.num_query_heads, args.single_windows)
    single_measured = np.array(
        [mean_nll(model, ids, config, sink_tokens, args.batch_size) - dense for *_, config in singles]
    )
    single_seconds = time.perf_counter() - start
    single_predicted = {
        name: np.array(
            [
                profile.loss_increase[layer, head, candidates.index(window)]
                for layer, head, window, _ in singles
            ]
        )
        for name, profile in profiles.items()
    }

    # Random whole configs.
    groups = HeadGroups(shape, space.granularity)
    rng = np.random.default_rng(args.seed)
    configs = [
        groups.expand(random_group_windows(candidates, groups.num_groups, args.spread, rng))
        for _ in range(args.configs)
    ]
    start = time.perf_counter()
    config_measured = np.array(
        [mean_nll(model, ids, config, sink_tokens, args.batch_size) - dense for config in configs]
    )
    config_seconds = time.perf_counter() - start
    config_predicted = {
        name: np.array([profile.predict_loss_increase(config) for config in configs])
        for name, profile in profiles.items()
    }
    costs = [mean_area_density(config, [args.seq_len], sink_tokens) for config in configs]

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
        rows.append(correlation_row("random configs", name, config_predicted[name], config_measured))

    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"{shape.architecture}, {args.num_samples} x {args.seq_len} tokens, space {space.name!r} "
        f"(candidates {candidates}), sink_tokens {sink_tokens}, dense mean NLL {dense:.5f} "
        f"(profile's {profiles['set'].dense_nll:.5f}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {load} at the end"
    )
    print()
    print("| configs | estimator | n | Spearman rho | Pearson r | measured / predicted (sums) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['set']} | {row['estimator']} | {row['configs']} | {row['spearman']:.3f} | "
            f"{row['pearson']:.3f} | {row['measured_over_predicted']:.2f} |"
        )
    print()
    print(
        f"Random configs: cost {min(costs):.3f} to {max(costs):.3f}, measured NLL increase "
        f"{config_measured.min():.4f} to {config_measured.max():.4f}."
    )
    print()
    print("| step | evaluations | seconds |")
    print("|---|---|---|")
    print(f"| profile, both estimators, one pass | - | {profile_seconds:.1f} |")
    print(f"| exact, single heads | {len(singles)} | {single_seconds:.1f} |")
    print(f"| exact, random configs | {len(configs)} | {config_seconds:.1f} |")

    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                {
                    "dense_nll": dense,
                    "candidates": candidates,
                    "rows": rows,
                    "seconds": {
                        "profile": profile_seconds,
                        "single_heads": single_seconds,
                        "random_configs": config_seconds,
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
                    "random_configs": [
                        {
                            "cost": costs[index],
                            "measured": float(config_measured[index]),
                            **{name: float(config_predicted[name][index]) for name in ESTIMATORS},
                            "group_windows": [row[:: groups.heads_per_group] for row in config],
                        }
                        for index, config in enumerate(configs)
                    ],
                },
                stream,
                indent=2,
            )


if __name__ == "__main__":
    main()
