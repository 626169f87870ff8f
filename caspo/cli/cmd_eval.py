"""``caspo eval``, ``caspo diagnose`` and ``caspo calibrate``: a policy loaded in this process, judged
on a task (accuracy and calibration, sibling ranking per scoring, the warm-up that picks adaptive CaT's τ
and threshold)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caspo.cli.shared import command, fmt, cell, print_table, config_of, search_config, add_config_args, add_search_args, add_model_args
from caspo.core.calibration import DEFAULT_QUANTILES, DEFAULT_TAUS
from caspo.core.confidence import UNCERTAINTIES
from caspo.core.search import METHODS, SearchConfig
from caspo.diagnose import diagnose
from caspo.diagnose import plot as plot_diagnosis
from caspo.errors import UsageError
from caspo.evaluation import METRICS, calibrate, compare, evaluate
from caspo.models.base import Backend, PromptedProposer
from caspo.models.calibration_file import calibration_path_for, write_calibration
from caspo.models.factory import make_backend, named_model
from caspo.models.prompting import prompter_for_backend
from caspo.plots import pyplot
from caspo.plots import save as save_figure
from caspo.tasks import get_task


EVAL_COLUMNS = ["method", "scoring", "k", "accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "latency_s", "tokens", "n"]


DEFAULT_EVAL_N = 1000  # generated problems: one standard error of accuracy is ~0.015 at this size


def _eval_problems(args):
    if args.n is not None and args.n < 1:
        raise UsageError(f"-n must be >= 1, got {args.n}")
    task = get_task(args.task, args.data)
    n = args.n if args.n is not None or args.data else DEFAULT_EVAL_N
    return task, task.problems(n, seed=args.seed, split=args.split)


def _compare_sides(args) -> list[tuple[str, str, SearchConfig]]:
    """``--compare A B``: each side a method (run on --model) or a model (run with --method)."""
    cfg = config_of(args)
    sides = []
    for spec in args.compare:
        if spec in METHODS:
            sides.append((f"{args.model} {spec}", args.model, search_config(argparse.Namespace(**{**vars(args), "method": spec}), cfg)))
        else:
            sides.append((f"{spec} {args.method}", spec, search_config(args, cfg, model=spec)))
    return sides


def cmd_eval(args) -> int:
    task, problems = _eval_problems(args)
    if not args.compare:
        cfg = search_config(args, config_of(args))
        rep = evaluate(make_backend(named_model(args.model, args.prompt_format)), task, problems, cfg, batch=args.batch, progress=not args.json)
        out = {**rep.summary(), "model": args.model, "task": args.task}
        if getattr(task, "answer_errors", None):  # task math: answers math-verify could not compare (counted as wrong)
            out["answer_errors"] = dict(task.answer_errors)
        if args.json:
            print(json.dumps(out))
        else:
            print_table([out], EVAL_COLUMNS)
        return 0
    sides = _compare_sides(args)
    backends: dict[str, Backend] = {}
    reports = []
    for name, model, cfg in sides:
        if model not in backends:
            backends[model] = make_backend(named_model(model, args.prompt_format))
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
    backend = make_backend(named_model(args.model, args.prompt_format))
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
    print(f"{args.model} on {rep['n']} {args.task} problems: greedy accuracy {cell(g, 'accuracy')}")
    print(f"siblings: {rep['siblings']} sampled after {rep['sets']} gold prefixes (k={rep['k']}, T={rep['temperature']}), "
          f"{rep['distinct_siblings']} distinct; {rep['mixed_sets']} sets mix right and wrong steps "
          f"(a random pick is right {fmt(rep['chance'])} of the time)\n")
    rows = [
        {"scoring": sc, "sibling_ranking": rep["sibling_ranking"][sc], "sibling_ranking_ci": rep["sibling_ranking_ci"][sc],
         "ties": rep["ties"][sc], "all_tied": rep["all_tied"][sc], "step_auroc": rep["step_auroc"][sc], "step_auroc_ci": rep["step_auroc_ci"][sc]}
        for sc in rep["scorings"]
    ]
    print_table(rows, ["scoring", "sibling_ranking", "ties", "all_tied", "step_auroc"])
    h, d = rep["entropy"], rep["divergence"]
    print("\nwhere to branch (AUROC of -uncertainty for step correctness): " + ", ".join(f"{m} {fmt(v)}" for m, v in rep["uncertainty_auroc"].items()))
    print(f"mean step entropy: right {fmt(h['correct'])}, wrong {fmt(h['incorrect'])} nats (gap {fmt(h['gap'])})")
    print(f"wrong siblings leave the closest right one at {fmt(d['median_relative_position'])} of the step (median); "
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
    cfg = config_of(args)
    try:
        base = cfg.cat.search_config(None, seed=args.seed, branching="adaptive", uncertainty=args.uncertainty)
    except ValueError as e:
        raise UsageError(str(e)) from e
    task = get_task(args.task, args.data)
    problems = task.problems(args.n, seed=args.seed, split="train")
    out = Path(args.out) if args.out else calibration_path_for(args.model)
    backend = make_backend(named_model(args.model, args.prompt_format))
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


def add_parser(sub) -> None:
    """The eval, calibrate, diagnose subcommands."""
    p = command(sub, "eval", help="evaluate a policy with a search method", func=cmd_eval)
    add_model_args(p)
    p.add_argument("--data", help='problems: arith {"question", "answer"} JSONL, GSM8K JSONL or a save_to_disk directory, or for math {"problem", "answer"} JSONL, Parquet or a save_to_disk directory')
    add_search_args(p)
    p.add_argument("-n", type=int, default=None, help=f"number of problems (default: all of --data, else {DEFAULT_EVAL_N} generated)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two methods (greedy, sc, bon, cat) on --model, or two models with --method, "
                   "on the same problems: both reports, their paired differences with intervals, and a McNemar test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "any"], help="generated problems' split (val: arith's validation split)")
    p.add_argument("--batch", type=int, default=16, help="questions per batched model call (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_args(p)

    p = command(sub, "calibrate", help="pick adaptive CaT's tau and branching threshold on warm-up training problems; write calibration.json", func=cmd_calibrate)
    add_model_args(p)
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
    add_config_args(p)

    p = command(sub, "diagnose", help="which confidence signal works on a model, and why (sibling ranking per scoring)", func=cmd_diagnose)
    add_model_args(p)
    p.add_argument("--data", help="a JSONL file of problems (as for eval)")
    p.add_argument("-n", type=int, default=None, help="problems (default: all of --data, else 500 generated)")
    p.add_argument("--k", type=int, default=4, help="siblings sampled after each gold prefix (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="their sampling temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "test", "any"])
    p.add_argument("--out", default="runs/diagnose", help="folder for diagnose.json and diagnose.png")
    p.add_argument("--json", action="store_true", help="print one JSON object")
