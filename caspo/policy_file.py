"""The published-policy file: what Serve serves, ``{"version": K, "path": DIR, "published_at": T, ...}``.

The loop's promotion gate, ``caspo promote`` and ``caspo rollback`` write it; every CaT Serve replica
watches it and reloads the version it names. Written whole (a rename), so a reader never sees half, and
under a lock (a ``.lock`` file beside it), so the loop and an operator never lose each other's change.

Beside version and path it keeps ``decision`` (the promotion gate's latest decision, or the operator's
command, with its reason: shown by ``/healthz`` and ``caspo status``) and ``history`` (the versions served
before, newest last: what ``caspo rollback`` returns to).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

HISTORY = 50  # served versions remembered for rollback


class CheckpointError(ValueError):
    """A policy directory that cannot be served; the message says what is missing."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded (a missing directory, config or weights), or None."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} is not a directory"
    if not (p / "config.json").is_file():
        return f"{p} has no config.json"
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            return f"{index} does not parse: {e}"
        missing = sorted(s for s in shards if not (p / s).is_file())
        return f"{p} lacks weight shards {', '.join(missing)}" if missing else None
    if not any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        return f"{p} has no weights (model.safetensors)"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(target: Path, info: dict) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(target)


def read_policy_info(path: str | os.PathLike) -> dict | None:
    """The whole file; None when there is none or it does not parse."""
    try:
        info = json.loads(Path(path).read_text())
        int(info["version"]), str(info["path"])
        return info
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None


def read_policy_file(path: str | os.PathLike) -> tuple[int, str] | None:
    """``(version, model path)`` the file names; None when there is no file or it does not parse."""
    info = read_policy_info(path)
    return None if info is None else (int(info["version"]), str(info["path"]))


def write_policy_file(path: str | os.PathLike, version: int, model_path: str, decision: dict | None = None) -> dict:
    """Serve ``version`` (at ``model_path``): the version served until now goes onto the history.
    ``decision`` (why: the gate's decision or the operator's command) is kept with it."""
    target = Path(path)
    with _locked(target):
        info = read_policy_info(target) or {"history": []}
        history = list(info.get("history", []))
        if "version" in info and int(info["version"]) != version:
            history = (history + [{"version": int(info["version"]), "path": info["path"]}])[-HISTORY:]
        out = {"version": version, "path": model_path, "published_at": time.time(), "decision": decision, "history": history}
        _write(target, out)
        return out


def record_decision(path: str | os.PathLike, decision: dict) -> dict | None:
    """Keep serving what is served, with ``decision`` (a gate that kept it) as the latest word; None
    when nothing is served yet."""
    target = Path(path)
    with _locked(target):
        info = read_policy_info(target)
        if info is None:
            return None
        info["decision"] = decision
        _write(target, info)
        return info


def rollback_policy_file(path: str | os.PathLike, decision: dict) -> dict:
    """Serve the version served before the current one (the newest of the history), which leaves the
    history; ValueError when there is none."""
    target = Path(path)
    with _locked(target):
        info = read_policy_info(target)
        if info is None or not info.get("history"):
            raise ValueError(f"{target}: no earlier served version to roll back to")
        prev = info["history"][-1]
        problem = checkpoint_problem(prev["path"])
        if problem:
            raise CheckpointError(f"cannot roll back to v{prev['version']}: {problem}")
        out = {"version": int(prev["version"]), "path": prev["path"], "published_at": time.time(),
               "decision": {**decision, "reason": f"{decision.get('reason', 'rolled back')} from v{info['version']} to v{prev['version']}", "from_version": int(info["version"])}, "history": info["history"][:-1]}
        _write(target, out)
        return out
