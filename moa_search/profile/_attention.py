"""Attention for profiling, a custom autograd function that collects the estimates of each layer.

The function is registered in transformers' ``AttentionInterface`` under
:data:`PROFILE_ATTENTION_NAME`, and :func:`_profiling_model` switches a model to it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from moa_search.attention import attention_modules
from moa_search.errors import UnsupportedModelError
from moa_search.profile._estimators import KEY_GROUP, _LayerStatistics, _round_up

PROFILE_ATTENTION_NAME = "moa_profile"

# Elements (batch * query_heads * rows * keys) of one block of attention rows in the backward pass.
# A float32 block takes 2 MiB, which fits common CPU caches; 8 MiB blocks ran up to 2x slower per
# element in a microbenchmark on a 2-core x86 machine.
BLOCK_ELEMENTS = 2**19

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
