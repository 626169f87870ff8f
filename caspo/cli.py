"""The ``caspo`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

import ray
from ray import serve

from caspo.bench.run import main as bench_main
from caspo.bench import sweep
from caspo.config import PROMPT_FORMATS, CalibrationError, ConfigError, load_config, model_defaults, read_calibration, write_calibration
from caspo.core.calibration import DEFAULT_QUANTILES, DEFAULT_TAUS
from caspo.core.cat import BRANCHINGS, METHODS, SearchConfig
from caspo.core.confidence import SCORINGS, UNCERTAINTIES
from caspo.diagnose import diagnose
from caspo.diagnose import plot as plot_diagnosis
from caspo.evaluation import METRICS, calibrate, calibration_path_for, compare, evaluate
from caspo.mesh.client import MeshClient
from caspo.mesh.plan import PlanError, plan_json
from caspo.mesh.plan import plan as plan_services
from caspo.mesh.runner import ON_HEAD, MeshRunner, ensure_mesh, stop_running_mesh
from caspo.mesh.state import MeshError, running_mesh
from caspo.models.base import ModelLoadError, PromptedProposer
from caspo.models.hf import HFBackend, local_model_path
from caspo.models.tiny import TinyTrainConfig, caspo_home, train_tiny
from caspo.models.tiny_chat import DEFAULT_DATA as CHAT_DATA
from caspo.models.tiny_chat import TinyChatTrainConfig, train_tiny_chat
from caspo.models.factory import make_backend
from caspo.models.prompting import detect_format, load_prompter, prompter_for_backend
from caspo.netutil import redact_url
from caspo.errors import UsageError
from caspo.progress import quiet_terminal, say
from caspo.plots import pyplot
from caspo.plots import save as save_figure
from caspo.report import write_report
from caspo.serve.cat_client import FIELDS as SOLVE_FIELDS
from caspo.serve.cat_client import SolveError, solve_grpc, solve_http
from caspo.serve.deployment import build_app, serve_options
from caspo.services.security import auth_token
from caspo.services.server import limit_proxy_messages
from caspo.tasks import get_task
from caspo.tasks.answers import DEFAULT_TIMEOUT_S, AnswerChecker, read_answer_pairs
from caspo.tasks.base import TaskError
from caspo.tasks.gsm8k import check_data
from caspo.trainer.collect import collect_round
from caspo.trainer.loop import RoundController, drift_line

EXIT_USAGE = 2


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _cell(row: dict, column: str) -> str:
    """A value, with its 95% interval when the row carries one (``<column>_ci``)."""
    text = _fmt(row.get(column))
    ci = row.get(f"{column}_ci")
    if text != "-" and isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    say("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    say("  ".join("-" * w for w in widths))
    for row in cells:
        say("  ".join(v.ljust(w) for v, w in zip(row, widths)))


EVAL_COLUMNS = ["method", "scoring", "k", "accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "latency_s", "tokens", "n"]


# ---- commands -------------------------------------------------------------------------------------
# what a search flag left unset means for methods other than cat (cat takes the config's cat section)
SEARCH_DEFAULTS = {"k": 4, "tau": 0.5, "max_steps": 12, "scoring": "entropy", "temperature": 0.7}
ADAPTIVE_FLAGS = ("branching", "branch_threshold", "uncertainty", "width", "prune_scoring", "window")


def _calibration(args, cat, model: str):
    """The calibration a cat search uses: --calibration, else cat.calibration, else the one next to the
    policy when there is one (None otherwise). A named file that is missing or malformed is an error."""
    try:
        if getattr(args, "calibration", None):
            return read_calibration(args.calibration)
        if cat.calibration:
            return read_calibration(cat.calibration)
        path = calibration_path_for(model)
        return read_calibration(path) if path.is_file() else None
    except CalibrationError as e:
        raise UsageError(str(e)) from e


def _search_config(args, cfg=None, model: str | None = None) -> SearchConfig:
    """Flags given win; ``--method cat`` fills the rest from the config's cat section (and a calibration
    file), other methods from SEARCH_DEFAULTS."""
    given = {f: getattr(args, f, None) for f in (*SEARCH_DEFAULTS, *ADAPTIVE_FLAGS)}
    try:
        if args.method == "cat":
            cat = (cfg or _config(args)).cat
            cal = _calibration(args, cat, model or args.model)
            return cat.search_config(cal, seed=args.seed, **given)
        fields = {k: (SEARCH_DEFAULTS[k] if given[k] is None else given[k]) for k in SEARCH_DEFAULTS}
        fields.update({k: given[k] for k in ADAPTIVE_FLAGS if given[k] is not None})
        return SearchConfig(method=args.method, seed=args.seed, **fields)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _backend(model: str, max_step_tokens: int | None = None, prompt_format: str | None = None):
    """The HF backend for ``model`` in its prompt format and step delimiter: as given, else what the model
    was made for (``detect_format``: chat and blank-line steps when its tokenizer has a chat template)."""
    if prompt_format is None:
        fmt, delim = detect_format(model)
    else:
        fmt, delim = model_defaults(model, prompt_format)
    return HFBackend(model, max_step_tokens=max_step_tokens or (32 if model == "tiny" else 256), prompt_format=fmt, delimiter=delim)


DEFAULT_EVAL_N = 1000  # generated problems: one standard error of accuracy is ~0.015 at this size


def _eval_problems(args):
    if args.n is not None and args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    task = get_task(args.task, args.data)
    n = args.n if args.n is not None or args.data else DEFAULT_EVAL_N
    return task, task.problems(n, seed=args.seed, split=args.split)


def _compare_sides(args) -> list[tuple[str, str, SearchConfig]]:
    """``--compare A B``: each side a method (run on --model) or a model (run with --method)."""
    cfg = _config(args)
    sides = []
    for spec in args.compare:
        if spec in METHODS:
            sides.append((f"{args.model} {spec}", args.model, _search_config(argparse.Namespace(**{**vars(args), "method": spec}), cfg)))
        else:
            sides.append((f"{spec} {args.method}", spec, _search_config(args, cfg, model=spec)))
    return sides


def cmd_eval(args) -> int:
    task, problems = _eval_problems(args)
    if not args.compare:
        cfg = _search_config(args, _config(args))
        rep = evaluate(_backend(args.model, prompt_format=args.prompt_format), task, problems, cfg, batch=args.batch, progress=not args.json)
        out = {**rep.summary(), "model": args.model, "task": args.task}
        if getattr(task, "answer_errors", None):  # task math: answers math-verify could not compare (counted as wrong)
            out["answer_errors"] = dict(task.answer_errors)
        if args.json:
            print(json.dumps(out))
        else:
            print_table([out], EVAL_COLUMNS)
        return 0
    sides = _compare_sides(args)
    backends: dict[str, HFBackend] = {}
    reports = []
    for name, model, cfg in sides:
        if model not in backends:
            backends[model] = _backend(model, prompt_format=args.prompt_format)
        reports.append(evaluate(backends[model], task, problems, cfg, batch=args.batch, progress=not args.json, desc=name))
    diff = compare(reports[0], reports[1])
    rows = [{"run": name, **rep.summary()} for (name, _, _), rep in zip(sides, reports)]
    if args.json:
        print(json.dumps({"task": args.task, "a": rows[0], "b": rows[1], "difference": diff}))
        return 0
    print_table(rows, ["run"] + EVAL_COLUMNS)
    print(f"\nB - A on the same {diff['n']} problems (95% paired bootstrap intervals):")
    print_table([{"metric": m, "difference": diff[m], "difference_ci": diff[f"{m}_ci"]} for m in METRICS], ["metric", "difference"])
    print(f"accuracy: only A right on {diff['only_a_correct']} problems, only B on {diff['only_b_correct']}; "
          f"exact McNemar p = {diff['accuracy_mcnemar_p']:.4g}")
    return 0


def cmd_demo(args) -> int:
    """The main job on the built-in model, in one screen: CASPO rounds through the mesh with the config's
    recipe, each round's policy judged on the held-out set greedily and with CaT (Algorithm 2 and the
    recommended search); library logs go to a file."""
    args.set = [f"loop.run={args.run}", f"loop.rounds={args.rounds}", *args.set]
    cfg = _config(args)
    run_dir = Path(cfg.loop.runs_dir) / cfg.loop.run
    log = quiet_terminal(run_dir / "logs" / "demo.log")
    t0 = time.time()
    say(f"caspo demo: policy {cfg.model.policy!r}; {cfg.loop.rounds} CASPO round(s) of {cfg.loop.questions} questions "
        f"({cfg.loop.pairs} pairs, {cfg.dpo.loss_type} lr {cfg.dpo.learning_rate:g}); each policy judged on {cfg.loop.eval_n} held-out problems")
    say(f"library logs: {log}\n")
    with ensure_mesh(cfg, join_ray=True, progress=False, on_start=lambda: say("starting the mesh ...")) as st:
        controller = RoundController(cfg.to_dict(), st["registry"], st["redis_url"])
        round_rows = asyncio.run(controller.run(cfg.loop.rounds, progress=True))
    say(f"\nCASPO rounds (round 0 is the base policy; the same {cfg.loop.eval_n} problems each round; [95% intervals]):")
    print_table(_round_rows(round_rows), ROUND_COLUMNS)
    drift = [r for r in round_rows if r.get("drift")]
    for r in drift:
        say(f"round {r['round']}" + drift_line(r["drift"]))
    out = run_dir / "demo.json"
    out.write_text(json.dumps({"rounds": round_rows, "seconds": round(time.time() - t0, 1)}, indent=2) + "\n")
    say(f"\nwrote {out} ({time.time() - t0:.0f} s); `caspo report {run_dir}` draws the rounds")
    return 0


def cmd_diagnose(args) -> int:
    """Which confidence signal works on this model: sibling ranking, ties, AUROC, entropy, divergence, errors."""
    if args.n is not None and args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    if args.k < 2:
        raise UsageError(f"--k must be >= 2 (siblings to rank), got {args.k}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 to sample siblings, got {args.temperature}")
    task = get_task(args.task, args.data)
    problems = task.problems(args.n if args.n is not None or args.data else 500, seed=args.seed, split=args.split)
    backend = _backend(args.model, prompt_format=args.prompt_format)
    rep = diagnose(PromptedProposer(backend, prompter_for_backend(backend, task)), task, problems, k=args.k, temperature=args.temperature, seed=args.seed, progress=not args.json)
    rep = {"model": args.model, "task": args.task, **rep}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(rep, indent=2) + "\n")
    save_figure(plot_diagnosis(pyplot(), rep), out / "diagnose.png")
    if args.json:
        print(json.dumps(rep))
        return 0
    g = rep["greedy"]
    print(f"{args.model} on {rep['n']} {args.task} problems: greedy accuracy {_cell(g, 'accuracy')}")
    print(f"siblings: {rep['siblings']} sampled after {rep['sets']} gold prefixes (k={rep['k']}, T={rep['temperature']}), "
          f"{rep['distinct_siblings']} distinct; {rep['mixed_sets']} sets mix right and wrong steps "
          f"(a random pick is right {_fmt(rep['chance'])} of the time)\n")
    rows = [
        {"scoring": sc, "sibling_ranking": rep["sibling_ranking"][sc], "sibling_ranking_ci": rep["sibling_ranking_ci"][sc],
         "ties": rep["ties"][sc], "all_tied": rep["all_tied"][sc], "step_auroc": rep["step_auroc"][sc], "step_auroc_ci": rep["step_auroc_ci"][sc]}
        for sc in rep["scorings"]
    ]
    print_table(rows, ["scoring", "sibling_ranking", "ties", "all_tied", "step_auroc"])
    h, d = rep["entropy"], rep["divergence"]
    print("\nwhere to branch (AUROC of -uncertainty for step correctness): " + ", ".join(f"{m} {_fmt(v)}" for m, v in rep["uncertainty_auroc"].items()))
    print(f"mean step entropy: right {_fmt(h['correct'])}, wrong {_fmt(h['incorrect'])} nats (gap {_fmt(h['gap'])})")
    print(f"wrong siblings leave the closest right one at {_fmt(d['median_relative_position'])} of the step (median); "
          f"{d['one_character']} of {d['wrong_siblings']} differ in one character")
    print("wrong siblings:", ", ".join(f"{k} {v}" for k, v in (rep.get("error_kinds") or rep["errors"]).items()) or "-")
    print("first error of wrong greedy solutions:", ", ".join(f"{k} {v}" for k, v in (g.get("first_error_kinds") or g["first_errors"]).items()) or "-")
    print(f"\nwrote {out / 'diagnose.json'} and {out / 'diagnose.png'}")
    return 0


def cmd_calibrate(args) -> int:
    """Pick adaptive CaT's τ and branching threshold on warm-up training problems; write calibration.json."""
    if args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    if not args.max_tokens_x > 0:
        raise UsageError(f"--max-tokens-x must be > 0, got {args.max_tokens_x}")
    for t in args.taus:
        if not 0.0 <= t <= 1.0:
            raise UsageError(f"--taus must each be in [0, 1], got {t}")
    for q in args.quantiles:
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"--quantiles must each be in [0, 1], got {q}")
    cfg = _config(args)
    try:
        base = cfg.cat.search_config(None, seed=args.seed, branching="adaptive", uncertainty=args.uncertainty)
    except ValueError as e:
        raise UsageError(str(e)) from e
    task = get_task(args.task, args.data)
    problems = task.problems(args.n, seed=args.seed, split="train")
    out = Path(args.out) if args.out else calibration_path_for(args.model)
    backend = _backend(args.model, prompt_format=args.prompt_format)
    res = calibrate(PromptedProposer(backend, prompter_for_backend(backend, task)), task, problems, base, taus=args.taus, quantiles=args.quantiles,
                    max_tokens_x=args.max_tokens_x, batch=args.batch, progress=not args.json)
    res = {**res, "model": args.model, "task": args.task}
    write_calibration(out, res)
    if args.json:
        print(json.dumps({**res, "path": str(out)}, default=str))
        return 0
    w = res["warmup"]
    print_table(res["grid"], ["branch_threshold", "tau", "accuracy", "tokens", "branch_points", "no_answer"])
    print(f"\nwarm-up: {w['n']} training problems; greedy {w['greedy_accuracy']:.3f} at {w['greedy_tokens']:.1f} tokens")
    print(f"chosen: branch_threshold {res['branch_threshold']} ({res['uncertainty']}), tau {res['tau']}: {w['accuracy']:.3f} at {w['tokens']:.1f} tokens")
    print(f"wrote {out}")
    return 0


