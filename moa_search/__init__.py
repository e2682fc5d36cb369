"""moa-search: per-head attention windows for causal LMs (Mixture of Attention Spans)."""

__version__ = "0.1.0"

from moa_search.attention import apply_windows, remove_windows, set_windows  # noqa: E402
from moa_search.errors import (  # noqa: E402
    CalibrationDataError,
    ConfigError,
    MoaSearchError,
    RunFolderError,
    UnsupportedModelError,
)
from moa_search.masks import WINDOW_CONVENTION, sliding_window  # noqa: E402
from moa_search.span_config import (  # noqa: E402
    SpanConfig,
    apply_span_config,
    load_span_config,
    save_span_config,
)

__all__ = [
    "WINDOW_CONVENTION",
    "CalibrationDataError",
    "ConfigError",
    "MoaSearchError",
    "RunFolderError",
    "SpanConfig",
    "UnsupportedModelError",
    "apply_span_config",
    "apply_windows",
    "load_span_config",
    "remove_windows",
    "save_span_config",
    "set_windows",
    "sliding_window",
]
