"""Progress bars that render in a terminal and from inside Ray actors alike."""

from __future__ import annotations

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


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A progress bar: tqdm in a terminal, ray's tqdm_ray (drawn by the driver) inside an actor."""
    if not enabled:
        return _Off()
    if _in_ray_worker():
        return _Closing(tqdm_ray.tqdm(total=total, desc=desc, unit=unit))
    return tqdm(total=total, desc=desc, unit=unit, leave=False)
