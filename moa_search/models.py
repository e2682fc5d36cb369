"""Loading causal LMs and reading the attention shape that windows are searched over."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moa_search.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelShape:
    """The attention layout of a model, as stored in its config."""

    model_id: str
    architecture: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    max_positions: int | None

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.num_query_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return {
            "id": self.model_id,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_kv_heads": self.num_kv_heads,
            "max_positions": self.max_positions,
        }


def model_shape(model: torch.nn.Module, model_id: str | None = None) -> ModelShape:
    """Read layers, query heads and KV heads from a transformers model's (text) config."""
    config = model.config.get_text_config()
    try:
        num_layers = int(config.num_hidden_layers)
        num_query_heads = int(config.num_attention_heads)
    except (AttributeError, TypeError) as error:
        raise UnsupportedModelError(
            f"model config {type(config).__name__} has no num_hidden_layers/num_attention_heads; "
            "moa-search needs a decoder-only transformer"
        ) from error
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_query_heads)
    if num_query_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"{num_query_heads} query heads do not split evenly over {num_kv_heads} KV heads"
        )
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    return ModelShape(
        model_id=model_id
        or str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        architecture=architectures[0],
        num_layers=num_layers,
        num_query_heads=num_query_heads,
        num_kv_heads=num_kv_heads,
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name from the CLI to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def load_model(
    model_id: str, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder or a Hugging Face hub id.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Its weight-loading bar would interleave with our own progress output.
    transformers_logging.disable_progress_bar()

    torch_dtype = resolve_dtype(dtype)
    local = Path(model_id).expanduser()
    source = str(local) if local.exists() else model_id
    if not local.exists() and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise ConfigError(
            f"model folder {model_id!r} does not exist; pass a local folder or a hub id"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not load model {model_id!r} (no local folder of that name and the hub load failed: "
            f"{reason})"
        ) from error
    model.to(device)
    model.eval()
    logger.info("loaded %s (%s) on %s as %s", model_id, type(model).__name__, device, dtype)
    return model, tokenizer
