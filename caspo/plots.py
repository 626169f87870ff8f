"""Figures to files: matplotlib's pyplot on the Agg backend, and saving a figure.

pyplot is imported when a figure is drawn rather than at the top: choosing a backend is process-wide,
and importing a module that draws (the CLI imports them all) must not switch the backend of, say, a
notebook.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures to files, no display)."""
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (its folder made if needed) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path
