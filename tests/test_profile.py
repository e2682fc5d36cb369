"""Tests of the head profile: estimator math, the profiling attention and whole profiles."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moa_search.attention import apply_windows, remove_windows, set_windows
from moa_search.errors import ConfigError, UnsupportedModelError
from moa_search.masks import FULL_WINDOW, is_visible, window_tensor
from moa_search.profile import (
    HeadProfile,
    _LayerStatistics,
    _ProfiledAttention,
    profile_estimators,
    profile_heads,
    row_loss_increase,
)


def _random_causal_attention(
    batch: int, heads: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """Softmax of random logits under a causal mask, float64 ``[batch, heads, length, length]``."""
    logits = torch.randn(batch, heads, length, length, generator=generator, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def _brute_force_estimates(
    attn: torch.Tensor, grad: torch.Tensor, windows: list[int | None], sink_tokens: int
) -> dict[str, torch.Tensor]:
    """Compute per-row estimates ``[..., rows, candidates]`` from an explicit dropped set."""
    length = attn.shape[-1]
    q_idx = torch.arange(length).view(-1, 1)
    kv_idx = torch.arange(length).view(1, -1)
    causal = kv_idx <= q_idx
    row_total = (attn * grad).sum(dim=-1)
    set_columns, additive_columns = [], []
    for window in windows:
        width = FULL_WINDOW if window is None else window
        dropped = causal & ~is_visible(q_idx, kv_idx, width, sink_tokens)  # [rows, keys]
        mass = (attn * dropped).sum(dim=-1)
        dropped_weighted = (attn * grad * dropped).sum(dim=-1)
        set_columns.append((row_total - dropped_weighted) * mass / (1 - mass) - dropped_weighted)
        single = torch.where(dropped, attn * (row_total[..., None] - grad) / (1 - attn), 0.0)
        additive_columns.append(single.sum(dim=-1))
    return {"set": torch.stack(set_columns, -1), "additive": torch.stack(additive_columns, -1)}


# --- single attention row against the exact change of a quadratic loss ---------------------------

# (length, sink_tokens, window, logit shift of the dropped keys); larger shifts make the dropped
# mass m small.
SINGLE_ROW_CASES = [
    (16, 0, 4, 0.0),  # no sink, a large dropped mass
    (16, 2, 4, 0.0),  # sinks kept on top of the window
    (16, 1, 8, 2.0),  # dropped logits lowered: m shrinks
    (32, 1, 1, 4.0),  # window 1 keeps only the diagonal and the sink
    (32, 0, 30, 0.0),  # a window that drops two keys
]


@pytest.mark.parametrize(("length", "sink_tokens", "window", "shift"), SINGLE_ROW_CASES)
def test_set_estimate_single_row(length: int, sink_tokens: int, window: int, shift: float) -> None:
    generator = torch.Generator().manual_seed(length + window)
    row = length - 1
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[sink_tokens : row - window + 1] = True
    logits = torch.randn(length, generator=generator, dtype=torch.float64) - shift * dropped
    attn = logits.softmax(dim=0)

    # Quadratic loss L(A) = c.A + 0.5 sum d A^2, so g = c + d A and the exact change is known.
    linear = torch.randn(length, generator=generator, dtype=torch.float64)
    curvature = torch.randn(length, generator=generator, dtype=torch.float64)
    grad = linear + curvature * attn

    def loss(values: torch.Tensor) -> torch.Tensor:
        return (linear * values).sum() + 0.5 * (curvature * values**2).sum()

    mass = attn[dropped].sum()
    masked = torch.where(dropped, 0.0, attn) / (1 - mass)
    exact = loss(masked) - loss(attn)

    estimates = row_loss_increase(
        attn.view(1, 1, 1, length),
        grad.view(1, 1, 1, length),
        row,
        window_tensor([window]),
        sink_tokens,
        ("set", "additive"),
    )
    estimate = estimates["set"].item()
    # The set estimate is the exact linear term g . (A' - A) ...
    assert estimate == pytest.approx((grad * (masked - attn)).sum().item(), rel=1e-12, abs=1e-14)
    # ... so its error is the quadratic remainder 0.5 sum d (A' - A)^2 <= 2 max|d| m^2.
    bound = 2 * curvature.abs().max().item() * mass.item() ** 2
    assert abs(estimate - exact.item()) <= bound + 1e-14
    # The additive estimate is the per-key sum A_j (S - g_j) / (1 - A_j) over the dropped keys.
    row_total = (attn * grad).sum()
    additive = (attn * (row_total - grad) / (1 - attn))[dropped].sum()
    assert estimates["additive"].item() == pytest.approx(additive.item(), rel=1e-12, abs=1e-14)


def test_set_estimate_error_quadratic() -> None:
    # Lowering the dropped logits by 2 shrinks m about e^2-fold; the error must shrink about
    # e^4-fold.
    generator = torch.Generator().manual_seed(3)
    length, window = 24, 6
    dropped = torch.zeros(length, dtype=torch.bool)
    dropped[: length - window] = True
    base = torch.randn(length, generator=generator, dtype=torch.float64)
    linear = torch.randn(length, generator=generator, dtype=torch.float64)
    curvature = torch.rand(length, generator=generator, dtype=torch.float64) + 0.5
    errors, masses = [], []
    for shift in (4.0, 6.0, 8.0):
        attn = (base - shift * dropped).softmax(dim=0)
        grad = linear + curvature * attn
        mass = attn[dropped].sum()
        masked = torch.where(dropped, 0.0, attn) / (1 - mass)
        exact = (linear * (masked - attn)).sum() + 0.5 * (curvature * (masked**2 - attn**2)).sum()
        estimate = row_loss_increase(
            attn.view(1, length),
            grad.view(1, length),
            length - 1,
            window_tensor([window]),
            0,
            ("set",),
        )["set"].item()
        errors.append(abs(estimate - exact.item()))
        masses.append(mass.item())
    for step in range(2):
        error_ratio = errors[step] / errors[step + 1]
        mass_ratio = (masses[step] / masses[step + 1]) ** 2
        assert error_ratio == pytest.approx(mass_ratio, rel=0.2)


# --- prefix-sum gathering against brute force ----------------------------------------------------

# (length, sink_tokens, windows, row_start of the block); windows include 1, >= length and None.
PREFIX_CASES = [
    (1, 0, [1, 2, None], 0),  # a single position: nothing can be dropped
    (5, 0, [1, 2, 5, 7, None], 0),  # windows at and past the length drop nothing
    (17, 1, [1, 3, 8, 16, 17, None], 0),  # one sink
    (17, 3, [1, 4, 13, None], 0),  # sinks that cover some dropped ranges
    (33, 40, [1, 8], 0),  # more sinks than positions: nothing dropped
    (33, 2, [1, 5, 20, 32, 33], 12),  # a block of rows that starts mid-sequence
    (
        70,
        33,
        [1, 2, 31, 32, 64],
        40,
    ),  # cuts on both sides of key-group edges, sinks past the first group
]


@pytest.mark.parametrize(("length", "sink_tokens", "windows", "row_start"), PREFIX_CASES)
def test_prefix_sums_match_brute_force(
    length: int, sink_tokens: int, windows: list[int | None], row_start: int
) -> None:
    generator = torch.Generator().manual_seed(length * 7 + sink_tokens)
    attn = _random_causal_attention(2, 3, length, generator)
    grad = torch.randn(attn.shape, generator=generator, dtype=torch.float64)
    expected = _brute_force_estimates(attn, grad, windows, sink_tokens)

    # The block holds rows row_start.. and only the keys up to its last row, as the backward pass
    # passes it.
    block = (slice(None), slice(None), slice(row_start, length), slice(0, length))
    estimates = row_loss_increase(
        attn[block],
        grad[block],
        row_start,
        window_tensor(windows),
        sink_tokens,
        ("set", "additive"),
    )
    for name in ("set", "additive"):
        torch.testing.assert_close(
            estimates[name], expected[name][..., row_start:, :], rtol=1e-10, atol=1e-12
        )


def test_full_windows_estimate_zero() -> None:
    generator = torch.Generator().manual_seed(1)
    attn = _random_causal_attention(1, 2, 9, generator)
    grad = torch.randn(attn.shape, generator=generator, dtype=torch.float64)
    estimates = row_loss_increase(
        attn, grad, 0, window_tensor([9, 50, None]), 0, ("set", "additive")
    )
    for name in ("set", "additive"):
        assert torch.count_nonzero(estimates[name]) == 0


# --- the profiling attention function ------------------------------------------------------------


def _eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    length = query.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if mask is not None:
        causal = causal & mask
    attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return attn @ value, attn


# (length, block elements): blocks of 1 row, of a few rows, and the whole sequence in one block, at
# lengths inside one key group and across three.
ATTENTION_CASES = [(11, 1), (11, 200), (70, 2000), (70, 2**21)]


@pytest.mark.parametrize(("length", "block_elements"), ATTENTION_CASES)
def test_profiled_attention_matches_eager(
    length: int, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("moa_search.profile._attention.BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(length)
    shape = (2, 4, length, 5)
    query, key, value = (
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(True)
        for _ in range(3)
    )
    # A model mask that hides key 2 from every query after position 3 (bool, broadcast over heads).
    mask = torch.ones(2, 1, length, length, dtype=torch.bool)
    mask[:, :, 4:, 2] = False
    weights = torch.randn(shape, generator=generator, dtype=torch.float64)
    windows = [1, 3, 8, None]
    statistics = _LayerStatistics(window_tensor(windows), 1, ("set", "additive"))

    output = _ProfiledAttention.apply(query, key, value, mask, 0.4, statistics)
    grads = torch.autograd.grad((output * weights).sum(), (query, key, value))

    expected_output, attn = _eager_attention(query, key, value, mask, 0.4)
    attn.retain_grad()
    (expected_output * weights).sum().backward()
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)
    for got, leaf, name in zip(grads, (query, key, value), ("query", "key", "value"), strict=True):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12, msg=name)

    # The statistics are the brute-force estimates of (A, dL/dA), summed over batch and rows.
    expected = _brute_force_estimates(attn.detach(), attn.grad, windows, 1)
    for name in ("set", "additive"):
        torch.testing.assert_close(
            statistics.sums[name], expected[name].sum(dim=(0, 2)), rtol=1e-10, atol=1e-12
        )


# --- full profiles on a tiny random Llama --------------------------------------------------------


def _tiny_llama() -> torch.nn.Module:
    """Build a random 2-layer Llama, 4 query over 2 KV heads, float64, eval mode, fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def _tiny_ids(num_sequences: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(
        0, 64, (num_sequences, length), generator=torch.Generator().manual_seed(5)
    )


def _mean_nll(model: torch.nn.Module, ids: torch.Tensor, supervised: int | None = None) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].to(torch.float64)
    labels = ids[:, 1:]
    if supervised is not None:
        logits, labels = logits[:, -supervised:], labels[:, -supervised:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def test_profile_predicts_single_head_change() -> None:
    model = _tiny_llama()
    ids = _tiny_ids()
    windows = [40, None]
    profile = profile_heads(model, ids, windows, sink_tokens=1)
    dense = _mean_nll(model, ids)
    assert profile.dense_nll == pytest.approx(dense, rel=1e-12)
    assert np.all(profile.loss_increase[:, :, 1] == 0.0)

    # Window 40 of 48 tokens drops at most 7 keys per row, a small share of this random model's
    # near-uniform attention, so the second-order remainder stays within a few percent of the
    # change.
    apply_windows(model, [[None] * 4] * 2, sink_tokens=1)
    for layer in range(2):
        for head in range(4):
            plan: list[list[int | None]] = [[None] * 4 for _ in range(2)]
            plan[layer][head] = 40
            set_windows(model, plan, sink_tokens=1)
            exact = _mean_nll(model, ids) - dense
            predicted = profile.predict_loss_increase(plan)
            assert predicted == pytest.approx(exact, rel=0.05, abs=1e-6), (layer, head)
    remove_windows(model)


def test_profile_float32_matches_float64() -> None:
    # float32 models compute products in float32 and sums in float64; estimates stay close.
    ids = _tiny_ids()
    reference = profile_heads(_tiny_llama(), ids, [2, 16, None], sink_tokens=1)
    single = profile_heads(_tiny_llama().to(torch.float32), ids, [2, 16, None], sink_tokens=1)
    np.testing.assert_allclose(single.loss_increase, reference.loss_increase, rtol=1e-3, atol=1e-7)
    assert single.dense_nll == pytest.approx(reference.dense_nll, rel=1e-6)


def test_profile_supervised_tokens() -> None:
    model = _tiny_llama()
    ids = _tiny_ids()
    profile = profile_heads(model, ids, [4, None], supervised_tokens=10)
    assert profile.dense_nll == pytest.approx(_mean_nll(model, ids, supervised=10), rel=1e-12)
    assert profile.supervised_tokens == 10


def test_profile_estimators_share_pass() -> None:
    model = _tiny_llama()
    ids = _tiny_ids()
    both = profile_estimators(model, ids, [2, 16, None], sink_tokens=2)
    for name in ("set", "additive"):
        single = profile_heads(model, ids, [2, 16, None], sink_tokens=2, estimator=name)
        assert single == both[name]


def test_profile_batch_size_invariant() -> None:
    model = _tiny_llama()
    ids = _tiny_ids(num_sequences=3)
    calls: list[tuple[int, int]] = []
    one = profile_heads(model, ids, [3, 12], batch_size=1)
    two = profile_heads(model, ids, [3, 12], batch_size=2, progress=lambda *a: calls.append(a))
    np.testing.assert_allclose(two.loss_increase, one.loss_increase, rtol=1e-9, atol=1e-15)
    assert two.dense_nll == pytest.approx(one.dense_nll, rel=1e-12)
    assert calls == [(2, 3), (3, 3)]


def test_profile_reproducible(tmp_path: Path) -> None:
    model = _tiny_llama()
    ids = _tiny_ids()
    first = profile_heads(model, ids, [1, 8, None], sink_tokens=1, estimator="additive")
    second = profile_heads(model, ids, [1, 8, None], sink_tokens=1, estimator="additive")
    assert np.array_equal(first.loss_increase, second.loss_increase)
    assert first.dense_nll == second.dense_nll

    path = tmp_path / "profile.npz"
    first.to_file(path)
    loaded = HeadProfile.from_file(path)
    assert loaded == first
    assert loaded.loss_increase.dtype == np.float64
    assert loaded.windows == (1, 8, None)


def test_profile_file_rejects_other_file(tmp_path: Path) -> None:
    path = tmp_path / "not_a_profile.npz"
    np.savez(path, values=np.zeros(3))
    with pytest.raises(ConfigError, match="cannot read head profile"):
        HeadProfile.from_file(path)


def test_profile_restores_model() -> None:
    model = _tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # tied to the embeddings, so both become frozen
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    implementation = model.config._attn_implementation
    model.train()

    profile_heads(model, _tiny_ids(), [4])
    assert model.config._attn_implementation == implementation
    assert model.training
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name not in frozen), name
        assert parameter.grad is None, name


