"""``caspo sweep``: the training-recipe study — one CASPO round per setting from the same base policy
and the same round data, each judged on the same held-out problems against the base.

    caspo sweep --questions 200 -n 1000 \\
        '{"name": "paper DPO"}' \\
        '{"name": "DPOP", "loss_type": "dpop", "learning_rate": 3e-5}' \\
        '{"name": "control", "pairs": "trajectory"}'

A setting is a JSON object: ``name``; how its round data is made — ``pairs`` (``step``, CASPO's
three-case rule; ``trajectory``, the control; ``crew``, CRew-DPO), ``questions`` (training questions,
seeded as the loop's round 1), ``tau_quantile`` / ``tau`` (step pairs), ``cases`` (train only on
those pair cases); and any field of the config's ``dpo`` section (``DPOTrainConfig``: learning_rate,
beta, epochs, loss_type, dpop_lambda, sft_weight, …). Settings that share their round data share it:
the generator/scorer/critic mesh rolls each (mode, questions) out once, cached under ``--out``.

Each trained policy is evaluated greedily on the loop's held-out set (``-n``, default 1000), with 95%
intervals (Wilson for accuracy, bootstrap over problems otherwise) and the paired difference against
the base (paired bootstrap; exact McNemar on accuracy), plus what the round did to the policy
(``caspo.trainer.shift``). Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` under ``--out``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import ray

from caspo.config import DPOTrainConfig, PairsConfig
from caspo.core.contract import derive_seed
from caspo.core.pairs import Candidate, Pair
from caspo.core.search import SearchConfig
from caspo.errors import UsageError
from caspo.evaluation import METRICS, compare, evaluate, write_records
from caspo.mesh.client import MeshClient
from caspo.mesh.runner import MeshRunner
from caspo.models.factory import make_backend
from caspo.models.hf import resolve_model_path
from caspo.models.prompting import load_prompter
from caspo.plots import pyplot, save
from caspo.progress import say
from caspo.trainer.collect import StepRecord, collect_round, make_pairs, solution_pairs
from caspo.trainer.dpo import train_dpo
from caspo.trainer.loop import temperature_for
from caspo.trainer.shift import round_drift

DATA_KEYS = ("pairs", "questions", "tau_quantile", "tau")
OTHER_KEYS = ("name", "cases")
DPO_KEYS = tuple(f.name for f in dataclasses.fields(DPOTrainConfig))
MODES = ("step", "trajectory", "crew")


@dataclasses.dataclass
class Setting:
    name: str
    mode: str
    questions: int
    pair_overrides: dict
    dpo_overrides: dict
    cases: list | None


def parse_setting(raw: str, index: int, default_questions: int) -> Setting:
    """One command-line setting, checked: an unknown key or a bad value is a UsageError naming it."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"setting {index + 1} is not a JSON object: {e}") from e
    if not isinstance(obj, dict):
        raise UsageError(f"setting {index + 1} is not a JSON object: {raw!r}")
    unknown = sorted(set(obj) - set(DATA_KEYS) - set(OTHER_KEYS) - set(DPO_KEYS))
    if unknown:
        raise UsageError(f"setting {index + 1}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(DATA_KEYS + OTHER_KEYS + DPO_KEYS)}")
    mode = obj.get("pairs", "step")
    if mode not in MODES:
        raise UsageError(f"setting {index + 1}: pairs must be one of {', '.join(MODES)}, got {mode!r}")
    q = obj.get("questions", default_questions)
    if not isinstance(q, int) or not 1 <= q <= 100_000:
        raise UsageError(f"setting {index + 1}: questions must be an integer in 1..100000, got {q!r}")
    cases = obj.get("cases")
    if cases is not None and (not isinstance(cases, list) or not all(isinstance(c, str) for c in cases)):
        raise UsageError(f"setting {index + 1}: cases must be a list of pair cases, got {cases!r}")
    return Setting(
        name=str(obj.get("name") or raw),
        mode=mode,
        questions=q,
        pair_overrides={k: obj[k] for k in ("tau_quantile", "tau") if k in obj},
        dpo_overrides={k: obj[k] for k in DPO_KEYS if k in obj},
        cases=cases,
    )


def _records_to_json(records: list[StepRecord]) -> list[dict]:
    return [dataclasses.asdict(r) for r in records]


def _records_from_json(rows: list[dict]) -> list[StepRecord]:
    return [StepRecord(**{**r, "competitors": [Candidate(**c) for c in r["competitors"]]}) for r in rows]


