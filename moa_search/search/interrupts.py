"""Ctrl-C during a search: a stop request between storage writes, an exception inside computation.

A KeyboardInterrupt that lands inside Optuna's storage calls can leave a trial RUNNING in the
study. In Optuna 5.1 it can also surface as an UnboundLocalError from the trial loop, and one that
lands in a garbage-collection callback of SQLAlchemy is swallowed. So while :func:`deferred` is
active, Ctrl-C only records a stop request, which the trial loop and the fitted rounds check
between steps. Inside :func:`immediate` blocks (exact evaluations, knapsack solves, surrogate
fits), which write no storage, and on a second Ctrl-C, it raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

logger = logging.getLogger(__name__)


class _State:
    active = False
    requested = False
    immediate_depth = 0


_state = _State()


def _handle_sigint(signum: int, frame: FrameType | None) -> None:
    if _state.immediate_depth > 0 or _state.requested:
        _state.requested = True
        raise KeyboardInterrupt
    _state.requested = True
    logger.warning("stopping after the current step; press Ctrl-C again to stop at once")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Turn Ctrl-C into a stop request for the duration of the block.

    Outside the main thread, where Python cannot install signal handlers, Ctrl-C keeps its default
    behaviour.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handle_sigint)
    _state.active, _state.requested = True, False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state.active = False


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Let Ctrl-C raise KeyboardInterrupt at once inside the block, which must not write storage.

    Raises:
        KeyboardInterrupt: on entry when a stop was requested already.
    """
    if _state.active and _state.requested:
        raise KeyboardInterrupt
    _state.immediate_depth += 1
    try:
        yield
    finally:
        _state.immediate_depth -= 1


def stop_requested() -> bool:
    """Return whether Ctrl-C was pressed since the current :func:`deferred` block began."""
    return _state.active and _state.requested
