"""Per-head windowed attention for transformers models, through the attention-function registry.

The adapter registers one attention function under :data:`ATTENTION_NAME` in transformers'
``AttentionInterface`` (and the matching mask builder in ``AttentionMaskInterface``), then switches the model to
it. The function reads the windows of the calling layer from a table keyed by the attention module,
so model code is never forked. Models whose layers do not dispatch through the registry are
detected by a probe forward pass and rejected, never evaluated silently with full attention.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moa_search.banded import banded_attention
from moa_search.errors import ConfigError, UnsupportedModelError
from moa_search.masks import check_sink_tokens, head_window_mask, window_tensor
from moa_search.models import model_shape

logger = logging.getLogger(__name__)

ATTENTION_NAME = "moa_windowed"


@dataclass
class _LayerWindows:
    """Windows of one attention layer and the masks built from them, cached per call shape."""

    windows: torch.Tensor  # int64 [query_heads]
    sink_tokens: int
    calls: int = 0
    masks: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)
    groups: dict[int, torch.Tensor] | None = None

    def head_groups(self) -> dict[int, torch.Tensor]:
        """Map each distinct window to the indices of the query heads that use it."""
        if self.groups is None:
            self.groups = {
                int(window): torch.nonzero(self.windows == window).flatten()
                for window in torch.unique(self.windows)
            }
        return self.groups

    def mask(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """Return the bool mask ``[1, query_heads, q_len, kv_len]`` for this call shape."""
        key = (q_len, kv_len, str(device))
        if key not in self.masks:
            self.masks[key] = head_window_mask(
                self.windows, self.sink_tokens, q_len, kv_len, device
            ).unsqueeze(0)
        return self.masks[key]


# Attention module -> its windows. Weak keys, so a deleted model takes its windows with it.
_LAYER_WINDOWS: weakref.WeakKeyDictionary[torch.nn.Module, _LayerWindows] = (
    weakref.WeakKeyDictionary()
)


def _repeat_kv(states: torch.Tensor, group_size: int) -> torch.Tensor:
    """Expand ``[batch, kv_heads, kv_len, head_dim]`` to ``[batch, kv_heads * group_size, kv_len, head_dim]``."""
    if group_size == 1:
        return states
    return states.repeat_interleave(group_size, dim=1)


def windowed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attend with each query head restricted to its own window.

    Args:
        query: ``[batch, query_heads, q_len, head_dim]``.
        key, value: ``[batch, kv_heads, kv_len, head_dim]``.
        attention_mask: The model's padding/causal mask, bool or additive, broadcastable to
            ``[batch, 1, q_len, kv_len]``; None when the model relies on causality alone.

    Returns:
        ``([batch, q_len, query_heads, head_dim], None)``, the layout transformers' sdpa function returns.
    """
    layer = _LAYER_WINDOWS.get(module)
    if layer is None:
        raise UnsupportedModelError(
            f"attention module {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no "
            "windows; apply them with moa_search.apply_windows before running the model"
        )
    layer.calls += 1
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError(
            "attention logit soft-capping is not supported by the windowed attention function"
        )
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(
            "learned attention-sink logits are not supported by the windowed attention function"
        )
    if attention_mask is not None or dropout > 0:
        output = _masked_attention(layer, query, key, value, attention_mask, dropout, scaling)
    else:
        output = _grouped_attention(layer, query, key, value, scaling)
    return output.transpose(1, 2).contiguous(), None


