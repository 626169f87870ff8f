"""TensorBoard event files of a loop run, under ``runs/NAME/tb``: ``tensorboard --logdir runs``.

* ``tb/dpo/roundK``: TRL's own training curves of round K's DPO (loss, rewards, margins; written by
  transformers' TensorBoardCallback on rank 0, ``dpo.report_to``);
* ``tb/loop``: one point per round (the step is the round) of every figure of its ``rounds.jsonl`` row:
  each held-out metric with the two ends of its 95% interval (``eval/accuracy``,
  ``eval/accuracy_ci_low``, ``eval/accuracy_ci_high``; the Custom Scalars tab draws them as a band),
  CaT's accuracies, the pairs per case, the drift and the promotion gate's decision.
"""

from __future__ import annotations

from pathlib import Path

from tensorboardX import SummaryWriter

INTERVAL_METRICS = ("accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "cat_accuracy", "cat_recommended_accuracy")


def tb_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tb"


def dpo_dir(run_dir: Path, round_: int) -> Path:
    return tb_dir(run_dir) / "dpo" / f"round{round_}"


def _layout() -> dict:
    charts = {m: ["Margin", [f"eval/{m}", f"eval/{m}_ci_low", f"eval/{m}_ci_high"]] for m in INTERVAL_METRICS}
    return {"caspo rounds (95% intervals)": charts}


def write_round(run_dir: Path, row: dict) -> Path:
    """Append round ``row["round"]``'s figures to ``tb/loop``; returns the directory."""
    out = tb_dir(run_dir) / "loop"
    k = int(row["round"])
    with SummaryWriter(logdir=str(out)) as w:
        if k == 0:
            w.add_custom_scalars(_layout())
        for m in INTERVAL_METRICS:
            v = row.get(m)
            if isinstance(v, (int, float)):
                w.add_scalar(f"eval/{m}", v, k)
                ci = row.get(f"{m}_ci") or (None, None)
                if ci[0] is not None and ci[1] is not None:
                    w.add_scalar(f"eval/{m}_ci_low", ci[0], k)
                    w.add_scalar(f"eval/{m}_ci_high", ci[1], k)
        for case, n in (row.get("pairs") or {}).items():
            w.add_scalar(f"pairs/{case}", n, k)
        for name, v in (row.get("drift") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                w.add_scalar(f"drift/{name}", v, k)
        gate = row.get("promotion")
        if gate:
            w.add_scalar("serve/promoted", 1.0 if gate["promote"] else 0.0, k)
            if gate.get("serving") is not None:
                w.add_scalar("serve/serving_version", gate["serving"], k)
            w.add_text("serve/decision", gate["reason"], k)
    return out
