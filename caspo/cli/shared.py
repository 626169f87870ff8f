"""What the commands share: the config they read, the search flags, and the table they print."""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading

from caspo.config import PROMPT_FORMATS, load_config
from caspo.core.confidence import SCORINGS, UNCERTAINTIES
from caspo.core.search import BRANCHINGS, METHODS, SearchConfig
from caspo.errors import UsageError
from caspo.models.calibration_file import CalibrationError, find_calibration
from caspo.progress import say


EXIT_USAGE = 2


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def cell(row: dict, column: str) -> str:
    """A value, with its 95% interval when the row carries one (``<column>_ci``)."""
    text = fmt(row.get(column))
    ci = row.get(f"{column}_ci")
    if text != "-" and isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    say("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    say("  ".join("-" * w for w in widths))
    for row in cells:
        say("  ".join(v.ljust(w) for v, w in zip(row, widths)))


SEARCH_DEFAULTS = {"k": 4, "tau": 0.5, "max_steps": 12, "scoring": "entropy", "temperature": 0.7}


ADAPTIVE_FLAGS = ("branching", "branch_threshold", "uncertainty", "width", "prune_scoring", "window")


DEFAULT_CONFIG = "configs/tiny-cpu.yaml"


def config_of(args):
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


def calibration_of(args, cat, model: str):
    """The calibration a cat search uses (``find_calibration``): --calibration, else cat.calibration, else
    the one next to the policy. A named file that is missing or malformed is a usage error."""
    try:
        return find_calibration(getattr(args, "calibration", None) or cat.calibration, model)
    except CalibrationError as e:
        raise UsageError(str(e)) from e


def search_config(args, cfg=None, model: str | None = None) -> SearchConfig:
    """Flags given win; ``--method cat`` fills the rest from the config's cat section (and a calibration
    file), other methods from SEARCH_DEFAULTS."""
    given = {f: getattr(args, f, None) for f in (*SEARCH_DEFAULTS, *ADAPTIVE_FLAGS)}
    try:
        if args.method == "cat":
            cat = (cfg or config_of(args)).cat
            cal = calibration_of(args, cat, model or args.model)
            return cat.search_config(cal, seed=args.seed, **given)
        fields = {k: (SEARCH_DEFAULTS[k] if given[k] is None else given[k]) for k in SEARCH_DEFAULTS}
        fields.update({k: given[k] for k in ADAPTIVE_FLAGS if given[k] is not None})
        return SearchConfig(method=args.method, seed=args.seed, **fields)
    except ValueError as e:
        raise UsageError(str(e)) from e


def command(sub, name: str, *, help: str, func, config: bool = False, **kwargs) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func(args)``; ``config``: it takes --config and --set."""
    p = sub.add_parser(name, help=help, **kwargs)
    if config:
        add_config_args(p)
    p.set_defaults(func=func)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG} when present)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")


def add_search_args(p: argparse.ArgumentParser, method: str = "greedy") -> None:
    cat = "unset: the config's cat section for --method cat"
    p.add_argument("--method", default=method, help=f"one of {', '.join(METHODS)} (default {method}; wsc: confidence-weighted vote)")
    p.add_argument("--k", type=int, help=f"branch budget / samples ({cat}, else 4)")
    p.add_argument("--tau", type=float, help=f"CaT pruning threshold in [0, 1] ({cat} or its calibration, else 0.5)")
    p.add_argument("--scoring", help=f"path score: {', '.join(SCORINGS)} ({cat}, else entropy)")
    p.add_argument("--temperature", type=float, help=f"sampling temperature for sc/bon/wsc/cat ({cat}, else 0.7)")
    p.add_argument("--max-steps", type=int, help=f"maximum steps per solution ({cat}, else 12)")
    p.add_argument("--branching", help=f"cat: {' | '.join(BRANCHINGS)} (always: Algorithm 2; {cat})")
    p.add_argument("--branch-threshold", type=float, help="adaptive cat: expand where the greedy step's uncertainty (nats) is above this; inf: never")
    p.add_argument("--uncertainty", help=f"adaptive cat: {' | '.join(UNCERTAINTIES)}")
    p.add_argument("--width", type=int, help="cat: live branches kept per step (Algorithm 2: k)")
    p.add_argument("--prune-scoring", help="the scoring tau prunes on (default: --scoring; the cat section: entropy)")
    p.add_argument("--window", type=int, help="tokens per window of the group scoring (default 16)")
    p.add_argument("--calibration", help="calibration.json for cat (default: cat.calibration, else the one next to the policy)")

def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --prompt-format and --task: what the commands that load a model themselves share."""
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-chat' or a path to a transformers model")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="plain: the task's prompt; chat: the model's chat template (default: chat when the model's tokenizer has one)")
    p.add_argument("--task", default="arith", help="arith, gsm8k or math")


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT (Ctrl-C) sets: what ``caspo up`` and ``caspo serve`` wait on."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def wait_until_set(stop: threading.Event) -> None:
    """Block until ``stop`` is set, polling, so that the signal handlers run meanwhile."""
    while not stop.wait(0.5):
        pass
