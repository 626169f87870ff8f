"""A policy's calibration file (``calibration.json``, written by ``caspo calibrate``): where it lives, how
it is read and written, and which one a cat search uses. The CLI, Serve and the benchmarks look it up
here; the rule that fills it is ``caspo.core.calibration``, the warm-up that runs that rule
``caspo.evaluation.calibrate``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from caspo.config import ConfigError
from caspo.core.calibration import CALIBRATION_FILE
from caspo.core.confidence import UNCERTAINTIES
from caspo.models.hf import resolve_model_path
from caspo.models.tiny import SHIPPED_DIR, caspo_home


class CalibrationError(ConfigError):
    """A calibration file that is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Calibration:
    tau: float
    branch_threshold: float
    uncertainty: str
    path: str = ""  # where it was read from


def _threshold_value(v) -> float:
    return math.inf if v == "inf" else v


def read_calibration(path: str | os.PathLike) -> Calibration:
    """A calibration file (JSON with at least ``tau`` in [0, 1], ``branch_threshold`` >= 0 or the string
    "inf", and ``uncertainty``; the rest is the warm-up's record). CalibrationError names file and field."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist (write one with `caspo calibrate`)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"calibration file {p} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"calibration file {p} must hold a JSON object, got {type(data).__name__}")
    for key in ("tau", "branch_threshold", "uncertainty"):
        if key not in data:
            raise CalibrationError(f"calibration file {p}: {key} is missing")
    tau, th, unc = data["tau"], _threshold_value(data["branch_threshold"]), data["uncertainty"]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise CalibrationError(f"calibration file {p}: tau must be a number in [0, 1], got {tau!r}")
    if isinstance(th, bool) or not isinstance(th, (int, float)) or math.isnan(th) or th < 0:
        raise CalibrationError(f"calibration file {p}: branch_threshold must be a number >= 0 or \"inf\", got {data['branch_threshold']!r}")
    if unc not in UNCERTAINTIES:
        raise CalibrationError(f"calibration file {p}: uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {unc!r}")
    return Calibration(float(tau), float(th), unc, str(p))


def write_calibration(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` (with tau, branch_threshold, uncertainty) atomically; inf is written as "inf"."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in data.items()}
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=lambda v: "inf" if v == math.inf else str(v)) + "\n")
    tmp.replace(p)
    read_calibration(p)  # what is written must read back
    return p


def calibration_path_for(model: str) -> Path:
    """Where a policy's calibration file lives: next to the policy (``<dir>/calibration.json``); for the
    shipped tiny weights and hub ids, under ``$CASPO_HOME/calibration/`` (the package stays read-only)."""
    path = Path(resolve_model_path(model))
    if path.is_dir() and path.resolve() != SHIPPED_DIR.resolve():
        return path / CALIBRATION_FILE
    if path.is_dir():  # the shipped weights: named by which weights they are, so an upgrade's new
        # weights do not pick up the calibration that was measured on the old ones
        name = "tiny-shipped-" + hashlib.sha1((path / "train_meta.json").read_bytes()).hexdigest()[:8]
    else:
        name = str(path).replace("/", "--")
    return caspo_home() / "calibration" / f"{name}.json"


def find_calibration(named: str | os.PathLike | None, policy: str) -> Calibration | None:
    """The calibration a cat search on ``policy`` uses: the ``named`` file (``--calibration`` or
    ``cat.calibration``; it must exist), else the one next to the policy when there is one, else None.
    A malformed file raises CalibrationError naming the file and the field."""
    if named:
        return read_calibration(named)
    path = calibration_path_for(policy)
    return read_calibration(path) if path.is_file() else None