def cmd_train_base(args) -> int:
    out = args.out or str(caspo_home() / "tiny")
    cfg = TinyTrainConfig(seed=args.seed, steps=args.steps)
    path = train_tiny(cfg, out, progress=True)
    print(f"saved the tiny reasoner to {path}")
    return 0


def cmd_train_chat(args) -> int:
    """Train the built-in tiny-chat model (a BPE tokenizer and a small Qwen2 on GSM8K in chat form)."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not Path(args.data).is_file():
        raise UsageError(f"data file not found: {args.data} (GSM8K-format JSONL; --data)")
    out = args.out or str(caspo_home() / "tiny-chat")
    path = train_tiny_chat(TinyChatTrainConfig(seed=args.seed, steps=args.steps), out, data=args.data, progress=True)
    print(f"saved tiny-chat to {path}")
    return 0


def cmd_check_answers(args) -> int:
    """Is each candidate final answer equivalent to its gold answer (math-verify, as task math judges)?"""
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    pairs = read_answer_pairs(args.data)
    checker = AnswerChecker(args.timeout)
    try:
        verdicts = checker.check_many(pairs)
    finally:
        checker.close()
    results = [
        {"gold": g, "candidate": c, "equivalent": v.equivalent, **({"error": v.error} if v.error else {})}
        for (g, c), v in zip(pairs, verdicts)
    ]
    if args.json:
        print(json.dumps({"results": results, "count": len(results), "equivalent": sum(r["equivalent"] for r in results)}))
        return 0
    print_table([{**r, "equivalent": "yes" if r["equivalent"] else "no", "note": r.get("error", "")} for r in results], ["gold", "candidate", "equivalent", "note"])
    print(f"\n{sum(r['equivalent'] for r in results)} of {len(results)} equivalent")
    return 0


def cmd_check_data(args) -> int:
    if args.task != "gsm8k":
        raise UsageError(f"check-data supports --task gsm8k, got {args.task!r}")
    res = check_data(args.data, perturb=args.perturb, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print_table([res], ["steps", "verified", "failed", "unannotated"])
        for ex in res["examples"]:
            print(f"  line {ex['line']}: {ex['step']!r}: {ex['reason']}")
    return 0


# ---- the mesh ---------------------------------------------------------------------------------------
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"


def _config(args):
    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


def cmd_up(args) -> int:

    cfg = _config(args)
    runner = MeshRunner(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"starting the mesh (run dir {cfg.mesh.run_dir}) ...", flush=True)
    try:
        st = runner.start(progress=True)
        print(f"  {'registry':10s} {st['registry']}\n  {'redis':10s} {redact_url(st['redis_url'])}", flush=True)
        print("mesh is up; `caspo status` to inspect, `caspo down` (or Ctrl-C) to stop", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping the mesh ...", flush=True)
        runner.stop()
        print("mesh stopped", flush=True)
    return 0


def cmd_down(args) -> int:
    cfg = _config(args)
    if stop_running_mesh(cfg):
        print("mesh stopped")
    else:
        print(f"no mesh is running from {cfg.mesh.run_dir}")
    return 0


def cmd_status(args) -> int:

    cfg = _config(args)
    try:
        client = MeshClient.from_state(cfg)
        services = asyncio.run(client.registry())
    except MeshError as e:
        raise UsageError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - grpc errors: the registry is gone
        raise UsageError(f"the mesh registry at {client.registry_address} does not answer ({type(e).__name__}); is `caspo up` still running?") from e
    if args.json:
        print(json.dumps({"registry": client.registry_address, "services": services}))
    else:
        print(f"registry {client.registry_address}")
        print_table(services, ["name", "address", "policy_version", "healthy", "restarts"])
    return 0 if all(s["healthy"] for s in services) else 1


def cmd_plan(args) -> int:
    """What every service will ask for; exit 2 (one line) when the config cannot be placed."""
    cfg = _config(args)
    cluster = None
    if args.cluster:
        try:
            cluster = [d for d in yaml.safe_load_all(Path(args.cluster).read_text()) if d]
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"--cluster {args.cluster}: {str(e).splitlines()[0]}") from None
    try:
        plans = plan_services(cfg, args.gpu_memory_gb, cluster)
    except PlanError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(plan_json(plans)))
        return 0
    rows = [
        {
            "service": p.service, "actors": p.count, "GPUs": p.num_gpus, "CPUs": p.num_cpus,
            "resources": " ".join(f"{k}={v:g}" for k, v in p.resources.items()) or ("head" if p.on_head else "-"),
            "group": p.group or "-", "model": p.model or "-", "backend": p.backend or "-",
            "context": p.context_length or "-", "entropy": p.entropy or "-",
            "GiB": f"{p.memory_gib:.1f}" if p.memory_gib is not None else "-",
        }
        for p in plans
    ]
    print_table(rows, ["service", "actors", "GPUs", "CPUs", "resources", "group", "model", "backend", "context", "entropy", "GiB"])
    notes: dict[str, list[str]] = {}
    for p in plans:
        for note in p.notes:
            notes.setdefault(note, []).append(p.service)
    for note, services in notes.items():
        print(f"  {', '.join(services)}: {note}")
    return 0


def cmd_generate_pairs(args) -> int:

    cfg = _config(args)
    if args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    if args.round < 0:
        raise UsageError(f"--round must be >= 0, got {args.round}")
    task = get_task(cfg.task.name, cfg.task.data, cfg.task)
    problems = task.problems(args.n, seed=cfg.pairs.seed + 1000 * args.round, split="train")
    prompter = load_prompter(cfg.model, task)

    def announce():
        if not args.json:
            print("no running mesh found: starting one for this command (`caspo up` keeps one running)", file=sys.stderr)

    with ensure_mesh(cfg, on_start=announce) as st:
        client = MeshClient(st["registry"])

        async def go():
            try:
                return await collect_round(client, task, problems, cfg.pairs, args.round, progress=not args.json, prompter=prompter)
            finally:
                await client.close()

        rep = asyncio.run(go())
    out = rep.summary()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"round {rep.round}: {rep.questions} questions, {rep.steps_judged} steps judged "
              f"(step accuracy {rep.step_accuracy:.3f}), tau_train {rep.tau:.4f}, policy v{rep.policy_version}, critic {rep.critic}")
        rows = [{"case": c, "pairs": n} for c, n in sorted(rep.pairs.items())]
        rows += [{"case": f"skip: {c}", "pairs": n} for c, n in sorted(rep.skipped.items())]
        print_table(rows, ["case", "pairs"])
        print(f"stored: {rep.added} new, {rep.duplicates} already there")
    return 0


ROUND_COLUMNS = ["round", "accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "cat_accuracy", "cat_recommended_accuracy", "pairs"]


def _round_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "pairs": " ".join(f"{c}={n}" for c, n in sorted(r.get("pairs", {}).items())) or "-"} for r in rows]


def cmd_loop(args) -> int:

    overrides = list(args.set)
    if args.run:
        overrides.append(f"loop.run={args.run}")
    if args.pairs:
        overrides.append(f"loop.pairs={args.pairs}")
    if args.rounds is not None:
        overrides.append(f"loop.rounds={args.rounds}")
    args.set = overrides
    cfg = _config(args)
    local_model_path(cfg.model.policy)  # a hub id is refused now, in one line, not after a data round
    rounds = None if args.forever else cfg.loop.rounds

    def announce():
        print(f"starting the mesh (run dir {cfg.mesh.run_dir}) ...", flush=True)

    with ensure_mesh(cfg, join_ray=True, progress=True, on_start=announce) as st:
        actor = ray.remote(num_cpus=0, resources=dict(ON_HEAD))(RoundController).options(name=f"caspo-loop-{cfg.loop.run}", namespace=cfg.mesh.namespace).remote(
            cfg.to_dict(), st["registry"], st["redis_url"]
        )
        what = "forever" if rounds is None else f"{rounds} rounds"
        print(f"loop {cfg.loop.run!r}: {what}, pairs={cfg.loop.pairs}, run dir {cfg.loop.runs_dir}/{cfg.loop.run}", flush=True)
        try:
            rows = ray.get(actor.run.remote(rounds, True))
        except KeyboardInterrupt:
            ray.kill(actor)
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130
    if args.json:
        print(json.dumps({"run": cfg.loop.run, "rounds": rows}))
    else:
        print()
        print_table(_round_rows(rows), ROUND_COLUMNS)
        print(f"\nrows in {cfg.loop.runs_dir}/{cfg.loop.run}/rounds.jsonl; `caspo report {cfg.loop.runs_dir}/{cfg.loop.run}` draws them")
    return 0


def cmd_report(args) -> int:
    try:
        res = write_report(args.run_dir, out_dir=args.out, compare=args.compare)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    for key in ("summary", "reliability", "curves"):
        print(f"wrote {res[key]}")
    return 0


def cmd_serve(args) -> int:
    """CaT on Ray Serve: HTTP and gRPC, until Ctrl-C."""


    cfg = _config(args)
    sv = cfg.serve
    st = running_mesh(cfg)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}"
    elif st:
        ray.init(address=st["ray_address"], logging_level="WARNING")  # beside the running mesh and loop
        where = "the running mesh's Ray"
    else:
        limit_proxy_messages()
        ray.init(num_cpus=cfg.mesh.num_cpus, include_dashboard=False, logging_level="WARNING")
        where = "a local Ray"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"starting CaT on Ray Serve in {where} ...", flush=True)
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=sv.app_name, route_prefix="/")
        print(f"  HTTP  http://{sv.host}:{sv.http_port}  (POST /v1/solve, /v1/solve/stream, /v1/chat/completions; GET /v1/models, /healthz)")
        print(f"  gRPC  {sv.host if sv.host != '0.0.0.0' else '127.0.0.1'}:{sv.grpc_port}  (caspo.v1.CaT/Solve, /SolveStream)")
        print(f"  policy: hot-reloads from {sv.policy_file}" if sv.policy_file else "  policy: fixed (no serve.policy_file)")
        print("  auth: bearer token required ($CASPO_AUTH_TOKEN)" if auth_token() else "  auth: off (set $CASPO_AUTH_TOKEN to require a bearer token)")
        print("serving; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping Serve ...", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _paint(c: float, tty: bool) -> str:
    text = f"{c:.3f}"
    if not tty:
        return text
    colour = "32" if c >= 0.8 else "33" if c >= 0.5 else "31"  # green, yellow, red
    return f"\033[{colour}m{text}\033[0m"


def cmd_solve(args) -> int:
    """Ask a running CaT service; print each step with its confidence, then the answer."""
    params = {k: getattr(args, k) for k in SOLVE_FIELDS}
    tty = sys.stdout.isatty()
    try:
        if args.http:
            result = solve_http(args.http, args.question, timeout=args.timeout, **params)
            steps = result["steps"]
        else:
            steps, result = [], None
            for ev in solve_grpc(args.grpc, args.question, timeout=args.timeout, **params):
                if "step" in ev:
                    steps.append(ev["step"])
                    if not args.json:
                        s = ev["step"]
                        print(f"  {_paint(s['confidence'], tty)}  {s['text']}", flush=True)
                else:
                    result = ev["result"]
    except SolveError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps(result))
        return 0
    if args.http:
        for s in steps:
            print(f"  {_paint(s['confidence'], tty)}  {s['text']}")
    answer = result.get("answer") if result.get("has_answer") else None
    print(f"answer: {answer if answer is not None else '(' + result.get('reason', 'no answer') + ')'}  "
          f"confidence {result.get('confidence', 0.0):.3f}  [{result.get('method')}/{result.get('scoring')} "
          f"k={result.get('k')} tau={result.get('tau', 0.0):.2f}, policy v{result.get('policy_version', 0)}, {result.get('seconds', 0.0):.2f} s]")
    return 0


# ---- parser ---------------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    if not args.settings:
        raise UsageError("give at least one setting (a JSON object), e.g. '{\"name\": \"paper DPO\"}'")
    settings = [sweep.parse_setting(raw, i, args.questions) for i, raw in enumerate(args.settings)]
    out = Path(args.out)
    args.set = [*args.set, f"mesh.run_dir={out}/mesh", "mesh.namespace=caspo-sweep"]
    cfg = _config(args)
    task = get_task(cfg.task.name, cfg.task.data, cfg.task)
    n = args.n or cfg.loop.eval_n
    command = "caspo sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    log = quiet_terminal(out / "logs" / "sweep.log")
    print(f"sweep: {len(settings)} settings, eval on {n} held-out problems; logs in {log}", flush=True)
    sweep.run(cfg, task, settings, out, n, progress=True, command=command)
    print(f"wrote {out}/sweep.json, sweep.md, sweep.png", flush=True)
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG} when present)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")


def _add_search_args(p: argparse.ArgumentParser, method: str = "greedy") -> None:
    cat = "unset: the config's cat section for --method cat"
    p.add_argument("--method", default=method, help=f"one of {', '.join(METHODS)} (default {method}; wsc: confidence-weighted vote)")
    p.add_argument("--k", type=int, help=f"branch budget / samples ({cat}, else 4)")
    p.add_argument("--tau", type=float, help=f"CaT pruning threshold in [0, 1] ({cat} or its calibration, else 0.5)")
    p.add_argument("--scoring", help=f"path score: {', '.join(SCORINGS)} ({cat}, else entropy)")
    p.add_argument("--temperature", type=float, help=f"sampling temperature for sc/bon/wsc/cat ({cat}, else 0.7)")
    p.add_argument("--max-steps", type=int, help=f"maximum steps per solution ({cat}, else 12)")
    p.add_argument("--branching", help=f"cat: {' | '.join(BRANCHINGS)} (always: Algorithm 2; {cat})")
    p.add_argument("--branch-threshold", type=float, help="adaptive cat: expand where the greedy step's uncertainty (nats) is above this; inf: never")
    p.add_argument("--uncertainty", help=f"adaptive cat: {' | '.join(UNCERTAINTIES)}")
    p.add_argument("--width", type=int, help="cat: live branches kept per step (Algorithm 2: k)")
    p.add_argument("--prune-scoring", help="the scoring tau prunes on (default: --scoring; the cat section: entropy)")
    p.add_argument("--window", type=int, help="tokens per window of the group scoring (default 16)")
    p.add_argument("--calibration", help="calibration.json for cat (default: cat.calibration, else the one next to the policy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caspo", description="CASPO training and CaT inference on a Ray service mesh")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a policy with a search method")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-chat' or a path to a transformers model")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="plain: the task's prompt; chat: the model's chat template (default: chat when the model's tokenizer has one)")
    p.add_argument("--task", default="arith", help="arith, gsm8k or math")
    p.add_argument("--data", help='problems: arith {"question", "answer"} JSONL, GSM8K JSONL, or for math {"problem", "answer"} JSONL, Parquet or a save_to_disk directory')
    _add_search_args(p)
    p.add_argument("-n", type=int, default=None, help=f"number of problems (default: all of --data, else {DEFAULT_EVAL_N} generated)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two methods (greedy, sc, bon, cat) on --model, or two models with --method, "
                   "on the same problems: both reports, their paired differences with intervals, and a McNemar test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "test", "any"])
    p.add_argument("--batch", type=int, default=16, help="questions per batched model call (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="pick adaptive CaT's tau and branching threshold on warm-up training problems; write calibration.json")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-chat' or a path to a transformers model")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="plain: the task's prompt; chat: the model's chat template (default: chat when the model's tokenizer has one)")
    p.add_argument("--task", default="arith", help="arith, gsm8k or math")
    p.add_argument("--data", help="a JSONL file of problems (as for eval)")
    p.add_argument("-n", type=int, default=200, help="warm-up problems from the training split (default 200)")
    p.add_argument("--out", help="where to write it (default: calibration.json next to the policy)")
    p.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS), help=f"tau grid (default {' '.join(map(str, DEFAULT_TAUS))})")
    p.add_argument("--quantiles", type=float, nargs="+", default=list(DEFAULT_QUANTILES),
                   help="threshold grid: these quantiles of the greedy steps' uncertainty, plus inf (default 0.5 0.75 0.9 0.95)")
    p.add_argument("--uncertainty", choices=list(UNCERTAINTIES), help="the step uncertainty (default: cat.uncertainty)")
    p.add_argument("--max-tokens-x", type=float, default=2.0, help="token budget per question, x greedy's (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", action="store_true")
    _add_config_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("diagnose", help="which confidence signal works on a model, and why (sibling ranking per scoring)")
    p.add_argument("--model", default="tiny", help="'tiny', 'tiny-chat' or a path to a transformers model")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="plain: the task's prompt; chat: the model's chat template (default: chat when the model's tokenizer has one)")
    p.add_argument("--task", default="arith", help="arith, gsm8k or math")
    p.add_argument("--data", help="a JSONL file of problems (as for eval)")
    p.add_argument("-n", type=int, default=None, help="problems (default: all of --data, else 500 generated)")
    p.add_argument("--k", type=int, default=4, help="siblings sampled after each gold prefix (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="their sampling temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "test", "any"])
    p.add_argument("--out", default="runs/diagnose", help="folder for diagnose.json and diagnose.png")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="the main job on the built-in model: inference methods side by side, then CASPO rounds")
    _add_config_args(p)
    p.add_argument("--run", default="demo", help="run name: runs/NAME (default demo)")
    p.add_argument("--rounds", type=int, default=1, help="CASPO rounds (default 1: about 15 minutes on 2 cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-base", help="train the built-in tiny reasoner from scratch")
    p.add_argument("--out", help="output directory (default $CASPO_HOME/tiny)")
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps (default 1600: the shipped weights)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_base)

    p = sub.add_parser("train-chat", help="train the built-in tiny-chat model (chat template, blank-line steps, boxed answers) in about a minute")
    p.add_argument("--out", help="output directory (default $CASPO_HOME/tiny-chat)")
    p.add_argument("--data", default=CHAT_DATA, help=f"GSM8K-format JSONL to train on (default {CHAT_DATA})")
    p.add_argument("--steps", type=int, default=TinyChatTrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_chat)

    p = sub.add_parser("check-data", help="verify the calculator annotations of a GSM8K-format file")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--data", required=True)
    p.add_argument("--perturb", action="store_true", help="change one number per annotation first (a verifier check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("check-answers", help="are candidate final answers equivalent to gold ones? (math-verify, as task math judges)")
    p.add_argument("--data", required=True, help='JSONL of {"gold", "candidate"} lines')
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds per comparison (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help='print {"results": [{"gold", "candidate", "equivalent"}], "count"}')
    p.set_defaults(func=cmd_check_answers)

    p = sub.add_parser("up", help="start Ray, Redis and every mesh service; stay up until stopped")
    _add_config_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("plan", help="what every service will ask Ray for (GPUs, CPUs, groups), its model, context and entropy; refuses what cannot be placed")
    _add_config_args(p)
    p.add_argument("--cluster", help="cluster manifests to place the services on (e.g. the output of kustomize build k8s/overlays/gpu)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("status", help="services, addresses, policy versions and health")
    _add_config_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("down", help="stop the running mesh")
    _add_config_args(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("generate-pairs", help="one data round through the mesh: rollouts, confidence, critic, pairs")
    _add_config_args(p)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("-n", type=int, default=200, help="questions (default 200)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate_pairs)
    p = sub.add_parser("loop", help="the continuous CASPO loop: pairs → DPO → publish → evaluate, round after round")
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rounds", type=int, help="rounds to run (default loop.rounds)")
    g.add_argument("--forever", action="store_true", help="keep going until stopped")
    p.add_argument("--run", help="run name: runs/NAME (default loop.run)")
    p.add_argument("--pairs", choices=["step", "trajectory", "crew"], help="step: CASPO; trajectory: the final-answer control; crew: CRew-DPO (answer confidence)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_loop)

    p = sub.add_parser("serve", help="CaT inference on Ray Serve: HTTP :8000 and gRPC :9000, hot-reloading published policies")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("solve", help="ask a running CaT service; prints each step with its confidence, then the answer")
    p.add_argument("question")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--grpc", default="127.0.0.1:9000", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:9000; steps stream as they are committed)")
    where.add_argument("--http", metavar="URL", help="HTTP base URL instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--method", choices=list(METHODS), help="default: the server's (cat)")
    p.add_argument("--k", type=int)
    p.add_argument("--tau", type=float)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--scoring", choices=[x for x in SCORINGS if x != "critic"])
    p.add_argument("--seed", type=int)
    p.add_argument("--branching", choices=list(BRANCHINGS), help="cat: adaptive | always (default: the server's cat section)")
    p.add_argument("--branch-threshold", type=float, help="adaptive cat: nats (default: the server's calibration)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("sweep", help="the CASPO recipe study: one round per setting from the same base and data, judged on held-out problems")
    _add_config_args(p)
    p.add_argument("settings", nargs="*", metavar="SETTING", help="JSON objects: name, pairs (step|trajectory|crew), questions, tau_quantile, cases, and dpo fields")
    p.add_argument("--questions", type=int, default=200, help="training questions of a setting that does not say (default 200)")
    p.add_argument("-n", type=int, default=None, help="held-out problems (default loop.eval_n)")
    p.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    p.set_defaults(func=cmd_sweep)

    sub.add_parser("bench", help="benchmarks: CaT vs greedy vs SC at equal budget, overheads, mesh and Serve throughput (caspo bench --help)", add_help=False)

    p = sub.add_parser("report", help="draw a loop run: reliability diagrams, per-round curves, summary.md")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding rounds.jsonl (runs/NAME)")
    p.add_argument("--out", help="output directory (default RUN_DIR/report)")
    p.add_argument("--compare", action="extend", nargs="+", default=[], metavar="RUN_DIR", help="other runs to overlay (the trajectory control, say)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (caspo/bench/run.py), so `caspo bench --help` lists its options
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (UsageError, TaskError, ModelLoadError, ConfigError, CalibrationError) as e:
        print(f"caspo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("caspo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
