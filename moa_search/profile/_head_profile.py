"""Head profile of the estimated loss increase per (layer, query head, window), with file I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moa_search.errors import ConfigError

FILE_FORMAT_VERSION = 1


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
