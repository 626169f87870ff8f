"""What Serve serves from a loop run: the promotion gate after each round, and the operator's
``caspo promote RUN VERSION`` / ``caspo rollback RUN``.

The loop always hands a trained policy to the generators (the next round needs it); it reaches Serve
only through :func:`gate_round`: the round's greedy evaluation is paired with the serving policy's on the
same held-out problems (``caspo.evaluation.compare_records``) and judged by ``caspo.core.gate.decide``
under ``serve.promotion`` and ``serve.promotion_metrics``. Every decision, its figures and its reason go
into ``runs/NAME/promotions.jsonl`` and ``runs/NAME/policy.json`` (which the Serve replicas watch and
``/healthz`` shows); the loop also puts it in the round's row of ``rounds.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from caspo import telemetry
from caspo.config import ServeConfig
from caspo.core.gate import decide
from caspo.evaluation import compare_records, read_records
from caspo.policy_file import CheckpointError, checkpoint_problem, read_policy_info, record_decision, rollback_policy_file, write_policy_file

POLICY_FILE = "policy.json"
LOG = "promotions.jsonl"


class RunError(ValueError):
    """A run directory, version or checkpoint an operator command cannot use; one line, names it."""


def eval_records_path(run_dir: Path, version: int) -> Path:
    """Where the loop keeps round ``version``'s greedy evaluation (one record per held-out problem)."""
    return Path(run_dir) / "eval" / f"round{version}_greedy.jsonl"


def _state(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "state.json"
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory")
    if not path.is_file():
        raise RunError(f"{run_dir} is not a loop run (no state.json; `caspo loop` writes runs/NAME)")
    try:
        data = json.loads(path.read_text())
        data["policies"], data["done"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} does not parse: {e}") from None
    return data


def policy_path(run_dir: Path, version: int) -> str:
    """The checkpoint of a trained (or the base, v0) policy of the run; RunError when there is none or
    it is incomplete."""
    state = _state(run_dir)
    path = state["policies"].get(str(version))
    trained = version == 0 or "train" in state["done"].get(str(version), {})
    if path is None or not trained:
        known = sorted(int(v) for v, p in state["policies"].items() if p is not None)
        raise RunError(f"{run_dir} has no policy version {version} (versions: {', '.join(f'v{v}' for v in known)})")
    problem = checkpoint_problem(path)
    if problem:
        raise RunError(f"policy v{version} of {run_dir} is incomplete: {problem}")
    return path


def _log(run_dir: Path, entry: dict) -> None:
    with (Path(run_dir) / LOG).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def serving(run_dir: Path) -> dict | None:
    """What the run's policy.json says is served, with the latest decision and history."""
    return read_policy_info(Path(run_dir) / POLICY_FILE)


def ensure_serving(run_dir: Path, version: int, path: str) -> dict:
    """A run's first served policy (the base, v0), unless something is served already."""
    info = serving(run_dir)
    if info is None:
        info = write_policy_file(Path(run_dir) / POLICY_FILE, version, path, {"by": "loop", "reason": "the base policy, before any round", "at": time.time()})
    return info


def gate_round(run_dir: Path, run: str, round_: int, path: str, sv: ServeConfig, records=None, apply: bool = True) -> dict:
    """The promotion gate for round ``round_``'s policy at ``path``: compare its greedy evaluation with the
    serving policy's on the same problems, decide, serve it if the gate passes. Returns the decision
    (``promote``, ``reason``, ``figures``, ``serving``: the version served after it, ``candidate``)."""
    run_dir = Path(run_dir)
    current = serving(run_dir)
    served = int(current["version"]) if current else None
    comparison = None
    if served is not None:
        mine, theirs = eval_records_path(run_dir, round_), eval_records_path(run_dir, served)
        if mine.is_file() and theirs.is_file():
            try:
                comparison = compare_records(read_records(theirs), read_records(mine))
            except ValueError:  # not the same problems: nothing to pair
                comparison = None
    decision = decide(sv.promotion, list(sv.promotion_metrics), comparison)
    if served == round_:  # resumed after the decision was applied
        decision.update(promote=True, reason=(current.get("decision") or {}).get("reason", decision["reason"]))
    decision.update(by="gate", round=round_, candidate=round_, compared_with=served, at=time.time())
    return apply_gate(run_dir, run, decision, path) if apply else decision


def apply_gate(run_dir: Path, run: str, decision: dict, path: str) -> dict:
    """Record ``gate_round(apply=False)``'s decision, and serve the candidate when it passed (policy.json,
    which Serve's replicas watch; the loop first sends them the weights over the transport)."""
    round_, served = decision["round"], decision["compared_with"]
    if decision["promote"]:
        write_policy_file(run_dir / POLICY_FILE, round_, path, decision)
    else:
        record_decision(run_dir / POLICY_FILE, decision)
    decision["serving"] = round_ if decision["promote"] else served
    _log(run_dir, decision)
    telemetry.promotion(run, "promoted" if decision["promote"] else "kept", decision["serving"])
    return decision


def promote(run_dir: Path, version: int) -> dict:
    """Serve ``version`` of the run now (the operator's word over the gate's). RunError when the run,
    the version or its checkpoint is not there."""
    run_dir = Path(run_dir)
    path = policy_path(run_dir, version)
    before = serving(run_dir)
    decision = {"by": "promote", "reason": f"promoted by hand to v{version}", "from_version": before and before["version"], "at": time.time()}
    info = write_policy_file(run_dir / POLICY_FILE, version, path, decision)
    _log(run_dir, {**decision, "serving": version})
    telemetry.promotion(run_dir.name, "promote", version)
    return info


def rollback(run_dir: Path) -> dict:
    """Serve the version served before the current one. RunError when there is none or its checkpoint
    is gone."""
    run_dir = Path(run_dir)
    _state(run_dir)
    try:
        info = rollback_policy_file(run_dir / POLICY_FILE, {"by": "rollback", "reason": "rolled back by hand", "at": time.time()})
    except CheckpointError as e:
        raise RunError(str(e)) from None
    except ValueError as e:
        raise RunError(f"{run_dir}: nothing to roll back to (no version was served before v{(serving(run_dir) or {}).get('version', '?')})") from e
    _log(run_dir, {**info["decision"], "serving": info["version"]})
    telemetry.promotion(run_dir.name, "rollback", info["version"])
    return info


def status_line(info: dict | None) -> str:
    """One line for ``caspo status``: what is served and the latest decision."""
    if info is None:
        return "serving: nothing published yet"
    d = info.get("decision") or {}
    return f"serving v{info['version']} ({info['path']}); latest decision ({d.get('by', '-')}): {d.get('reason', '-')}"
