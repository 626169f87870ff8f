"""Reading Ray's real Prometheus endpoint (the node's metrics export port) in tests."""

from __future__ import annotations

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
