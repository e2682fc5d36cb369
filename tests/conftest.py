"""Shared fixtures: the real stories260K model and TinyStories text, and tiny random models.

The real assets live in ``../shared`` relative to the repository root. CI always provides that
folder, so a missing folder is an error, not a skip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moa_search.models import load_model

REPO_ROOT = Path(__file__).resolve().parent.parent

# Token ids of the golden perplexity text: the model's full context.
GOLDEN_LENGTH = 512
# Characters of TinyStories read for the golden text; they tokenise to more than GOLDEN_LENGTH ids.
GOLDEN_CHARS = 4000


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Folder of the real model and data, ``../shared`` relative to the repository root."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared assets folder {path} not found; the tests need the stories260K model and the "
            "TinyStories subset in a folder named 'shared' next to the repository root"
        )
    return path


@pytest.fixture(scope="session")
def stories_path(shared_dir: Path) -> Path:
    """Folder of the pretrained stories260K Llama.

    The model has 5 layers, 8 query heads, 4 KV heads and 512 positions.
    """
    path = shared_dir / "models" / "stories260K"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stories260K model not found: {path}/config.json is missing")
    return path


@pytest.fixture(scope="session")
def tinystories_path(shared_dir: Path) -> Path:
    """Plain-text TinyStories subset used as calibration and golden text."""
    path = shared_dir / "data" / "tinystories_subset.txt"
    if not path.is_file():
        raise FileNotFoundError(f"TinyStories subset not found: {path}")
    return path


@pytest.fixture(scope="session")
def _stories_loaded(stories_path: Path) -> tuple[torch.nn.Module, Any]:
    """The stories260K model in float64 and its tokenizer, loaded once per session.

    Tests receive copies of the model through :func:`stories_model_f64`.
    """
    return load_model(str(stories_path), dtype="float64")


@pytest.fixture
def stories_model_f64(_stories_loaded: tuple[torch.nn.Module, Any]) -> torch.nn.Module:
    """A fresh float64 copy of stories260K in eval mode, free for the test to modify."""
    model, _ = _stories_loaded
    return copy.deepcopy(model)


@pytest.fixture(scope="session")
def stories_tokenizer(_stories_loaded: tuple[torch.nn.Module, Any]) -> Any:
    """The stories260K tokenizer; it prepends BOS (id 1)."""
    _, tokenizer = _stories_loaded
    return tokenizer


@pytest.fixture(scope="session")
def golden_ids(tinystories_path: Path, stories_tokenizer: Any) -> torch.Tensor:
    """The first 512 token ids of the TinyStories subset, int64 ``[1, 512]``, starting with BOS."""
    text = tinystories_path.read_text(encoding="utf-8")[:GOLDEN_CHARS]
    ids = stories_tokenizer(text, return_tensors="pt").input_ids[:, :GOLDEN_LENGTH]
    if ids.shape != (1, GOLDEN_LENGTH):
        raise ValueError(
            f"golden text tokenised to shape {tuple(ids.shape)}, expected (1, {GOLDEN_LENGTH})"
        )
    return ids


def _build_tiny_model(config_class_name: str, **overrides: Any) -> torch.nn.Module:
    """Build a random 2-layer causal LM with 4 query heads and 2 KV heads, float64, eval mode.

    The seed is fixed, so every call returns the same weights.
    """
    import transformers

    config_class = getattr(transformers, config_class_name)
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.float64)
    model.eval()
    return model


@pytest.fixture
def tiny_qwen2_f64() -> Callable[[], torch.nn.Module]:
    """Builder of identical tiny random Qwen2 models (2 layers, 4 query heads, 2 KV heads)."""
    return lambda: _build_tiny_model("Qwen2Config")


@pytest.fixture
def tiny_mistral_f64() -> Callable[[], torch.nn.Module]:
    """Builder of identical tiny random Mistral models (2 layers, 4 query heads, 2 KV heads).

    Mistral's config keeps its default sliding window of 4096 tokens, longer than any test
    sequence.
    """
    return lambda: _build_tiny_model("MistralConfig")
