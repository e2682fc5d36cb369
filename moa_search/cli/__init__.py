"""The ``moa-search`` command line."""

from moa_search.cli.app import app, main
from moa_search.cli import commands  # noqa: E402,F401  (registers the commands on the app)

__all__ = ["app", "main"]
