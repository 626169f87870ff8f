"""Reading Ray's real Prometheus endpoint (the node's metrics export port) in tests."""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """Every sample on ``http://127.0.0.1:port/metrics`` as (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def find(samples, name: str, **labels) -> list[float]:
    """The values of ``name`` whose labels include ``labels``."""
    want = {k: str(v) for k, v in labels.items()}
    return [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in want.items())]


def wait_for(port: int, wanted: dict, timeout: float = 60.0):
    """Scrape until each ``wanted`` entry (a key -> (name, labels, check(values))) holds; returns the last
    samples and the keys still missing (Ray exports at its report interval)."""
    deadline, missing, samples = time.time() + timeout, list(wanted), []
    while True:
        samples = scrape(port)
        missing = [k for k, (name, labels, ok) in wanted.items() if not ok(find(samples, name, **labels))]
        if not missing or time.time() > deadline:
            return samples, missing
        time.sleep(0.5)


@contextlib.contextmanager
def fast_metrics_export(interval_ms: int = 1000):
    """Around a ``ray.init`` that starts Ray: its processes export metrics every ``interval_ms`` instead
    of every 10 s (``RAY_metrics_report_interval_ms``, read when they start)."""
    name, old = "RAY_metrics_report_interval_ms", os.environ.get("RAY_metrics_report_interval_ms")
    os.environ[name] = str(interval_ms)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