class RoundData:
    """Round-1 data per (mode, questions), rolled out once by a mesh started on first need."""

    def __init__(self, cfg, task, out: Path, progress: bool):
        self.cfg, self.task, self.out, self.progress = cfg, task, out, progress
        self.prompter = load_prompter(cfg.model, task)  # model.prompt_format and model.step_delimiter
        self.runner: MeshRunner | None = None

    def _client(self) -> MeshClient:
        if self.runner is None:
            self.runner = MeshRunner(self.cfg)
            self.runner.start(progress=self.progress)
        return MeshClient(self.runner.registry_address)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    def pairs(self, s: Setting) -> tuple[list[Pair], dict]:
        pcfg = dataclasses.replace(self.cfg.pairs, temperature=temperature_for(self.cfg, 1), **s.pair_overrides)
        problems = self.task.problems(s.questions, seed=derive_seed("loop", pcfg.seed, 1) % (2**31), split="train")
        path = self.out / "data" / f"{s.mode}_q{s.questions}.json"
        if s.mode == "step":
            if path.exists():
                records = _records_from_json(json.loads(path.read_text()))
            else:
                records = asyncio.run(self._collect(problems, pcfg)).records
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(_records_to_json(records)))
            tau, made, skipped = make_pairs(records, pcfg)
            pairs = [p for _, p in made]
            info = {"tau": tau, "skipped": dict(skipped)}
        else:
            if path.exists():
                pairs = [Pair(**p) for p in json.loads(path.read_text())]
            else:
                pairs = asyncio.run(self._solutions(problems, pcfg, s.mode))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([dataclasses.asdict(p) for p in pairs]))
            info = {}
        if s.cases is not None:
            pairs = [p for p in pairs if p.case in s.cases]
        counts: dict[str, int] = {}
        for p in pairs:
            counts[p.case] = counts.get(p.case, 0) + 1
        return pairs, {**info, "pairs": counts}

    async def _collect(self, problems, pcfg: PairsConfig):
        client = self._client()
        try:
            return await collect_round(client, self.task, problems, pcfg, 0, progress=self.progress, store=False, desc="round data (step)", prompter=self.prompter)
        finally:
            await client.close()

    async def _solutions(self, problems, pcfg: PairsConfig, mode: str) -> list[Pair]:
        client = self._client()
        try:
            rows, _, _ = await solution_pairs(client, self.task, problems, pcfg, 1, mode, self.progress, prompter=self.prompter)
            return rows
        finally:
            await client.close()


def _judge(path: str, task, problems, cfg, progress: bool, desc: str):
    backend = make_backend(cfg, path)
    return evaluate(backend, task, problems, SearchConfig(method="greedy", seed=cfg.loop.eval_seed), batch=64, progress=progress, desc=desc)


