"""First-order estimates of the loss increase of restricting each attention head to a window.

For every (layer, query head) and every candidate window, :func:`profile_heads` estimates how much
the mean NLL per predicted token would rise if that head alone used the window. The estimate takes
one forward and one backward pass per batch (the "attention influence" of MoA, arXiv 2406.14909).

Per attention row i of a head, with softmax probabilities ``A[i, :]`` and ``g = dL/dA[i, :]``, a
window W under :data:`moa_search.masks.WINDOW_CONVENTION` drops the keys ``D = {j : sink_tokens <=
j <= i - W}``. With ``m = sum_D A``, ``G = sum_D A*g`` and ``S = sum_j A*g``:

- ``"set"`` (default) linearises the loss around masking D and renormalising the row over the kept
  keys, ``A' = A * [j kept] / (1 - m)``, which gives ``dL = (S - G) * m / (1 - m) - G``.
- ``"additive"`` is the estimator of the reference MoA code: the sum over dropped keys of the
  effect of dropping each key alone, ``A_j * (S - g_j) / (1 - A_j)``. Both agree to first order in
  m, but only the set estimator is the exact first-order term of the actual change ``A' - A``, so
  the two drift apart as the dropped mass grows.

Row estimates for all candidates come from prefix sums over the key index (O(seq_len) per row) and
are summed over rows, sequences and batches in float64.

Memory: the profiling attention function is a custom autograd function that never stores the
attention probabilities. Its forward keeps only the query, key and value states. Its backward
recomputes the probabilities in blocks of query rows, so the extra memory is O(batch * query_heads
* rows_per_block * seq_len) for the one layer being differentiated, on top of the model's usual
activations O(layers * batch * seq_len * hidden). No gradient checkpointing is needed.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moa_search.attention import attention_modules
from moa_search.errors import ConfigError, UnsupportedModelError
from moa_search.masks import check_sink_tokens, window_tensor
from moa_search.models import model_shape

logger = logging.getLogger(__name__)

PROFILE_ATTENTION_NAME = "moa_profile"
ESTIMATORS = ("set", "additive")
FILE_FORMAT_VERSION = 1

# Lower bound on the kept mass 1 - m in the set estimator. With W >= 1 the diagonal is always kept,
# so m < 1 in exact arithmetic, but a row whose float32 probabilities put all mass on dropped keys
# rounds m to 1. There the first-order estimate is meaningless anyway; the floor keeps it finite.
KEPT_MASS_FLOOR = 1e-9

# Elements (batch * query_heads * rows * keys) of one block of attention rows in the backward pass.
# A float32 block takes 2 MiB, which fits common CPU caches; 8 MiB blocks ran up to 2x slower per
# element in a microbenchmark on a 2-core x86 machine.
BLOCK_ELEMENTS = 2**19

# Keys per group in prefix sums. Sums inside a group of keys and across groups are taken in
# float64, and only the group that contains a cut column is summed element by element.
KEY_GROUP = 32


@dataclass(frozen=True, eq=False)
class HeadProfile:
    """Estimated loss increase of every (layer, query head) under every candidate window.

    ``loss_increase[l, h, c]`` estimates the change of the mean NLL per predicted token when query
    head h of layer l alone uses ``windows[c]``. Under first-order additivity across heads, a
    plan's mean NLL is ``dense_nll + sum of its heads' estimates``, and its perplexity ``exp`` of
    that.
    """

    windows: tuple[int | None, ...]  # candidate windows in tokens, None = full (estimate 0)
    sink_tokens: int
    seq_len: int
    estimator: str  # "set" or "additive"
    loss_increase: np.ndarray  # float64 [layers, query_heads, candidates]
    dense_nll: float  # mean NLL per predicted token of the dense model over the supervised tokens
    supervised_tokens: (
        int | None
    )  # predicted tokens per sequence that count; None = all seq_len - 1
    num_sequences: int

    def __post_init__(self) -> None:
        array = np.array(self.loss_increase, dtype=np.float64)
        if array.ndim != 3 or array.shape[2] != len(self.windows):
            raise ConfigError(
                f"loss_increase has shape {array.shape}, expected [layers, query_heads, "
                f"{len(self.windows)}] for {len(self.windows)} windows"
            )
        array.setflags(write=False)
        object.__setattr__(self, "loss_increase", array)
        object.__setattr__(self, "windows", tuple(self.windows))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadProfile):
            return NotImplemented
        return self._metadata() == other._metadata() and np.array_equal(
            self.loss_increase, other.loss_increase
        )

    __hash__ = None  # type: ignore[assignment]

    def predict_loss_increase(self, windows: Sequence[Sequence[int | None]]) -> float:
        """Sum the estimates of one window per (layer, query head).

        Args:
            windows: ``[layers][query_heads]``; each entry is a candidate window, None, or a window
                >= ``seq_len`` (both full attention, estimate 0).

        Raises:
            ConfigError: when the shape differs from the profile or a window is not a candidate.
        """
        layers, heads, _ = self.loss_increase.shape
        if len(windows) != layers or any(len(row) != heads for row in windows):
            raise ConfigError(
                f"windows must have shape {layers} layers x {heads} query heads to match the "
                "profile"
            )
        column = {window: index for index, window in enumerate(self.windows)}
        total = 0.0
        for layer, row in enumerate(windows):
            for head, window in enumerate(row):
                if window is None or window >= self.seq_len:
                    continue
                if window not in column:
                    raise ConfigError(
                        f"window {window} of layer {layer} head {head} is not a profiled "
                        "candidate; "
                        f"candidates are {list(self.windows)}"
                    )
                total += float(self.loss_increase[layer, head, column[window]])
        return total

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": FILE_FORMAT_VERSION,
            "windows": list(self.windows),
            "sink_tokens": self.sink_tokens,
            "seq_len": self.seq_len,
            "estimator": self.estimator,
            "dense_nll": self.dense_nll,
            "supervised_tokens": self.supervised_tokens,
            "num_sequences": self.num_sequences,
        }

    def to_file(self, path: str | Path) -> None:
        """Write the profile to ``path`` as an ``.npz`` archive; no suffix is added."""
        with open(path, "wb") as stream:
            np.savez(
                stream,
                loss_increase=self.loss_increase,
                metadata=np.array(json.dumps(self._metadata())),
            )

    @classmethod
    def from_file(cls, path: str | Path) -> HeadProfile:
        """Read a profile written by :meth:`to_file`; the arrays and floats round-trip exactly.

        Raises:
            ConfigError: when the file is not a profile archive or has another format version.
        """
        try:
            with np.load(path, allow_pickle=False) as archive:
                metadata = json.loads(str(archive["metadata"]))
                loss_increase = archive["loss_increase"]
        except (OSError, KeyError, ValueError) as error:
            raise ConfigError(f"cannot read head profile {str(path)!r}: {error}") from error
        version = metadata.pop("format_version", None)
        if version != FILE_FORMAT_VERSION:
            raise ConfigError(
                f"head profile {str(path)!r} has format version {version!r}, expected "
                f"{FILE_FORMAT_VERSION}; profile the model again"
            )
        try:
            metadata["windows"] = tuple(metadata["windows"])
            return cls(loss_increase=loss_increase, **metadata)
        except (KeyError, TypeError) as error:
            raise ConfigError(
                f"head profile {str(path)!r} has invalid metadata: {error}"
            ) from error


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _GroupedPrefix:
    """Float64 prefix sums of ``values [..., rows, keys]`` over keys, read at a few columns.

    One pass sums groups of :data:`KEY_GROUP` keys. A prefix at column x is then the sum of the
    groups before x's group plus the start of x's group, so each value is read once and no float64
    copy of the whole block is written, as a full cumulative sum would.
    """

    def __init__(self, values: torch.Tensor) -> None:
        keys = values.shape[-1]
        padded = _round_up(keys, KEY_GROUP)
        if padded != keys:
            values = F.pad(values, (0, padded - keys))
        self.groups = values.unflatten(
            -1, (padded // KEY_GROUP, KEY_GROUP)
        )  # [..., rows, groups, KEY_GROUP]
        self.group_sums = self.groups.sum(dim=-1, dtype=torch.float64)  # [..., rows, groups]

    def total(self) -> torch.Tensor:
        """Return the sum over all keys, float64 ``[..., rows, 1]``."""
        return self.group_sums.sum(dim=-1, keepdim=True)

    def at(self, columns: torch.Tensor) -> torch.Tensor:
        """Return ``sum(values[..., r, :x + 1])`` for each ``x = columns[r, c]``, float64.

        Args:
            columns: int64 ``[rows, count]`` key indices in ``[0, keys)``.

        Returns:
            float64 ``[..., rows, count]``.
        """
        lead = self.group_sums.shape[:-2]
        rows, count = columns.shape
        before = F.pad(
            self.group_sums.cumsum(dim=-1)[..., :-1], (1, 0)
        )  # sums of the earlier groups
        group = columns // KEY_GROUP
        prefix = before.gather(-1, group.expand(*lead, rows, count))
        block = self.groups.gather(-2, group[..., None].expand(*lead, rows, count, KEY_GROUP))
        inside = torch.arange(KEY_GROUP, device=columns.device) <= (columns % KEY_GROUP)[..., None]
        return prefix + (block * inside).sum(dim=-1, dtype=torch.float64)


def row_loss_increase(
    attn: torch.Tensor,
    grad: torch.Tensor,
    row_start: int,
    windows: torch.Tensor,
    sink_tokens: int,
    estimators: Sequence[str],
    weighted: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate the loss change of every candidate window for a block of attention rows.

    Elementwise products stay in the input dtype; every sum over keys is taken in float64.

    Args:
        attn: Softmax probabilities ``[..., rows, keys]``; row r is the query at absolute position
            ``row_start + r`` and ``keys >= row_start + rows``. Entries right of the diagonal must
            be 0.
        grad: ``dL/dattn``, same shape.
        row_start: Absolute position of the first row.
        windows: int64 ``[candidates]``, :data:`moa_search.masks.FULL_WINDOW` for full attention.
        sink_tokens: Leading keys that every window keeps.
        estimators: Names from :data:`ESTIMATORS`.
        weighted: ``attn * grad`` when the caller already has it.

    Returns:
        Estimator name -> float64 ``[..., rows, candidates]`` estimates in the unit of the loss.
    """
    rows, keys = attn.shape[-2], attn.shape[-1]
    shape = (*attn.shape[:-1], len(windows))
    if keys <= sink_tokens:
        return {
            name: torch.zeros(shape, dtype=torch.float64, device=attn.device)
            for name in estimators
        }

    # Window W drops the keys sink_tokens .. i - W of row i, nothing when i - W < sink_tokens.
    positions = torch.arange(row_start, row_start + rows, device=attn.device)
    last_dropped = positions[:, None] - windows.to(attn.device)[None, :]  # [rows, candidates]
    dropped_any = last_dropped >= sink_tokens
    last_dropped = last_dropped.clamp(min=0)
    last_sink = torch.full((rows, 1), sink_tokens - 1, device=attn.device)

    def dropped_sum(prefix: _GroupedPrefix) -> torch.Tensor:
        sums = prefix.at(last_dropped)
        if sink_tokens > 0:
            sums = sums - prefix.at(last_sink)
        return sums * dropped_any

    if weighted is None:
        weighted = attn * grad
    weighted_prefix = _GroupedPrefix(weighted)
    row_total = weighted_prefix.total()  # S = sum_j A_j g_j, [..., rows, 1]
    result = {}
    if "set" in estimators:
        mass = dropped_sum(_GroupedPrefix(attn))
        dropped_weighted = dropped_sum(weighted_prefix)
        kept_mass = (1.0 - mass).clamp(min=KEPT_MASS_FLOOR)
        result["set"] = (row_total - dropped_weighted) * mass / kept_mass - dropped_weighted
    if "additive" in estimators:
        floor = max(KEPT_MASS_FLOOR, torch.finfo(attn.dtype).eps)
        single = attn * (row_total.to(attn.dtype) - grad) / (1.0 - attn).clamp(min=floor)
        result["additive"] = dropped_sum(_GroupedPrefix(single))
    return result


