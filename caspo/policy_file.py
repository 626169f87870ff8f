"""The published-policy file: ``{"version": K, "path": DIR, "published_at": T}``.

Publishing a policy (``MeshClient.publish``, run by ``caspo loop``) writes it; every CaT Serve replica
watches it and reloads the version it names. Written whole (a rename), so a reader never sees half.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_policy_file(path: str | os.PathLike, version: int, model_path: str) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"version": version, "path": model_path, "published_at": time.time()}) + "\n")
    tmp.replace(target)


def read_policy_file(path: str | os.PathLike) -> tuple[int, str] | None:
    """``(version, model path)`` the file names; None when there is no file or it does not parse."""
    try:
        info = json.loads(Path(path).read_text())
        return int(info["version"]), str(info["path"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
