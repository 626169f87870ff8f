"""Where a running mesh is written down: ``RUN_DIR/mesh.json`` (registry address, Redis URL, Ray
address, the pid of the process that runs it), so ``caspo status``/``caspo down`` and clients in other
processes find it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from caspo.config import Config

STATE_FILE = "mesh.json"
SERVICES = ("generator", "scorer", "critic", "pair_store")


class MeshError(RuntimeError):
    pass


def state_path(cfg: Config) -> Path:
    return Path(cfg.mesh.run_dir) / STATE_FILE


def read_state(cfg: Config) -> dict | None:
    p = state_path(cfg)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def write_state(cfg: Config, state: dict) -> None:
    # the Redis URL may carry a password: the state file is readable by its owner only
    fd = os.open(state_path(cfg), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=2) + "\n")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def running_mesh(cfg: Config) -> dict | None:
    """The state of the mesh running from ``cfg.mesh.run_dir``, or None when none runs (no state
    file, or the process that wrote it is gone)."""
    st = read_state(cfg)
    if st and pid_alive(int(st.get("pid", -1))):
        return st
    return None