def test_profile_restores_after_error() -> None:
    model = _tiny_llama()
    implementation = model.config._attn_implementation

    def fail(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_heads(model, _tiny_ids(), [4], progress=fail)
    assert model.config._attn_implementation == implementation
    assert all(parameter.requires_grad for parameter in model.parameters())


# (keyword arguments, message pattern): each invalid setting raises ConfigError naming the value.
INVALID_CASES: list[tuple[dict[str, Any], str]] = [
    ({"estimator": "exact"}, "unknown estimator 'exact'"),
    ({"windows": []}, "window list is empty"),
    ({"windows": [4, 4]}, "has duplicates"),
    ({"windows": [0]}, "invalid window 0"),
    ({"supervised_tokens": 0}, r"invalid supervised_tokens 0: use 1\.\.47"),
    ({"supervised_tokens": 48}, r"invalid supervised_tokens 48: use 1\.\.47"),
    ({"sink_tokens": -1}, "invalid sink_tokens -1"),
    ({"batch_size": 0}, "invalid batch_size 0"),
    ({"input_ids": torch.zeros(48, dtype=torch.int64)}, "input_ids must be an integer tensor"),
    ({"input_ids": torch.zeros(1, 65, dtype=torch.int64)}, "exceeds the model's 64 positions"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID_CASES)
def test_profile_rejects_invalid(overrides: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"input_ids": _tiny_ids(), "windows": [4, None]} | overrides
    with pytest.raises(ConfigError, match=message):
        profile_heads(_tiny_llama(), **arguments)


def test_profile_rejects_bypassing_layer() -> None:
    # A private config copy keeps layer 1 on sdpa when the model switches to profiling attention.
    model = _tiny_llama()
    model.model.layers[1].self_attn.config = copy.deepcopy(model.config)
    with pytest.raises(UnsupportedModelError, match=r"layers \[1\] did not call"):
        profile_heads(model, _tiny_ids(), [4])
    assert model.config._attn_implementation == "sdpa"


def test_profile_mistral_model_mask(tiny_mistral_f64: Any) -> None:
    # Mistral builds its own sliding-window mask; the profile must still match the model's NLL.
    model = tiny_mistral_f64()
    ids = _tiny_ids(length=32)
    profile = profile_heads(model, ids, [8, None])
    assert profile.dense_nll == pytest.approx(_mean_nll(model, ids), rel=1e-12)
    assert profile.loss_increase.shape == (2, 4, 2)


# --- the real stories260K model ------------------------------------------------------------------


@pytest.mark.slow
def test_profile_stories260k(
    stories_model_f64: torch.nn.Module, stories_tokenizer: Any, tinystories_path: Path
) -> None:
    model = stories_model_f64
    text = tinystories_path.read_text(encoding="utf-8")[:4000]
    ids = stories_tokenizer(text, return_tensors="pt").input_ids[0, :256].view(2, 128)
    windows = [4, 8, 16, 32, 64, None]
    profile = profile_heads(model, ids, windows, sink_tokens=1)

    assert profile.loss_increase.shape == (5, 8, 6)
    assert np.all(np.isfinite(profile.loss_increase))
    assert np.all(profile.loss_increase[:, :, -1] == 0.0)
    # Larger windows cost less in total. Single heads are noisy on 254 predicted tokens: even the
    # measured changes of this model fall between adjacent windows for only about two thirds of the
    # heads.
    totals = profile.loss_increase.sum(axis=(0, 1))
    assert totals[0] > totals[2] > totals[4]
    assert np.mean(profile.loss_increase[:, :, 0] > profile.loss_increase[:, :, 4]) >= 0.6

    # Across heads, the estimates for window 32 follow the measured change of each head alone.
    apply_windows(model, [[None] * 8] * 5, sink_tokens=1)
    dense = profile.dense_nll
    measured = np.zeros((5, 8))
    for layer in range(5):
        for head in range(8):
            plan: list[list[int | None]] = [[None] * 8 for _ in range(5)]
            plan[layer][head] = 32
            set_windows(model, plan, sink_tokens=1)
            measured[layer, head] = _mean_nll(model, ids) - dense
    remove_windows(model)
    correlation = np.corrcoef(profile.loss_increase[:, :, 3].ravel(), measured.ravel())[0, 1]
    assert correlation > 0.8
