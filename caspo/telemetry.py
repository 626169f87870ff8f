"""Prometheus metrics of every caspo service, through Ray's metrics API (``ray.util.metrics``).

Each process records into Ray's per-node metrics agent, which serves them with Ray's and Serve's own on
the node's metrics export port (``ray start --metrics-export-port``, ``ray.init(_metrics_export_port=)``,
``mesh.metrics_export_port``). Ray prefixes every name with ``ray_``: ``caspo_grpc_requests_total``
is scraped as ``ray_caspo_grpc_requests_total``. Metrics reach the endpoint at Ray's report interval
(``RAY_metrics_report_interval_ms``, 10 s by default).

Gauges: Ray's agent forgets a gauge series that was not set again within two report intervals, so a
value set once (a round's stage duration, the queue depth after the last call) would vanish from the
endpoint. Each process therefore keeps the last value of each of its gauge series and sets it again
every half report interval from a daemon thread, for as long as the process lives.

Outside Ray (a unit test, a CLI process that joined no cluster) every function here does nothing, and a
failure to record is logged once and never reaches the caller: metrics must not break a service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Mapping

import ray
from ray.util import metrics as ray_metrics

log = logging.getLogger(__name__)

LATENCY_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
TOKENS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

# name -> (kind, description, tag keys, histogram boundaries)
SPECS: dict[str, tuple] = {
    "caspo_grpc_requests_total": ("counter", "gRPC requests per service and method", ("service", "method"), None),
    "caspo_grpc_errors_total": ("counter", "gRPC requests answered with a status other than OK", ("service", "method", "code"), None),
    "caspo_grpc_latency_seconds": ("histogram", "gRPC request latency in seconds", ("service", "method"), LATENCY_S),
    "caspo_worker_batch_size": ("histogram", "items in one batched model call of a micro-batching worker", ("worker", "kind"), BATCH),
    "caspo_worker_queue_depth": ("gauge", "calls waiting on a micro-batching worker's model calls", ("worker",), None),
    "caspo_policy_version": ("gauge", "the policy version a service holds", ("service",), None),
    "caspo_pairs_stored": ("gauge", "DPO pairs stored for a round, per case", ("run", "round", "case"), None),
    "caspo_round_stage_seconds": ("gauge", "seconds a stage of a loop round took", ("run", "round", "stage"), None),
    "caspo_loop_round": ("gauge", "the last round whose stage finished", ("run", "stage"), None),
    "caspo_dpo_loss": ("gauge", "a round's DPO training loss (TRL's train_loss)", ("run", "round"), None),
    "caspo_dpo_drift": ("gauge", "a round's drift measures (caspo.trainer.shift)", ("run", "round", "measure"), None),
    "caspo_serving_policy_version": ("gauge", "the policy version the promotion gate lets Serve serve", ("run",), None),
    "caspo_promotions_total": ("counter", "promotion decisions (promoted, kept, manual promote, rollback)", ("run", "decision"), None),
    "caspo_cat_tokens_per_answer": ("histogram", "tokens CaT generated for one answer", ("service",), TOKENS),
    "caspo_cat_branches_pruned_total": ("counter", "CaT branches pruned (cumulative confidence below tau)", ("service",), None),
}

_made: dict[str, object] = {}
_warned = False
_gauges: dict[tuple[str, tuple], float] = {}  # (name, sorted tags) -> the last value set in this process
_lock = threading.Lock()
_refresher: threading.Thread | None = None


def _refresh_every() -> float:
    return max(0.5, float(os.environ.get("RAY_metrics_report_interval_ms", "10000")) / 2000.0)


def _refresh_loop() -> None:
    while True:
        time.sleep(_refresh_every())
        if not ray.is_initialized():
            continue
        with _lock:
            last = list(_gauges.items())
        for (name, tags), value in last:
            try:
                _made[name].set(value, tags=dict(tags))
            except Exception:  # noqa: BLE001 - the next round tries again
                pass


def _keep(name: str, tags: dict, value: float) -> None:
    global _refresher
    with _lock:
        _gauges[(name, tuple(sorted(tags.items())))] = value
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_loop, name="caspo-gauges", daemon=True)
            _refresher.start()


_job: str | None = None  # the Ray job the metric objects belong to (a test process may init Ray again)


def _metric(name: str):
    global _job
    if not ray.is_initialized():
        return None
    try:
        job = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - a thread outside any task: the objects made so far serve
        job = _job
    if job != _job:
        with _lock:
            _made.clear()
            _gauges.clear()
            _job = job
    m = _made.get(name)
    if m is None:
        kind, desc, tags, bounds = SPECS[name]
        if kind == "counter":
            m = ray_metrics.Counter(name, desc, tag_keys=tags)
        elif kind == "gauge":
            m = ray_metrics.Gauge(name, desc, tag_keys=tags)
        else:
            m = ray_metrics.Histogram(name, desc, boundaries=bounds, tag_keys=tags)
        _made[name] = m
    return m


def record(name: str, value: float, tags: Mapping[str, object]) -> None:
    """Add (counter), set (gauge) or observe (histogram) ``value`` under ``tags``; never raises."""
    global _warned
    try:
        m = _metric(name)
        if m is None:
            return
        t = {k: str(v) for k, v in tags.items()}
        kind = SPECS[name][0]
        if kind == "counter":
            if value > 0:
                m.inc(value, tags=t)
        elif kind == "gauge":
            m.set(value, tags=t)
            _keep(name, t, value)
        else:
            m.observe(value, tags=t)
    except Exception as e:  # noqa: BLE001 - a metric must never fail a request
        if not _warned:
            _warned = True
            log.warning("could not record metric %s: %s", name, e)


# ---- what the services record ----------------------------------------------------------------------
def grpc_request(service: str, method: str, seconds: float, code: str = "OK") -> None:
    tags = {"service": service, "method": method}
    record("caspo_grpc_requests_total", 1, tags)
    record("caspo_grpc_latency_seconds", seconds, tags)
    if code != "OK":
        record("caspo_grpc_errors_total", 1, {**tags, "code": code})


def worker_batch(worker: str, kind: str, size: int) -> None:
    record("caspo_worker_batch_size", size, {"worker": worker, "kind": kind})


def worker_queue(worker: str, depth: int) -> None:
    record("caspo_worker_queue_depth", depth, {"worker": worker})


def policy_version(service: str, version: int) -> None:
    record("caspo_policy_version", version, {"service": service})


def cat_answer(service: str, tokens: int, pruned: int) -> None:
    record("caspo_cat_tokens_per_answer", tokens, {"service": service})
    record("caspo_cat_branches_pruned_total", pruned, {"service": service})


def round_stage(run: str, round_: int, stage: str, seconds: float) -> None:
    record("caspo_round_stage_seconds", seconds, {"run": run, "round": round_, "stage": stage})
    record("caspo_loop_round", round_, {"run": run, "stage": stage})


def round_pairs(run: str, round_: int, per_case: Mapping[str, int]) -> None:
    for case, n in per_case.items():
        record("caspo_pairs_stored", n, {"run": run, "round": round_, "case": case})


def round_training(run: str, round_: int, metrics: Mapping) -> None:
    loss = metrics.get("train_loss")
    if isinstance(loss, (int, float)):
        record("caspo_dpo_loss", loss, {"run": run, "round": round_})
    for measure, v in (metrics.get("drift") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            record("caspo_dpo_drift", v, {"run": run, "round": round_, "measure": measure})


def promotion(run: str, decision: str, serving: int) -> None:
    record("caspo_promotions_total", 1, {"run": run, "decision": decision})
    record("caspo_serving_policy_version", serving, {"run": run})
