"""Typer application: global options and the error handler shared by every command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import datasets
import optuna
import typer
from typer.exceptions import TyperException
from rich.console import Console
from rich.logging import RichHandler

from moa_search.errors import MoaSearchError

app = typer.Typer(
    name="moa-search",
    help="Search a sliding-window length for every attention head of a causal LM.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Results go to stdout; progress, logs and errors go to stderr. A piped table keeps 160 columns
# instead of Rich's default 80, so window summaries stay readable in files.
stdout = Console(width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(command: F) -> F:
    """Turn a :class:`MoaSearchError` into one red line on stderr and exit status 1 (``--debug`` re-raises)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MoaSearchError as error:
            if _state["debug"]:
                raise
            stderr.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            # Ctrl-C outside the search loop, e.g. while the model loads or the heads are profiled.
            if _state["debug"]:
                raise
            stderr.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def configure(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress details.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    """Search a sliding-window length for every attention head of a causal LM (Mixture of Attention Spans)."""
    _state["debug"] = debug
    level = logging.WARNING
    if verbose:
        level = logging.INFO
    if debug:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False)],
        force=True,
    )
    for noisy in ("transformers", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Optuna logs every trial, and a Ctrl-C as a failed trial with all its parameters. The progress
    # bar reports the same in fewer lines, so Optuna's handler is removed and only its errors pass.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.DEBUG if debug else logging.ERROR)
    # The datasets library draws a bar per split it generates; our own stages already report them.
    datasets.disable_progress_bars()


def main() -> None:
    """Entry point of the ``moa-search`` console script.

    Usage errors that Click detects (an unknown option, a value outside a choice) get the same
    one-line form as our own errors, with Click's exit status 2.
    """
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except typer.Abort:
        stderr.print("aborted")
        sys.exit(130)
    except TyperException as error:
        # Typer bundles its own Click; its usage errors derive from TyperException and carry a
        # context.
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        if not message:
            sys.exit(0)  # no arguments at all: the help was printed
        message = message.replace("Value error, ", "").rstrip(".")
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        stderr.print(f"[bold red]error:[/] {message}{hint}", highlight=False, soft_wrap=True)
        sys.exit(getattr(error, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
