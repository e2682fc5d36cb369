"""Driver that checks the profile arguments and runs every batch forward and backward."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moa_search.errors import ConfigError, UnsupportedModelError
from moa_search.masks import check_sink_tokens, window_tensor
from moa_search.models import model_shape
from moa_search.profile._attention import _profiling_model
from moa_search.profile._estimators import ESTIMATORS, _LayerStatistics
from moa_search.profile._head_profile import HeadProfile

logger = logging.getLogger(__name__)


def _check_arguments(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[int | None],
    sink_tokens: int,
    estimators: Sequence[str],
    supervised_tokens: int | None,
    batch_size: int,
) -> None:
    if not estimators:
        raise ConfigError(f"no estimator given: choose from {', '.join(ESTIMATORS)}")
    for name in estimators:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")

    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(
            f"input_ids must be an integer tensor [num_sequences, seq_len], got {input_ids.dtype} "
            f"of shape {tuple(input_ids.shape)}"
        )
    num_sequences, seq_len = input_ids.shape
    if num_sequences < 1 or seq_len < 2:
        raise ConfigError(
            f"input_ids has shape {tuple(input_ids.shape)}: need at least 1 sequence of at "
            "least 2 tokens"
        )
    max_positions = model_shape(model).max_positions
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's {max_positions} positions; use shorter "
            "sequences"
        )

    if not windows:
        raise ConfigError("window list is empty: give at least one candidate window (null = full)")
    window_tensor(windows)  # raises ConfigError on a window that is not None or an integer >= 1
    if len(set(windows)) != len(windows):
        raise ConfigError(f"window list {list(windows)} has duplicates; give each candidate once")

    check_sink_tokens(sink_tokens)
    if supervised_tokens is not None and (
        isinstance(supervised_tokens, bool)
        or not isinstance(supervised_tokens, int)
        or not 1 <= supervised_tokens <= seq_len - 1
    ):
        raise ConfigError(
            f"invalid supervised_tokens {supervised_tokens!r}: use 1..{seq_len - 1} (seq_len - 1) "
            "or None for every predicted token"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"invalid batch_size {batch_size!r}: use a whole number >= 1")


def _batch_nll_sum(model: torch.nn.Module, batch: torch.Tensor, predicted: int) -> torch.Tensor:
    """Run ``model`` with gradients flowing to its input embeddings and return the summed NLL.

    The sum is over the last ``predicted`` predicted tokens of every sequence, in float64.
    """
    embeddings = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    # Logits at positions seq_len-1-predicted .. seq_len-2 predict the last `predicted` tokens.
    output = model(inputs_embeds=embeddings, use_cache=False, logits_to_keep=predicted + 1)
    logits = output.logits[:, :-1, :]
    labels = batch[:, -predicted:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.float64), labels.reshape(-1), reduction="sum"
    )


def profile_estimators(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[int | None],
    *,
    sink_tokens: int = 0,
    estimators: Sequence[str] = ESTIMATORS,
    supervised_tokens: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, HeadProfile]:
    """Profile every head with several estimators from the same forward and backward passes.

    Takes the arguments of :func:`profile_heads`, with ``estimators`` a sequence of names from
    :data:`ESTIMATORS`, and returns one profile per estimator name.
    """
    _check_arguments(
        model, input_ids, windows, sink_tokens, estimators, supervised_tokens, batch_size
    )
    shape = model_shape(model)
    num_sequences, seq_len = input_ids.shape
    predicted = seq_len - 1 if supervised_tokens is None else supervised_tokens
    # Each batch's loss is its NLL sum over the predicted tokens of all sequences, so the
    # gradients, the estimates and the dense NLL summed over batches are in units of mean NLL per
    # predicted token.
    token_count = num_sequences * predicted
    candidates = window_tensor(windows)
    statistics = [
        _LayerStatistics(candidates, sink_tokens, tuple(estimators))
        for _ in range(shape.num_layers)
    ]
    device = next(model.parameters()).device
    logger.info(
        "Profiling %d layers x %d query heads over %d sequences of %d tokens, %d windows, "
        "estimators %s",
        shape.num_layers,
        shape.num_query_heads,
        num_sequences,
        seq_len,
        len(windows),
        list(estimators),
    )

    nll_sum = 0.0
    with _profiling_model(model, statistics):
        for start in range(0, num_sequences, batch_size):
            batch = input_ids[start : start + batch_size].to(device=device, dtype=torch.int64)
            with torch.enable_grad():
                batch_nll = _batch_nll_sum(model, batch, predicted)
                (batch_nll / token_count).backward()
            nll_sum += batch_nll.item()
            if start == 0:
                _check_all_layers_called(statistics, shape.architecture)
            done = min(start + batch_size, num_sequences)
            logger.debug("Profiled %d of %d sequences", done, num_sequences)
            if progress is not None:
                progress(done, num_sequences)

    dense_nll = nll_sum / token_count
    logger.info(
        "Profile done: dense mean NLL %.6f (perplexity %.4f)", dense_nll, math.exp(dense_nll)
    )
    return {
        name: HeadProfile(
            windows=tuple(windows),
            sink_tokens=sink_tokens,
            seq_len=seq_len,
            estimator=name,
            loss_increase=_stack_layers(statistics, name, shape.num_query_heads, len(windows)),
            dense_nll=dense_nll,
            supervised_tokens=supervised_tokens,
            num_sequences=num_sequences,
        )
        for name in estimators
    }


def _check_all_layers_called(statistics: list[_LayerStatistics], architecture: str) -> None:
    missing = [index for index, layer in enumerate(statistics) if layer.calls == 0]
    if missing:
        raise UnsupportedModelError(
            f"{architecture}: layers {missing} did not call the registered attention function, so "
            "they cannot be profiled; this model's attention does not dispatch through "
            "transformers' AttentionInterface"
        )


def _stack_layers(
    statistics: list[_LayerStatistics], name: str, heads: int, candidates: int
) -> np.ndarray:
    rows = [
        layer.sums.get(name, torch.zeros(heads, candidates, dtype=torch.float64))
        for layer in statistics
    ]
    return torch.stack(rows).numpy()  # [layers, query_heads, candidates]


def profile_heads(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[int | None],
    *,
    sink_tokens: int = 0,
    estimator: str = "set",
    supervised_tokens: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> HeadProfile:
    """Estimate the loss increase of every (layer, query head) under every candidate window.

    The model runs once forward and once backward per batch with a profiling attention function.
    Its attention implementation, training mode and parameters' ``requires_grad`` are restored
    afterwards, also on error, and no parameter gradient is accumulated. The profile is always of
    dense attention, also for a model that :func:`moa_search.attention.apply_windows` switched to
    windows.

    Args:
        model: A transformers causal LM whose attention dispatches through ``AttentionInterface``.
        input_ids: int64 ``[num_sequences, seq_len]`` token ids, without padding.
        windows: Candidate windows in tokens under :data:`moa_search.masks.WINDOW_CONVENTION`; None
            (or a window >= seq_len) is full attention and gets estimate 0.
        sink_tokens: Leading tokens that every window keeps.
        estimator: ``"set"`` (masking the dropped keys together) or ``"additive"`` (the reference
            MoA sum of single-key effects). The :mod:`moa_search.profile` docstring gives both
            formulas.
        supervised_tokens: Predicted tokens at the end of each sequence that the loss counts, 1 to
            ``seq_len - 1``; None counts all ``seq_len - 1``.
        batch_size: Sequences per forward pass.
        progress: Called as ``progress(done_sequences, num_sequences)`` after each batch.

    Returns:
        The profile; ``loss_increase`` is float64 ``[layers, query_heads, candidates]`` in mean NLL
        per predicted token.

    Raises:
        ConfigError: on an unknown estimator, an empty or invalid window list, or an out-of-range
            ``supervised_tokens``, ``sink_tokens``, ``batch_size`` or sequence length.
        UnsupportedModelError: when some layer's attention bypasses ``AttentionInterface``.
    """
    profiles = profile_estimators(
        model,
        input_ids,
        windows,
        sink_tokens=sink_tokens,
        estimators=(estimator,),
        supervised_tokens=supervised_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return profiles[estimator]