def _masked_attention(
    layer: _LayerWindows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attend over all keys with the full per-head mask, combined with the model's (padding) mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    group_size = query.shape[1] // key.shape[1]
    mask = layer.mask(q_len, kv_len, query.device)
    if attention_mask is not None:
        model_mask = attention_mask[:, :, :, -kv_len:]
        if model_mask.dtype == torch.bool:
            mask = mask & model_mask
        else:
            # Build the additive window mask in the query dtype, because torch.where with Python
            # floats gives float32, which cannot hold float64's minimum.
            window_bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            window_bias = window_bias.masked_fill(~mask, torch.finfo(query.dtype).min)
            mask = model_mask.to(query.dtype) + window_bias
    return F.scaled_dot_product_attention(
        query,
        _repeat_kv(key, group_size),
        _repeat_kv(value, group_size),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
    )


def _grouped_attention(
    layer: _LayerWindows,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Attend head group by head group, each group being the heads that share one window.

    Full-window heads use SDPA's causal path; windowed heads visit only their band of keys. Without a
    padding mask this equals :func:`_masked_attention` and is much cheaper for small windows.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    group_size = query.shape[1] // key.shape[1]
    output = torch.empty_like(query)
    for window, heads in layer.head_groups().items():
        kv_heads = heads // group_size
        group_query = query[:, heads]
        group_key, group_value = key[:, kv_heads], value[:, kv_heads]
        if window < kv_len:
            result = banded_attention(
                group_query,
                group_key,
                group_value,
                window=window,
                sink_tokens=layer.sink_tokens,
                scaling=scaling,
            )
        else:
            # Full attention: causal when queries and keys align, no mask for one decoded query,
            # and the causal mask shifted by the cache length for a chunk of queries after a cache.
            causal_mask = None
            if 1 < q_len < kv_len:
                causal_mask = layer.mask(q_len, kv_len, query.device)[:, heads]
            result = F.scaled_dot_product_attention(
                group_query,
                group_key,
                group_value,
                is_causal=q_len == kv_len and q_len > 1,
                attn_mask=causal_mask,
                scale=scaling,
            )
        output[:, heads] = result
    return output


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, windowed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the self-attention module of every layer, indexed by layer.

    A module counts when its class name ends in ``Attention`` and it carries an integer
    ``layer_idx``, which is how transformers' decoder layers pass the layer index to the attention
    function.

    Raises:
        UnsupportedModelError: when the modules found do not cover every layer exactly once.
    """
    shape = model_shape(model)
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if type(module).__name__.endswith("Attention") and isinstance(index, int):
            if index in found:
                raise UnsupportedModelError(
                    f"{shape.architecture} has two attention modules for layer {index}; "
                    "cross-attention and multi-stack models are not supported"
                )
            found[index] = module
    if sorted(found) != list(range(shape.num_layers)):
        raise UnsupportedModelError(
            f"{shape.architecture}: found attention modules for layers {sorted(found)}, expected "
            f"0..{shape.num_layers - 1}; only models whose attention uses transformers' "
            "AttentionInterface are supported"
        )
    return [found[index] for index in range(shape.num_layers)]


def _check_windows_shape(windows: Sequence[Sequence[int | None]], layers: int, heads: int) -> None:
    if len(windows) != layers or any(len(row) != heads for row in windows):
        got = f"{len(windows)} layers x {sorted({len(row) for row in windows})} heads"
        raise ConfigError(
            f"windows have shape {got}, but the model has {layers} layers x {heads} query heads"
        )


def set_windows(
    model: torch.nn.Module, windows: Sequence[Sequence[int | None]], sink_tokens: int = 0
) -> None:
    """Replace the windows of a model that :func:`apply_windows` already switched to windowed attention.

    Cheaper than :func:`apply_windows` because it skips the probe; the search calls it once per
    trial.

    Args:
        windows: ``[layers][query_heads]`` windows in tokens, None for full attention.
    """
    check_sink_tokens(sink_tokens)
    modules = attention_modules(model)
    shape = model_shape(model)
    _check_windows_shape(windows, shape.num_layers, shape.num_query_heads)
    # Validate every row before replacing any, so an invalid window leaves the old windows in
    # place.
    tables = [_LayerWindows(window_tensor(row), sink_tokens) for row in windows]
    for module, table in zip(modules, tables, strict=True):
        _LAYER_WINDOWS[module] = table


def apply_windows(
    model: torch.nn.Module, windows: Sequence[Sequence[int | None]], sink_tokens: int = 0
) -> None:
    """Switch a transformers causal LM to per-head windowed attention.

    Args:
        model: A loaded model whose attention dispatches through ``AttentionInterface``.
        windows: ``[layers][query_heads]`` windows in tokens under
            :data:`moa_search.masks.WINDOW_CONVENTION`, None for full attention.
        sink_tokens: Leading tokens every query sees.

    Raises:
        UnsupportedModelError: when a probe forward pass shows that some layer does not call the
            windowed attention function; the model is switched back to its previous attention
            first.
    """
    _register()
    set_windows(model, windows, sink_tokens)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    missing = _probe(model)
    if missing:
        remove_windows(model, previous)
        raise UnsupportedModelError(
            f"{model_shape(model).architecture}: layers {missing} did not call the registered attention "
            "function, so their windows cannot be applied; this model's attention does not dispatch "
            "through transformers' AttentionInterface"
        )
    logger.debug("windowed attention applied to %s", type(model).__name__)


def _probe(model: torch.nn.Module) -> list[int]:
    """Run a 4-token forward pass; return the layers whose attention did not reach the windowed function."""
    modules = attention_modules(model)
    for module in modules:
        _LAYER_WINDOWS[module].calls = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device), use_cache=False)
    return [index for index, module in enumerate(modules) if _LAYER_WINDOWS[module].calls == 0]


def remove_windows(model: torch.nn.Module, attn_implementation: str = "sdpa") -> None:
    """Drop the windows of every layer and switch the model to ``attn_implementation``."""
    for module in attention_modules(model):
        _LAYER_WINDOWS.pop(module, None)
    model.set_attn_implementation(attn_implementation)
