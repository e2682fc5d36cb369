"""The ``moa-search`` command line."""

from moa_search.cli.app import app, main

# Importing the command modules registers their commands on the app, in this order in --help.
from moa_search.cli import run_command  # noqa: E402,F401,I001
from moa_search.cli import results  # noqa: E402,F401
from moa_search.cli import profile_command  # noqa: E402,F401

__all__ = ["app", "main"]
