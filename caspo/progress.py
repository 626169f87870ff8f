"""Progress bars that render in a terminal and from inside Ray actors alike, and a quiet terminal.

``quiet_terminal(log_path)`` sends everything the process and its libraries write (Ray, Ray Train, TRL,
``datasets``, warnings, C++ logs) to a log file and keeps the terminal for what the user came for:
the progress bars of this module and the lines passed to :func:`say`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TextIO

import ray
from ray.experimental import tqdm_ray
from tqdm.auto import tqdm


def _in_ray_worker() -> bool:
    try:
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _Closing:
    """Context-manager wrapper for bars that lack one (tqdm_ray)."""

    def __init__(self, inner):
        self.inner = inner

    def update(self, n: int = 1) -> None:
        self.inner.update(n)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


_terminal: TextIO | None = None  # set by quiet_terminal; None: sys.stdout / sys.stderr as usual


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A progress bar: tqdm in a terminal, ray's tqdm_ray (drawn by the driver) inside an actor."""
    if not enabled:
        return _Off()
    if _in_ray_worker():
        return _Closing(tqdm_ray.tqdm(total=total, desc=desc, unit=unit))
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=_terminal or sys.stderr)


def say(*parts, end: str = "\n") -> None:
    """A line for the user: to the terminal even when the process's output goes to a log file."""
    print(*parts, end=end, file=_terminal or sys.stdout, flush=True)


def quiet_terminal(log_path: str | Path) -> Path:
    """From now on, this process's stdout and stderr (file descriptors 1 and 2, so C++ and child output
    too), Python warnings and every logger go to ``log_path``; :func:`bar` and :func:`say` keep the
    terminal. Returns the log file's path."""
    global _terminal
    path = Path(log_path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if _terminal is None:
        _terminal = os.fdopen(os.dup(1), "w", buffering=1)
    log = open(path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    return path
