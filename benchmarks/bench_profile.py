"""Time and measure the memory of the head profile against one dense forward and backward pass.

Prints a markdown table to stdout. Run from the repository root:

    python benchmarks/bench_profile.py --seq-len 512 --num-samples 8

Two settings are measured. The first is the pretrained stories260K at ``--seq-len``. The second is
a model of the same shape built from its config with ``max_position_embeddings`` raised to
``--long-seq-len`` and random weights, because stories260K itself has only 512 positions. Runtime
and memory depend on the shape, not on the weights.

Rows per setting:

- ``dense sdpa``: one forward and backward pass over the same batches with the model's default
  attention, parameters frozen and the gradient taken to the input embeddings, as the profile does.
  This is the reference of the "x dense" column.
- ``dense eager``: the same with transformers' eager attention, which stores every layer's
  probabilities for the backward pass, as a profile built on tensor hooks would.
- ``profile set`` and ``profile set+additive``: :func:`moa_search.profile.profile_estimators`.

Memory is the peak resident set size during the first (untimed) run minus the resident set size
just before it. A thread reads ``/proc/self/statm`` every millisecond, so the figure is Linux-only
and can miss shorter spikes. It counts all CPU allocations, torch's included. Every row runs in a
fresh process that loads only the model, and the parent process tokenises the data.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS = ("dense sdpa", "dense eager", "profile set", "profile set+additive")


@dataclass(frozen=True)
class Setting:
    """One model and token set to measure."""

    label: str
    model: str
    dataset: str
    seq_len: int
    num_samples: int
    random_weights: bool
    windows: tuple[int | None, ...]
    sink_tokens: int
    batch_size: int
    repeats: int
    threads: int | None


@dataclass(frozen=True)
class Measurement:
    median_seconds: float
    peak_growth_mib: float
    dense_nll: float | None


def _load_input_ids(setting: Setting):  # type: ignore[no-untyped-def]
    """Tokenise the dataset into int64 ``[num_samples, seq_len]``; runs in the parent process."""
    from moa_search.data import load_calibration_data
    from moa_search.models import load_model

    _, tokenizer = load_model(setting.model, dtype="float32")
    data = load_calibration_data(
        tokenizer,
        setting.dataset,
        seq_len=setting.seq_len,
        num_samples=setting.num_samples,
        holdout=0,
        max_positions=setting.seq_len,
    )
    return data.calibration


def _load_model(setting: Setting):  # type: ignore[no-untyped-def]
    """Load stories260K, or build a random model of its shape with ``seq_len`` positions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moa_search.models import load_model

    if not setting.random_weights:
        model, _ = load_model(setting.model, dtype="float32")
        return model
    config = AutoConfig.from_pretrained(setting.model)
    config.max_position_embeddings = setting.seq_len
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _dense_pass(  # type: ignore[no-untyped-def]
    model, input_ids, batch_size: int, attn_implementation: str
) -> None:
    """Run one forward and backward pass per batch with frozen parameters."""
    import torch.nn.functional as F

    model.set_attn_implementation(attn_implementation)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    token_count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size]
        embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeddings, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        (loss / token_count).backward()