@dataclass
class _LayerStatistics:
    """Candidate windows of one layer and the estimates accumulated over backward passes."""

    windows: torch.Tensor  # int64 [candidates]
    sink_tokens: int
    estimators: tuple[str, ...]
    sums: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # name -> float64 [query_heads, candidates]
    calls: int = 0

    def add(
        self, attn: torch.Tensor, grad: torch.Tensor, row_start: int, weighted: torch.Tensor
    ) -> None:
        """Add the estimates of a block of rows ``[batch, query_heads, rows, keys]``."""
        block = row_loss_increase(
            attn, grad, row_start, self.windows, self.sink_tokens, self.estimators, weighted
        )
        for name, values in block.items():
            per_head = values.sum(dim=(0, 2)).cpu()  # [query_heads, candidates]
            if name in self.sums:
                self.sums[name] += per_head
            else:
                self.sums[name] = per_head


# Attention module -> statistics of its layer while a profile runs. Weak keys, like the windows
# table.
_LAYER_STATISTICS: weakref.WeakKeyDictionary[torch.nn.Module, _LayerStatistics] = (
    weakref.WeakKeyDictionary()
)


def _rows_per_block(batch: int, heads: int, keys: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, batch * heads * keys))


def _causal_mask(
    length: int, mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Combine the model's mask with the causal mask for sdpa; return None for causal alone."""
    if mask is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if mask.dtype == torch.bool:
        return causal & mask
    return mask.masked_fill(~causal, float("-inf"))


def _block_probabilities(
    scaled_query: torch.Tensor,
    key_t: torch.Tensor,
    mask: torch.Tensor | None,
    row_start: int,
) -> torch.Tensor:
    """Compute causal softmax probabilities ``[batch, heads, rows, keys]`` of a block of rows.

    Args:
        scaled_query: ``[batch, heads, rows, head_dim]``, already multiplied by the softmax scale.
        key_t: Transposed keys ``[batch, heads, head_dim, keys]`` from position 0, at least up to
            the last row. Keys right of the diagonal get probability 0.
        mask: The model's boolean or additive mask ``[batch, 1, rows, <= keys]``, or None.
    """
    rows, keys = scaled_query.shape[-2], key_t.shape[-1]
    scores = torch.matmul(scaled_query, key_t)
    above_diagonal = torch.ones(
        rows, keys - row_start, dtype=torch.bool, device=scores.device
    ).triu(1)
    scores[..., row_start:].masked_fill_(above_diagonal, float("-inf"))
    if mask is not None:
        masked_scores = scores[..., : mask.shape[-1]]
        if mask.dtype == torch.bool:
            masked_scores.masked_fill_(~mask, float("-inf"))
        else:
            masked_scores += mask
    return torch.softmax(scores, dim=-1)


def _transpose_padded(states: torch.Tensor, length: int) -> torch.Tensor:
    """Transpose ``[batch, heads, seq_len, head_dim]`` to ``[batch, heads, head_dim, length]``.

    Keys past ``seq_len`` are zero; the result is contiguous.
    """
    transposed = states.transpose(-1, -2)
    return F.pad(transposed, (0, length - states.shape[-2])).contiguous()


class _ProfiledAttention(torch.autograd.Function):
    """Causal attention whose backward pass feeds (A, dL/dA) of every row to the layer statistics.

    Inputs are ``[batch, query_heads, seq_len, head_dim]`` (key and value already repeated for GQA)
    in the compute dtype. The forward pass is plain sdpa; the backward pass recomputes the
    probabilities block by block and never stores them whole. Keys are kept transposed and padded
    to a multiple of :data:`KEY_GROUP`, because products with a contiguous ``[head_dim, keys]``
    operand ran several times faster on CPU than with ``[keys, head_dim]``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        statistics: _LayerStatistics,
    ) -> torch.Tensor:
        length = query.shape[2]
        full_mask = _causal_mask(length, mask, query.device)
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=full_mask, is_causal=full_mask is None, scale=scaling
        )
        ctx.save_for_backward(query, key, value, mask)
        ctx.scaling = scaling
        ctx.statistics = statistics
        return output

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        query, key, value, mask = ctx.saved_tensors
        scaling, statistics = ctx.scaling, ctx.statistics
        batch, heads, length, _ = query.shape
        padded = _round_up(length, KEY_GROUP)
        key_t = _transpose_padded(key, padded)  # [batch, heads, head_dim, padded]
        value_t = _transpose_padded(value, padded)
        scaled_query = query * scaling
        grad_query = torch.empty_like(query)
        grad_key_t = torch.zeros_like(key_t)
        grad_value_t = torch.zeros_like(value_t)
        step = _rows_per_block(batch, heads, length)
        for start in range(0, length, step):
            stop = min(start + step, length)
            keys = _round_up(stop, KEY_GROUP)
            block_query = scaled_query[..., start:stop, :]
            block_key_t, block_value_t = key_t[..., :keys], value_t[..., :keys]
            block_mask = None if mask is None else mask[..., start:stop, :keys]
            attn = _block_probabilities(block_query, block_key_t, block_mask, start)
            block_grad_output = grad_output[..., start:stop, :]
            grad_attn = torch.matmul(block_grad_output, block_value_t)
            weighted = attn * grad_attn
            statistics.add(attn, grad_attn, start, weighted)

            # Softmax backward: dL/dscores = A * g - A * sum_j A_j g_j.
            row_total = weighted.sum(dim=-1, keepdim=True)
            grad_scores = torch.addcmul(weighted, attn, row_total, value=-1.0)
            grad_query[..., start:stop, :] = torch.matmul(
                grad_scores, block_key_t.transpose(-1, -2)
            )
            grad_key_t[..., :keys] += torch.matmul(block_query.transpose(-1, -2), grad_scores)
            grad_value_t[..., :keys] += torch.matmul(block_grad_output.transpose(-1, -2), attn)
        grad_query *= scaling
        grad_key = grad_key_t[..., :length].transpose(-1, -2)
        grad_value = grad_value_t[..., :length].transpose(-1, -2)
        return grad_query, grad_key, grad_value, None, None, None


def profiling_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attend causally and collect window estimates of the calling layer during the backward pass.

    Args:
        query: ``[batch, query_heads, seq_len, head_dim]``.
        key, value: ``[batch, kv_heads, seq_len, head_dim]``; query head h reads KV head
            ``h // (query_heads // kv_heads)``.
        attention_mask: The model's mask, bool or additive, broadcastable to
            ``[batch, 1, seq_len, seq_len]``, or None for plain causal attention.

    Returns:
        ``([batch, seq_len, query_heads, head_dim], None)``, the layout of transformers' sdpa
        function.
    """
    statistics = _LAYER_STATISTICS.get(module)
    if statistics is None:
        raise UnsupportedModelError(
            f"attention module {type(module).__name__} "
            f"(layer {getattr(module, 'layer_idx', '?')}) is "
            "not being profiled; run the model through moa_search.profile.profile_heads"
        )
    statistics.calls += 1
    if dropout:
        raise UnsupportedModelError(
            f"attention dropout {dropout} is not supported while profiling"
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(
            "attention logit soft-capping and learned sink logits are not supported while "
            "profiling"
        )
    if query.shape[2] != key.shape[2]:
        raise UnsupportedModelError(
            f"profiling needs a full causal pass without KV cache, got {query.shape[2]} queries "
            f"against {key.shape[2]} keys"
        )
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    group_size = query.shape[1] // key.shape[1]
    key = key.to(compute_dtype).repeat_interleave(group_size, dim=1)
    value = value.to(compute_dtype).repeat_interleave(group_size, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, :, -key.shape[2] :]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    output = _ProfiledAttention.apply(
        query.to(compute_dtype), key, value, mask, float(scaling), statistics
    )
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROFILE_ATTENTION_NAME, profiling_attention_forward)
    AttentionMaskInterface.register(PROFILE_ATTENTION_NAME, sdpa_mask)


@contextmanager
def _profiling_model(model: torch.nn.Module, statistics: list[_LayerStatistics]) -> Iterator[None]:
    """Switch ``model`` to profiling attention, frozen and in eval mode; restore it on exit."""
    _register()
    modules = attention_modules(model)
    previous_implementation = model.config._attn_implementation
    previous_training = model.training
    previous_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for module, layer in zip(modules, statistics, strict=True):
            _LAYER_STATISTICS[module] = layer
        for parameter, _ in previous_requires_grad:
            parameter.requires_grad_(False)
        model.eval()
        model.set_attn_implementation(PROFILE_ATTENTION_NAME)
        yield
    finally:
        model.set_attn_implementation(previous_implementation)
        model.train(previous_training)
        for parameter, requires_grad in previous_requires_grad:
            parameter.requires_grad_(requires_grad)
        for module in modules:
            _LAYER_STATISTICS.pop(module, None)


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
            MoA sum of single-key effects). The module docstring gives both formulas.
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
