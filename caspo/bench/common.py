"""What the suites share: timing, the held-out problems, and writing JSON, markdown and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caspo.config import Config, load_config
from caspo.plots import pyplot


@dataclass
class SuiteResult:
    suite: str
    title: str
    command: str
    rows: list[dict]
    columns: list[str]
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    i = (len(s) - 1) * q
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, tuple)):  # an interval
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _with_ci(row: dict, col: str) -> str:
    """A cell, followed by its 95% interval when the row carries ``<col>_ci``."""
    ci = row.get(f"{col}_ci")
    if ci and ci[0] is not None and row.get(col) is not None:
        return f"{_cell(row[col])} [{_cell(ci[0])}, {_cell(ci[1])}]"
    return _cell(row.get(col))


def markdown(res: SuiteResult) -> str:
    lines = [f"### {res.title}", "", f"`{res.command}`", ""]
    lines.append("| " + " | ".join(res.columns) + " |")
    lines.append("|" + "|".join("---" for _ in res.columns) + "|")
    for r in res.rows:
        lines.append("| " + " | ".join(_with_ci(r, c) for c in res.columns) + " |")
    for n in res.notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def write(res: SuiteResult, out: Path, plot=None) -> list[Path]:
    """<out>/<suite>.json and .md, and .png when ``plot(ax_factory, res, path)`` is given."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{res.suite}.json", out / f"{res.suite}.md"]
    payload = {"suite": res.suite, "title": res.title, "command": res.command, "machine": machine(), "rows": res.rows, "notes": res.notes, **res.extra}
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    paths[1].write_text(markdown(res))
    if plot is not None:
        plt = pyplot()
        png = out / f"{res.suite}.png"
        fig = plot(plt, res)
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(png)
    return paths


def model_overrides(model: str, backend: str) -> list[str]:
    return [f"model.policy={model}", f"model.backend={backend}"]


def suite_model(model: str = "tiny", backend: str = "hf") -> Config:
    """The config of the model the suites measure (build it with ``caspo.models.factory.make_backend``):
    the tiny reasoner on HF by default, any model on vLLM."""
    return load_config(None, model_overrides(model, backend))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
