"""Time one exact candidate evaluation against one dense forward pass over the same tokens.

Prints a markdown table to stdout. Run from the repository root:

    python benchmarks/bench_eval.py                      # stories260K, 16 x 512 tokens
    python benchmarks/bench_eval.py --seq-len 4096       # random model of the same shape

Each variant computes ``moa_search.evaluate.perplexity`` over the same token ids:

- ``dense sdpa``: the model's stock sdpa attention. This is the reference of the "x dense" column.
- ``windowed, all full``: :func:`moa_search.apply_windows` with every window None.
- ``windowed, mixed``: one window per KV head, drawn from 1/8, 1/4 and 3/8 of ``--seq-len`` and
  full attention (6, 7, 4 and 3 of stories260K's 20 KV heads, shuffled with a fixed seed). At 512
  tokens these are 64, 128, 192 and full, and the config's cost is about 0.5 at any length.
- ``windowed, uniform W``: every head at ``--small-window`` tokens.

The windowed variants time ``set_windows`` plus ``perplexity``, which is what the search pays per
trial. Switching the model between sdpa and windowed attention happens outside the timer. Variants
run interleaved (A, B, C, D, A, B, ...) after one untimed warm-up each, and the table shows the
median of ``--repeats`` timings.

stories260K has 512 positions. A longer ``--seq-len`` builds a model of the same shape from its
config with ``max_position_embeddings`` raised to ``--seq-len`` and random weights, because
runtime depends on the shape, not on the weights. Its perplexities are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moa_search.attention import apply_windows, remove_windows, set_windows
from moa_search.cost import mean_area_density
from moa_search.data import load_calibration_data
from moa_search.evaluate import perplexity
from moa_search.models import load_model, model_shape
from moa_search.search.groups import HeadGroups
from moa_search.space import Granularity

# Shares of the sequence length in the mixed config, None = full attention, with the number of
# KV heads (of 20) that get each. Their mean area density at 512 tokens is 0.505.
MIXED_SHARES: tuple[tuple[float | None, int], ...] = ((0.125, 6), (0.25, 7), (0.375, 4), (None, 3))

# Tokens per timed evaluation when --num-samples is not given: 16 sequences of 512 tokens.
DEFAULT_TOKENS = 16 * 512

Windows = list[list[int | None]]


@dataclass
class Variant:
    """One attention setup for the same evaluation. Its ``windows`` is None for the stock sdpa attention."""

    name: str
    windows: Windows | None
    seconds: list[float]
    perplexity: float | None = None


def load_model_for_length(model_path: str, seq_len: int):  # type: ignore[no-untyped-def]
    """Load the pretrained model, or a random one of its shape when it has fewer than ``seq_len`` positions.

    Returns:
        ``(model, tokenizer, random_weights)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model, tokenizer = load_model(model_path, dtype="float32")
    positions = model.config.get_text_config().max_position_embeddings
    if seq_len <= positions:
        return model, tokenizer, False
    config = AutoConfig.from_pretrained(model_path)
    config.max_position_embeddings = seq_len
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return random_model, tokenizer, True


def mixed_group_windows(num_groups: int, seq_len: int, seed: int) -> list[int | None]:
    """Assign the shares of :data:`MIXED_SHARES` to ``num_groups`` KV heads, scaled to that many heads."""
    total = sum(count for _, count in MIXED_SHARES)
    windows: list[int | None] = []
    for share, count in MIXED_SHARES:
        window = None if share is None else max(1, round(share * seq_len))
        windows += [window] * round(count * num_groups / total)
    windows = (windows + [None] * num_groups)[:num_groups]
    random.Random(seed).shuffle(windows)
    return windows


def time_call(function: Callable[[], float]) -> tuple[float, float]:
    """Return ``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def run_variant(model: torch.nn.Module, variant: Variant, ids: torch.Tensor, args: argparse.Namespace) -> float:
    """Switch the model to the variant's attention, then time one evaluation and return its seconds."""
    if variant.windows is None:
        remove_windows(model, "sdpa")
        seconds, result = time_call(lambda: perplexity(model, ids, batch_size=args.batch_size))
    else:
        full = [[None] * len(variant.windows[0]) for _ in variant.windows]
        apply_windows(model, full, args.sink_tokens)
        windows = variant.windows

        def evaluate() -> float:
            set_windows(model, windows, args.sink_tokens)
            return perplexity(model, ids, batch_size=args.batch_size)

        seconds, result = time_call(evaluate)
    variant.perplexity = result
    return seconds


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


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
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help=f"sequences per evaluation; default {DEFAULT_TOKENS} tokens' worth (16 at 512 tokens)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--sink-tokens", type=int, default=4, help="leading tokens every window keeps")
    parser.add_argument(
        "--small-window", type=int, default=64, help="window in tokens of the uniform variant"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant; the median is shown")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 keeps timings steady on a shared machine",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed config's shuffle")
    parser.add_argument("--json", default=None, help="also write the raw timings to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    num_samples = args.num_samples or max(1, DEFAULT_TOKENS // args.seq_len)
    model, tokenizer, random_weights = load_model_for_length(args.model, args.seq_len)
    data = load_calibration_data(
        tokenizer, args.dataset, seq_len=args.seq_len, num_samples=num_samples, holdout=0
    )
    ids = data.calibration

    groups = HeadGroups(model_shape(model), Granularity.KV_HEAD)
    mixed = groups.expand(mixed_group_windows(groups.num_groups, args.seq_len, args.seed))
    uniform = groups.expand([args.small_window] * groups.num_groups)
    full = groups.expand([None] * groups.num_groups)
    variants = [
        Variant("dense sdpa", None, []),
        Variant("windowed, all full", full, []),
        Variant("windowed, mixed", mixed, []),
        Variant(f"windowed, uniform {args.small_window}", uniform, []),
    ]

    load_before = load_average()
    for variant in variants:
        run_variant(model, variant, ids, args)  # Warm-up, untimed.
    for _ in range(args.repeats):
        for variant in variants:
            variant.seconds.append(run_variant(model, variant, ids, args))
    load_after = load_average()

    label = "random weights" if random_weights else "pretrained"
    print(
        f"{model_shape(model).architecture} ({label}), {num_samples} x {args.seq_len} tokens, "
        f"batch_size {args.batch_size}, sink_tokens {args.sink_tokens}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, median of "
        f"{args.repeats} interleaved runs, load average {load_before} before / {load_after} after"
    )
    print()
    print("| variant | cost | perplexity | median s | min s | x dense |")
    print("|---|---|---|---|---|---|")
    reference = statistics.median(variants[0].seconds)
    records = []
    for variant in variants:
        cost = 1.0 if variant.windows is None else mean_area_density(
            variant.windows, [args.seq_len], args.sink_tokens
        )
        median = statistics.median(variant.seconds)
        print(
            f"| {variant.name} | {cost:.3f} | {variant.perplexity:.4f} | {median:.3f} | "
            f"{min(variant.seconds):.3f} | {median / reference:.2f} |"
        )
        records.append(
            {
                "variant": variant.name,
                "cost": cost,
                "perplexity": variant.perplexity,
                "seconds": variant.seconds,
                "windows": variant.windows,
            }
        )

    if args.json:
        with open(args.json, "w") as stream:
            json.dump(
                {
                    "seq_len": args.seq_len,
                    "num_samples": num_samples,
                    "batch_size": args.batch_size,
                    "threads": args.threads,
                    "random_weights": random_weights,
                    "load_average": [load_before, load_after],
                    "variants": records,
                },
                stream,
                indent=2,
            )


if __name__ == "__main__":
    main()
