"""The windowed-attention adapter on stories260K and on tiny random Qwen2 and Mistral models.

All models run in float64, so "unchanged" is checked to 1e-10 on logits and to 1e-12 on
attention outputs.
"""

from __future__ import annotations

import copy
import math
import re
import types
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import moa_search.attention as attention
from moa_search.attention import (
    ATTENTION_NAME,
    apply_windows,
    attention_modules,
    remove_windows,
    set_windows,
)
from moa_search.errors import ConfigError, UnsupportedModelError

Windows = list[list[int | None]]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run these tiny models on one intra-op thread.

    More threads give no speedup at this size, and on a CPU shared with parallel test runs they
    oversubscribe the cores and make each forward pass several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


STORIES_LAYERS = 5
STORIES_HEADS = 8
# Query heads per KV head in stories260K (8 query heads over 4 KV heads).
STORIES_GROUP = 2


def uniform_windows(model: torch.nn.Module, window: int | None) -> Windows:
    """Return ``[layers][query_heads]`` windows that all equal ``window``."""
    config = model.config
    return [[window] * config.num_attention_heads for _ in range(config.num_hidden_layers)]


def head_dim_of(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Return exp of the token-weighted mean NLL of ids[1:] given the tokens before each."""
    logits = logits_of(model, ids)
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


def attention_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Run the model and return every layer's attention output, ``[layers][T, heads, head_dim]``.

    The output is read at the input of ``o_proj``, where it is ``[batch, T, heads * head_dim]``.
    """
    captured: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().clone())

    handles = [
        module.o_proj.register_forward_pre_hook(record) for module in attention_modules(model)
    ]
    try:
        logits_of(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    heads = model.config.num_attention_heads
    return [output[0].view(output.shape[1], heads, head_dim_of(model)) for output in captured]


def attention_weights(
    module: torch.nn.Module,
    model: torch.nn.Module,
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read the attention weights the windowed function applies for one layer's windows.

    All scores are zero and the value of key j is the one-hot vector e_j, so each output row is
    the softmax weights over the keys: ``1 / count`` on every visible key and 0 elsewhere. This
    reads the effective mask whatever path the adapter takes inside (one masked SDPA call, head
    groups or key bands).

    Returns:
        float64 ``[batch, query_heads, q_len, kv_len]``.
    """
    config = model.config
    batch = 1 if attention_mask is None else attention_mask.shape[0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    query = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.float64)
    key = torch.zeros(batch, kv_heads, kv_len, kv_len, dtype=torch.float64)
    value = torch.eye(kv_len, dtype=torch.float64).expand(batch, kv_heads, kv_len, kv_len)
    with torch.no_grad():
        output, _ = attention.windowed_attention_forward(
            module, query, key, value.contiguous(), attention_mask, scaling=1.0
        )
    # The function returns [batch, q_len, heads, kv_len]; move heads in front of the queries.
    return output.transpose(1, 2)


def check_uniform_weights(weights: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    """Assert that the weights are uniform over exactly the expected keys of every row."""
    visible = weights > 0
    assert torch.equal(visible, expected), f"{where}: visible keys"
    counts = expected.sum(dim=-1, keepdim=True).to(torch.float64)
    uniform = torch.where(expected, 1.0 / counts, 0.0)
    torch.testing.assert_close(weights, uniform, rtol=0, atol=1e-12, msg=f"{where}: weights")


def expected_visible(seq_len: int, window: int, sink: int) -> torch.Tensor:
    """Build the convention's mask from triangular matrices, bool ``[seq_len, seq_len]``."""
    ones = torch.ones(seq_len, seq_len, dtype=torch.bool)
    causal = torch.tril(ones)
    # triu with diagonal -(window - 1) keeps key j >= i - (window - 1), that is i - j < window.
    band = torch.triu(ones, diagonal=-(window - 1))
    sink_columns = torch.arange(seq_len).view(1, -1) < sink
    return causal & (band | sink_columns)


def expected_row_counts(seq_len: int, window: int, sink: int) -> torch.Tensor:
    """Count the keys row i sees: ``min(i + 1, window)`` plus the sinks left of the window."""
    i = torch.arange(seq_len)
    in_window = torch.clamp(i + 1, max=window)
    sinks_left = torch.clamp(torch.clamp(i - window + 1, max=sink), min=0)
    return in_window + sinks_left


# The mask the adapter passes to SDPA.

MASK_CASES = [
    (seq_len, window, sink)
    for seq_len in [17, 512]
    for window in [1, 2, 3, seq_len - 1, seq_len, seq_len + 5]
    for sink in [0, 4]
]


@pytest.mark.parametrize(("seq_len", "window", "sink"), MASK_CASES)
def test_adapter_mask_row_counts(
    stories_model_f64: torch.nn.Module, seq_len: int, window: int, sink: int
) -> None:
    model = stories_model_f64
    apply_windows(model, uniform_windows(model, window), sink)
    expected = expected_visible(seq_len, window, sink)
    expected_counts = expected_row_counts(seq_len, window, sink)

    for layer, module in enumerate(attention_modules(model)):
        weights = attention_weights(module, model, seq_len, seq_len)[0]
        counts = (weights > 0).sum(dim=-1)
        assert torch.equal(counts, expected_counts.expand(STORIES_HEADS, seq_len)), (
            f"layer {layer}: row counts"
        )
        check_uniform_weights(weights, expected.expand_as(weights), f"layer {layer}")


def test_adapter_mask_per_head(stories_model_f64: torch.nn.Module) -> None:
    model = stories_model_f64
    seq_len, sink = 40, 3
    row = [1, 2, 5, 8, 16, 39, 40, 100]
    windows = [row[layer:] + row[:layer] for layer in range(STORIES_LAYERS)]
    apply_windows(model, windows, sink)

    for layer, module in enumerate(attention_modules(model)):
        weights = attention_weights(module, model, seq_len, seq_len)[0]
        for head, window in enumerate(windows[layer]):
            expected = expected_visible(seq_len, window, sink)
            check_uniform_weights(weights[head], expected, f"layer {layer} head {head}")


@pytest.mark.parametrize(
    ("q_len", "kv_len"),
    [
        (1, 512),  # one decoding step after a 511-token cache
        (3, 40),  # a chunk of three queries after a 37-token cache
        (1, 1),  # first decoding step without a prompt
    ],
)
def test_adapter_mask_with_cache_offset(
    stories_model_f64: torch.nn.Module, q_len: int, kv_len: int
) -> None:
    model = stories_model_f64
    sink = 2
    row: list[int | None] = [1, 3, 8, 39, 40, kv_len + 5, None, 16]
    apply_windows(model, [row] * STORIES_LAYERS, sink)
    module = attention_modules(model)[0]

    weights = attention_weights(module, model, q_len, kv_len)[0]

    for head, window in enumerate(row):
        full_window = kv_len if window is None else window
        # The queries are the last q_len positions, so they see the last q_len rows of the mask.
        expected = expected_visible(kv_len, full_window, sink)[kv_len - q_len :]
        check_uniform_weights(weights[head], expected, f"head {head}, window {window}")


# Windows at or above the length leave the model unchanged.

FULL_WINDOW_CASES = [
    "none",  # None: full attention
    "equal",  # exactly the length
    "above",  # length + 5
    "mixed",  # a mix of the three across heads
]


def full_windows(kind: str, layers: int, heads: int, seq_len: int) -> Windows:
    choices: list[int | None] = [None, seq_len, seq_len + 5]
    if kind == "mixed":
        return [[choices[(layer + head) % 3] for head in range(heads)] for layer in range(layers)]
    window = {"none": None, "equal": seq_len, "above": seq_len + 5}[kind]
    return [[window] * heads for _ in range(layers)]


def check_full_windows_unchanged(model: torch.nn.Module, ids: torch.Tensor, kind: str) -> None:
    reference = copy.deepcopy(model)
    expected = logits_of(reference, ids)
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    windows = full_windows(kind, layers, heads, ids.shape[1])

    apply_windows(model, windows)

    assert model.config._attn_implementation == ATTENTION_NAME
    actual = logits_of(model, ids)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seq_len", [17, 512])
@pytest.mark.parametrize("kind", FULL_WINDOW_CASES)
def test_full_windows_keep_logits(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor, seq_len: int, kind: str
) -> None:
    check_full_windows_unchanged(stories_model_f64, golden_ids[:, :seq_len], kind)


def test_full_windows_with_padding_keep_logits(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    seq_len = 48
    batch = golden_ids[:, :seq_len].repeat(2, 1)
    # The second row has a masked key in the middle and right padding, so the model's own mask
    # must reach the windowed function for the logits to match.
    padding = torch.ones(2, seq_len, dtype=torch.long)
    padding[1, 10] = 0
    padding[1, 40:] = 0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = reference(input_ids=batch, attention_mask=padding, use_cache=False).logits
    assert not torch.allclose(expected[1, 10:40], expected[0, 10:40]), "masked key had no effect"

    apply_windows(model, full_windows("mixed", STORIES_LAYERS, STORIES_HEADS, seq_len))
    with torch.no_grad():
        actual = model(input_ids=batch, attention_mask=padding, use_cache=False).logits

    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(actual[1, :40], expected[1, :40], rtol=0, atol=1e-10)


# One head's window changes that head only.


def check_single_head_change(
    model: torch.nn.Module, ids: torch.Tensor, base: Windows, layer: int, head: int, window: int
) -> None:
    apply_windows(model, base)
    before = attention_outputs(model, ids)
    changed = copy.deepcopy(base)
    changed[layer][head] = window
    set_windows(model, changed)
    after = attention_outputs(model, ids)

    for lower in range(layer):
        torch.testing.assert_close(
            after[lower], before[lower], rtol=0, atol=0, msg=f"layer {lower} below the change"
        )
    for other in range(model.config.num_attention_heads):
        if other == head:
            continue
        torch.testing.assert_close(
            after[layer][:, other],
            before[layer][:, other],
            rtol=0,
            atol=1e-12,
            msg=f"layer {layer} head {other} beside the changed head",
        )
    change = (after[layer][:, head] - before[layer][:, head]).abs().max().item()
    assert change > 1e-6, f"changed head {head} of layer {layer} moved by only {change}"
    for upper in range(layer + 1, model.config.num_hidden_layers):
        assert not torch.equal(after[upper], before[upper]), f"layer {upper} above did not change"


SINGLE_HEAD_CASES = [
    (0, 0),  # first layer, first head
    (2, 5),
    (4, 7),  # last layer, last head
]


@pytest.mark.parametrize(("layer", "head"), SINGLE_HEAD_CASES)
def test_single_head_change_is_local(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor, layer: int, head: int
) -> None:
    base = uniform_windows(stories_model_f64, 16)

    check_single_head_change(stories_model_f64, golden_ids[:, :64], base, layer, head, 3)


# Golden perplexities on the first 512 tokens of TinyStories.

GOLDEN_PERPLEXITIES = [
    # (window, sink tokens, perplexity)
    (None, 0, 4.288240),  # full attention
    (1, 0, 34.695158),  # each token sees only itself
    (8, 0, 5.870095),
    (64, 0, 4.422992),
    (16, 4, 5.001053),  # window plus attention sinks
]


def test_golden_perplexity_without_windows(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    assert perplexity(stories_model_f64, golden_ids) == pytest.approx(4.288240, abs=1e-5)


@pytest.mark.parametrize(("window", "sink", "expected"), GOLDEN_PERPLEXITIES)
def test_golden_perplexity(
    stories_model_f64: torch.nn.Module,
    golden_ids: torch.Tensor,
    window: int | None,
    sink: int,
    expected: float,
) -> None:
    apply_windows(stories_model_f64, uniform_windows(stories_model_f64, window), sink)

    assert perplexity(stories_model_f64, golden_ids) == pytest.approx(expected, abs=1e-5)


# Tiny random Qwen2 and Mistral models built from their configs.

TINY_BUILDERS = ["tiny_qwen2_f64", "tiny_mistral_f64"]


def tiny_ids(seq_len: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (1, seq_len), generator=generator)


@pytest.mark.parametrize("builder_name", TINY_BUILDERS)
def test_tiny_model_windows_take_effect(builder_name: str, request: pytest.FixtureRequest) -> None:
    build: Callable[[], torch.nn.Module] = request.getfixturevalue(builder_name)
    model = build()
    ids = tiny_ids(24)
    full = logits_of(model, ids)

    apply_windows(model, uniform_windows(model, 2), sink_tokens=1)

    assert model.config._attn_implementation == ATTENTION_NAME
    windowed = logits_of(model, ids)
    assert not torch.allclose(windowed, full), "a window of 2 left the logits unchanged"
    # Queries inside the window see all keys either way, so their logits agree.
    torch.testing.assert_close(windowed[:, :2], full[:, :2], rtol=0, atol=1e-10)


@pytest.mark.parametrize("builder_name", TINY_BUILDERS)
@pytest.mark.parametrize("kind", FULL_WINDOW_CASES)
def test_tiny_model_full_windows_keep_logits(
    builder_name: str, kind: str, request: pytest.FixtureRequest
) -> None:
    build: Callable[[], torch.nn.Module] = request.getfixturevalue(builder_name)

    check_full_windows_unchanged(build(), tiny_ids(24), kind)


@pytest.mark.parametrize("builder_name", TINY_BUILDERS)
@pytest.mark.parametrize(("layer", "head"), [(0, 1), (1, 2)])
def test_tiny_model_single_head_change(
    builder_name: str, layer: int, head: int, request: pytest.FixtureRequest
) -> None:
    build: Callable[[], torch.nn.Module] = request.getfixturevalue(builder_name)
    model = build()
    base = uniform_windows(model, 8)

    check_single_head_change(model, tiny_ids(24), base, layer, head, 2)


# Invalid windows and unsupported models.

BAD_SHAPES = [
    ("too few layers", [[None] * STORIES_HEADS] * (STORIES_LAYERS - 1)),
    ("too many layers", [[None] * STORIES_HEADS] * (STORIES_LAYERS + 1)),
    ("one row short", [[None] * STORIES_HEADS] * (STORIES_LAYERS - 1) + [[None] * 7]),
    ("KV-head granularity", [[None] * 4] * STORIES_LAYERS),
]


@pytest.mark.parametrize(("case", "windows"), BAD_SHAPES, ids=[case for case, _ in BAD_SHAPES])
def test_wrong_window_shape_raises(
    stories_model_f64: torch.nn.Module, case: str, windows: Windows
) -> None:
    with pytest.raises(ConfigError, match="windows have shape .* but the model has 5 layers x 8"):
        apply_windows(stories_model_f64, windows)

    assert stories_model_f64.config._attn_implementation == "sdpa"


def test_invalid_window_value_raises(stories_model_f64: torch.nn.Module) -> None:
    windows = uniform_windows(stories_model_f64, 4)
    windows[3][2] = 0

    with pytest.raises(ConfigError, match="invalid window 0"):
        apply_windows(stories_model_f64, windows)
    with pytest.raises(ConfigError, match="invalid sink_tokens -1"):
        apply_windows(stories_model_f64, uniform_windows(stories_model_f64, 4), sink_tokens=-1)

    assert stories_model_f64.config._attn_implementation == "sdpa"


def test_set_windows_invalid_keeps_old(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    ids = golden_ids[:, :64]
    apply_windows(model, uniform_windows(model, 4))
    expected = logits_of(model, ids)
    windows = uniform_windows(model, 8)
    windows[3][2] = 0

    with pytest.raises(ConfigError, match="invalid window 0"):
        set_windows(model, windows)

    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=0)


def hard_coded_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Compute Llama attention with a direct SDPA call, as models that bypass the registry do."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq_len, _ = hidden_states.shape
    shape = (batch, seq_len, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    output = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=self.scaling, enable_gqa=True
    )
    output = output.transpose(1, 2).reshape(batch, seq_len, -1)
    return self.o_proj(output), None


@pytest.mark.parametrize(
    "hard_coded_layers",
    [
        [0, 1, 2, 3, 4],  # no layer dispatches through the registry
        [3],  # a single layer bypasses it
    ],
)
def test_model_bypassing_registry_is_rejected(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor, hard_coded_layers: list[int]
) -> None:
    model = stories_model_f64
    ids = golden_ids[:, :32]
    sdpa_logits = logits_of(model, ids)
    modules = attention_modules(model)
    for layer in hard_coded_layers:
        modules[layer].forward = types.MethodType(hard_coded_attention_forward, modules[layer])
    # The replacement computes the same attention, so only the dispatch differs.
    torch.testing.assert_close(logits_of(model, ids), sdpa_logits, rtol=0, atol=1e-10)
    # Switch to eager attention, so the test can tell the previous implementation from the default.
    # Llama's eager softmax runs in float32, so its logits differ from SDPA's by about 1e-6.
    model.set_attn_implementation("eager")
    expected = logits_of(model, ids)

    with pytest.raises(
        UnsupportedModelError, match=re.escape(f"layers {hard_coded_layers} did not call")
    ):
        apply_windows(model, uniform_windows(model, 4))

    assert model.config._attn_implementation == "eager"
    assert all(module not in attention._LAYER_WINDOWS for module in modules)
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=1e-10)


def test_remove_windows_restores_logits(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    ids = golden_ids[:, :128]
    expected = logits_of(model, ids)
    apply_windows(model, uniform_windows(model, 4), sink_tokens=2)
    assert not torch.allclose(logits_of(model, ids), expected)

    remove_windows(model)

    assert model.config._attn_implementation == "sdpa"
    assert all(module not in attention._LAYER_WINDOWS for module in attention_modules(model))
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=1e-10)


def test_layer_without_windows_raises(stories_model_f64: torch.nn.Module) -> None:
    model = stories_model_f64
    apply_windows(model, uniform_windows(model, 4))
    del attention._LAYER_WINDOWS[attention_modules(model)[2]]

    with pytest.raises(UnsupportedModelError, match=r"\(layer 2\) has no windows"):
        logits_of(model, torch.ones(1, 4, dtype=torch.long))


# Grouped-query attention: query heads that share a KV head keep their own windows.


def test_gqa_heads_of_one_group_keep_own_windows(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    ids = golden_ids[:, :64]
    layer, first, second = 1, 2, 3  # query heads 2 and 3 share KV head 1
    assert first // STORIES_GROUP == second // STORIES_GROUP

    def outputs_for(first_window: int | None, second_window: int | None) -> torch.Tensor:
        windows = uniform_windows(model, None)
        windows[layer][first] = first_window
        windows[layer][second] = second_window
        apply_windows(model, windows)
        return attention_outputs(model, ids)[layer]

    split = outputs_for(3, None)
    both_windowed = outputs_for(3, 3)
    both_full = outputs_for(None, None)

    # Each head of the split group matches the shared case with its own window ...
    torch.testing.assert_close(split[:, first], both_windowed[:, first], rtol=0, atol=1e-12)
    torch.testing.assert_close(split[:, second], both_full[:, second], rtol=0, atol=1e-12)
    # ... and differs from the shared case with the other head's window.
    assert not torch.allclose(split[:, second], both_windowed[:, second], rtol=0, atol=1e-6)
    assert not torch.allclose(split[:, first], both_full[:, first], rtol=0, atol=1e-6)


# Padding and decoding with a KV cache.


def test_right_padding_keeps_logits(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    short_len, long_len = 20, 32
    apply_windows(model, uniform_windows(model, 5), sink_tokens=2)
    short = golden_ids[:, :short_len]
    expected = logits_of(model, short)

    # Right-pad the short row, so its tokens keep their positions next to a longer row.
    batch = golden_ids[:, :long_len].repeat(2, 1)
    batch[1, short_len:] = 0
    padding = torch.ones(2, long_len, dtype=torch.long)
    padding[1, short_len:] = 0
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=padding, use_cache=False).logits

    torch.testing.assert_close(logits[1:, :short_len], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(logits[:1], logits_of(model, batch[:1]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_padding_mask_combines_with_windows(
    stories_model_f64: torch.nn.Module, mask_kind: str
) -> None:
    model = stories_model_f64
    seq_len, window, sink, masked_key = 32, 5, 2, 10
    apply_windows(model, uniform_windows(model, window), sink)
    # Mask one key inside the window of later queries, in the second row only. The sinks keep
    # every query with at least one visible key.
    keep = torch.ones(2, seq_len, dtype=torch.bool)
    keep[1, masked_key] = False
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    model_mask = causal.view(1, 1, seq_len, seq_len) & keep.view(2, 1, 1, seq_len)
    if mask_kind == "additive":
        additive = torch.zeros(model_mask.shape, dtype=torch.float64)
        model_mask = additive.masked_fill(~model_mask, torch.finfo(torch.float64).min)
    module = attention_modules(model)[0]

    weights = attention_weights(module, model, seq_len, seq_len, model_mask)

    window_mask = expected_visible(seq_len, window, sink)
    second_row_mask = window_mask & (torch.arange(seq_len) != masked_key)
    for head in range(STORIES_HEADS):
        check_uniform_weights(weights[0, head], window_mask, f"head {head}, row 0")
        check_uniform_weights(weights[1, head], second_row_mask, f"head {head}, row 1")


def test_cached_decoding_matches_full_forward(
    stories_model_f64: torch.nn.Module, golden_ids: torch.Tensor
) -> None:
    model = stories_model_f64
    prompt = golden_ids[:, :24]
    new_tokens = 5
    apply_windows(model, uniform_windows(model, 8), sink_tokens=2)

    with torch.no_grad():
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_length=None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )

    ids = prompt
    for step in range(new_tokens):
        last_logits = logits_of(model, ids)[:, -1]
        # generate returns its logits in float32, so compare at float32 rounding.
        torch.testing.assert_close(
            generated.logits[step].double(),
            last_logits,
            rtol=1e-6,
            atol=1e-6,
            msg=f"step {step} logits",
        )
        ids = torch.cat([ids, last_logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(generated.sequences, ids)