def _measure(setting: Setting, run: str, input_ids) -> Measurement:  # type: ignore[no-untyped-def]
    """Measure one row; runs in a fresh process."""
    import gc

    import torch

    from moa_search.profile import profile_estimators

    if setting.threads is not None:
        torch.set_num_threads(setting.threads)
    model = _load_model(setting)
    dense_nll = None

    def call() -> None:
        nonlocal dense_nll
        if run.startswith("dense"):
            _dense_pass(model, input_ids, setting.batch_size, run.split()[1])
            return
        estimators = ("set", "additive") if run.endswith("additive") else ("set",)
        profiles = profile_estimators(
            model,
            input_ids,
            setting.windows,
            sink_tokens=setting.sink_tokens,
            estimators=estimators,
            batch_size=setting.batch_size,
        )
        dense_nll = profiles["set"].dense_nll

    gc.collect()
    sampler = _ResidentSetSampler()
    sampler.start()
    call()  # The untimed first run measures memory and warms up.
    peak_growth_mib = sampler.stop()
    seconds = []
    for _ in range(setting.repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return Measurement(statistics.median(seconds), peak_growth_mib, dense_nll)


class _ResidentSetSampler(threading.Thread):
    """Record the peak resident set size of this process while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopped = threading.Event()
        self.start_bytes = _resident_bytes()
        self.peak_bytes = self.start_bytes

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak_bytes = max(self.peak_bytes, _resident_bytes())
            time.sleep(0.001)

    def stop(self) -> float:
        """Stop sampling and return the peak growth in MiB."""
        self.stopped.set()
        self.join()
        self.peak_bytes = max(self.peak_bytes, _resident_bytes())
        return (self.peak_bytes - self.start_bytes) / 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure_in_subprocess(setting: Setting, run: str, input_ids) -> Measurement:  # type: ignore[no-untyped-def]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        return executor.submit(_measure, setting, run, input_ids).result()


def _print_rows(setting: Setting) -> None:
    input_ids = _load_input_ids(setting)
    results = {run: _measure_in_subprocess(setting, run, input_ids) for run in RUNS}
    reference = results["dense sdpa"].median_seconds
    shape = f"{setting.num_samples} x {setting.seq_len}"
    for run, result in results.items():
        nll = "-" if result.dense_nll is None else f"{result.dense_nll:.4f}"
        print(
            f"| {setting.label} | {shape} | {run} | {result.median_seconds:.3f} | "
            f"{result.median_seconds / reference:.2f} | {result.peak_growth_mib:.0f} | {nll} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=str(REPO_ROOT.parent / "shared" / "models" / "stories260K"),
        help="folder of the stories260K model",
    )
    parser.add_argument(
        "--dataset",
        default=str(REPO_ROOT.parent / "shared" / "data" / "tinystories_subset.txt"),
        help="text file the sequences are cut from",
    )
    parser.add_argument(
        "--seq-len", type=int, default=512, help="tokens per sequence for the pretrained model"
    )
    parser.add_argument(
        "--num-samples", type=int, default=8, help="sequences for the pretrained model"
    )
    parser.add_argument(
        "--long-seq-len",
        type=int,
        default=4096,
        help="tokens per sequence for the random model of the same shape; 0 skips it",
    )
    parser.add_argument(
        "--long-samples", type=int, default=1, help="sequences for the random model"
    )
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=[16, 32, 64, 128, 256, 512, 1024, 2048],
        help="candidate windows in tokens; full attention is always added",
    )
    parser.add_argument(
        "--sink-tokens", type=int, default=1, help="leading tokens every window keeps"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per row; the median is shown"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; None keeps torch's default for this machine",
    )
    args = parser.parse_args()

    common = dict(
        model=args.model,
        dataset=args.dataset,
        sink_tokens=args.sink_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        threads=args.threads,
    )
    settings = [
        Setting(
            label="stories260K",
            seq_len=args.seq_len,
            num_samples=args.num_samples,
            random_weights=False,
            windows=(*args.windows, None),
            **common,
        ),
    ]
    if args.long_seq_len:
        settings.append(
            Setting(
                label="stories260K shape, random",
                seq_len=args.long_seq_len,
                num_samples=args.long_samples,
                random_weights=True,
                windows=(*args.windows, None),
                **common,
            )
        )

    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} CPU threads, windows {args.windows} + full, "
        f"sink_tokens {args.sink_tokens}, batch_size {args.batch_size}, median of {args.repeats}"
    )
    print()
    print(
        "| model | sequences x tokens | run | median s | x dense sdpa | peak RSS growth MiB "
        "| dense NLL |"
    )
    print("|---|---|---|---|---|---|---|")
    for setting in settings:
        _print_rows(setting)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