def _setting_key(s: Setting, base: str) -> str:
    blob = json.dumps([base, s.mode, s.questions, s.pair_overrides, s.dpo_overrides, s.cases], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run(cfg, task, settings: list[Setting], out: Path, n: int, progress: bool = True, command: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    problems = task.problems(n, seed=cfg.loop.eval_seed, split="test")
    prompter = load_prompter(cfg.model, task)
    heldout = [(prompter(p.question), "".join(s + cfg.dpo.delimiter for s in p.gold_steps)) for p in problems[:200]]
    base_path = resolve_model_path(cfg.model.policy)
    base = _judge(base_path, task, problems, cfg, progress, "eval base")
    write_records(out / "eval" / "base.jsonl", base.records)
    rows = [{"setting": "base (round 0)", "pairs": {}, **base.summary()}]
    say(_line(rows[0]))

    data = RoundData(cfg, task, out, progress)
    try:
        made = [data.pairs(s) for s in settings]
    finally:
        data.close()
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.mesh.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    for s, (pairs, info) in zip(settings, made):
        row: dict = {"setting": s.name, **info, "pair_count": len(pairs)}
        if not pairs:
            row["error"] = "no pairs"
            rows.append(row)
            say(f"{s.name}: no pairs")
            continue
        dpo = dataclasses.replace(cfg.dpo, **{"seed": 1, **s.dpo_overrides})
        model_dir = out / "policies" / _setting_key(s, base_path)
        t0 = time.time()
        if not (model_dir / "model.safetensors").exists():
            metrics = train_dpo(pairs, base_path, base_path, str(model_dir), dpo, progress=progress)
            row["train_s"] = round(metrics["seconds"], 1)
        rep = _judge(str(model_dir), task, problems, cfg, progress, f"eval {s.name}")
        write_records(out / "eval" / f"{model_dir.name}.jsonl", rep.records)
        row.update(rep.summary())
        row["vs_base"] = compare(base, rep)
        row["drift"] = round_drift(base_path, str(model_dir), pairs, heldout, cfg.dpo.delimiter)
        row["seconds"] = round(time.time() - t0, 1)
        row["policy"] = str(model_dir)
        rows.append(row)
        say(_line(row))
    result = {"command": command, "eval_n": len(problems), "base": base_path, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(markdown(result))
    plot(result, out / "sweep.png")
    return result


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(row, m) -> str:
    lo, hi = row.get(f"{m}_ci") or (None, None)
    return f"{_fmt(row.get(m))} [{_fmt(lo)}, {_fmt(hi)}]"


def _line(row: dict) -> str:
    d = row.get("vs_base")
    delta = f"  Δacc {d['accuracy']:+.3f} [{d['accuracy_ci'][0]:+.3f}, {d['accuracy_ci'][1]:+.3f}] p={d['accuracy_mcnemar_p']:.3g}" if d else ""
    return f"{row['setting']}: accuracy {_ci(row, 'accuracy')}  ECE {_ci(row, 'ece')}  AUROC {_fmt(row.get('auroc'))}  gap {_fmt(row.get('entropy_gap'))}{delta}"


def markdown(result: dict) -> str:
    lines = [
        "# CASPO recipe sweep: one round per setting, same base and round data",
        "",
        f"`{result['command']}`",
        "",
        f"Greedy on {result['eval_n']} held-out problems; 95% intervals (Wilson for accuracy, bootstrap over problems otherwise); "
        "Δ against the base on the same problems (paired bootstrap, exact McNemar p on accuracy). "
        "Drift: mean log-prob change (nats) of the round's chosen and rejected steps, share of pairs whose chosen step fell, relative weight change, "
        "per-token KL(new ‖ base) on held-out gold solutions.",
        "",
        "| setting | pairs | accuracy | Δ accuracy (p) | ECE | Δ ECE | Brier | AUROC | entropy gap | chosen Δlogp | rejected Δlogp | chosen fell | weights | KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['setting']} | 0 | {r['error']} |" + " |" * 12)
            continue
        d, dr = r.get("vs_base"), r.get("drift") or {}
        pairs = ", ".join(f"{k} {v}" for k, v in sorted((r.get("pairs") or {}).items())) or "–"
        dacc = f"{d['accuracy']:+.3f} [{d['accuracy_ci'][0]:+.3f}, {d['accuracy_ci'][1]:+.3f}] ({d['accuracy_mcnemar_p']:.2g})" if d else "–"
        dece = f"{d['ece']:+.3f} [{d['ece_ci'][0]:+.3f}, {d['ece_ci'][1]:+.3f}]" if d and d.get("ece") is not None else "–"
        drift = [_fmt(dr.get("chosen_logp_change")), _fmt(dr.get("rejected_logp_change")), _fmt(dr.get("chosen_fell"), 2), _fmt(dr.get("weight_change"), 4), _fmt(dr.get("kl_heldout"), 4)] if dr else ["–"] * 5
        lines.append(f"| {r['setting']} | {pairs} | {_ci(r, 'accuracy')} | {dacc} | {_ci(r, 'ece')} | {dece} | {_ci(r, 'brier')} | {_ci(r, 'auroc')} | {_ci(r, 'entropy_gap')} | " + " | ".join(drift) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r for r in result["rows"] if not r.get("error")]
    names = [r["setting"] for r in rows]
    metrics = [("accuracy", "greedy accuracy"), ("ece", "ECE (lower is better)"), ("entropy_gap", "entropy gap (incorrect − correct)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.45 * len(rows) + 2.0), sharey=True)
    for ax, (m, title) in zip(axes, metrics):
        for i, r in enumerate(rows):
            v = r.get(m)
            lo, hi = r.get(f"{m}_ci") or (None, None)
            if v is None:
                continue
            err = [[v - lo], [hi - v]] if lo is not None else None
            ax.errorbar([v], [i], xerr=err, fmt="o", color="C0" if i else "C3", capsize=3)
        base = rows[0].get(m)
        if base is not None:
            ax.axvline(base, color="C3", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        if m in ("accuracy", "ece"):
            ax.set_xlim(0, 1)
        else:  # from zero, so that a change is read against the size of the gap, not the noise
            top = max([(r.get(f"{m}_ci") or [None, None])[1] or r.get(m) or 0 for r in rows] + [0])
            ax.set_xlim(min(0, *(r.get(m) or 0 for r in rows)), max(top * 1.3, 1e-3))
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"one CASPO round per setting, greedy on {result['eval_n']} held-out problems (95% intervals)", fontsize=10)
    fig.tight_layout()
    save(fig, path)


__all__ = ["run", "parse_setting", "markdown", "plot", "METRICS"]
