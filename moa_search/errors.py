"""Exceptions raised for bad input.

Every error carries a one-line message that names the bad value, the valid range and what to do;
the CLI prints that line and exits with status 1.
"""

from __future__ import annotations


class MoaSearchError(ValueError):
    """Base class for errors caused by the user's input, settings or environment."""


class ConfigError(MoaSearchError):
    """A search space, span config or run setting is invalid."""


class UnsupportedModelError(MoaSearchError):
    """The model's attention cannot be controlled per head, so windows cannot be applied."""


class CalibrationDataError(MoaSearchError):
    """The calibration data cannot be loaded or is too short for the requested sequences."""


class RunFolderError(MoaSearchError):
    """A run folder is missing, incomplete or does not match the requested operation."""
