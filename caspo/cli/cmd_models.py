"""``caspo train-base``, ``caspo train-chat``, ``caspo check-data`` and ``caspo check-answers``: the built-in
models and the data they and the tasks read."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from caspo.cli.shared import command, print_table
from caspo.errors import UsageError
from caspo.models.tiny import DEFAULT_RECIPE, TINY_RECIPES, TinyTrainConfig, caspo_home, train_tiny
from caspo.models.tiny import check_config as check_tiny_config
from caspo.models.tiny_chat import TinyChatTrainConfig, train_tiny_chat
from caspo.tasks.answers import DEFAULT_TIMEOUT_S, AnswerChecker, read_answer_pairs
from caspo.tasks.gsm8k import check_data


def _tiny_train_config(args) -> TinyTrainConfig:
    """The recipe (--recipe: v2, the shipped weights', or v1), then --set FIELD=VALUE
    and the explicit flags; every value checked, a bad one named (exit 2)."""
    base = asdict(TinyTrainConfig(**TINY_RECIPES[args.recipe]))
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or key not in base:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(base)}")
        kind = type(base[key])
        try:
            base[key] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            raise UsageError(f"--set {key}: expected a {kind.__name__}, got {text!r}") from None
    for key in ("seed", "steps", "eval_every", "eval_n", "eval_context", "threads"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    cfg = TinyTrainConfig(**base)
    try:
        check_tiny_config(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def cmd_train_base(args) -> int:
    out = args.out or str(caspo_home() / "tiny")
    cfg = _tiny_train_config(args)
    path = train_tiny(cfg, out, progress=True)
    meta = json.loads((Path(path) / "train_meta.json").read_text())
    if "selected" in meta:
        sel = meta["selected"]
        lo, hi = sel["accuracy_ci"]
        print(f"chose the step-{sel['step']} checkpoint: validation accuracy {sel['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (n={sel['n']}); "
              f"curve in {Path(path) / 'curve.jsonl'} and {Path(path) / 'curve.png'}")
    print(f"saved the tiny reasoner to {path} ({meta['train_seconds']:.0f} s of training)")
    return 0


def cmd_train_chat(args) -> int:
    """Train the built-in tiny-chat model (a BPE tokenizer and a small Qwen2 on GSM8K in chat form)."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not args.data:
        raise UsageError("train-chat needs --data PATH: the GSM8K train split, a JSONL file or a save_to_disk directory")
    if not Path(args.data).exists():
        raise UsageError(f"data file not found: {args.data} (--data: GSM8K-format JSONL or a save_to_disk directory)")
    out = args.out or str(caspo_home() / "tiny-chat")
    path = train_tiny_chat(TinyChatTrainConfig(seed=args.seed, steps=args.steps), out, data=args.data, progress=True)
    print(f"saved tiny-chat to {path}")
    return 0


def cmd_check_data(args) -> int:
    if args.task != "gsm8k":
        raise UsageError(f"check-data supports --task gsm8k, got {args.task!r}")
    if not args.data:
        raise UsageError("check-data needs --data PATH: a GSM8K-format JSONL file or a save_to_disk directory")
    res = check_data(args.data, perturb=args.perturb, seed=args.seed)
    if args.json:
        print(json.dumps(res))
    else:
        print_table([res], ["steps", "verified", "failed", "unannotated"])
        for ex in res["examples"]:
            print(f"  line {ex['line']}: {ex['step']!r}: {ex['reason']}")
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


def add_parser(sub) -> None:
    """The train-base, train-chat, check-data, check-answers subcommands."""
    p = command(sub, "train-base", help="train the built-in tiny reasoner from scratch", func=cmd_train_base)
    p.add_argument("--out", help="output directory (default $CASPO_HOME/tiny)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(TINY_RECIPES), help="v2 (default): the shipped weights' recipe: "
                   "boundaries, warmup-stable-decay, 6 layers, checkpoint chosen on the validation split; v1: the first weights' (docs/reasoner.md)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="greedy accuracy on the validation split every N steps, to curve.jsonl/curve.png; "
                   "the best checkpoint on it is the one saved (0: never; default: the recipe's)")
    p.add_argument("--eval-n", type=int, help="validation problems per evaluation (default: the recipe's)")
    p.add_argument("--eval-context", type=int, help="diagnostic: also the accuracy with N solved problems before each question (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any field of TinyTrainConfig (lr, schedule, hidden_size, ...)")

    p = command(sub, "train-chat", help="train the built-in tiny-chat model (chat template, blank-line steps, boxed answers) in about a minute", func=cmd_train_chat)
    p.add_argument("--out", help="output directory (default $CASPO_HOME/tiny-chat)")
    p.add_argument("--data", help="the GSM8K train split to train on: a JSONL file or a save_to_disk directory (required)")
    p.add_argument("--steps", type=int, default=TinyChatTrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)

    p = command(sub, "check-data", help="verify the calculator annotations of a GSM8K-format file", func=cmd_check_data)
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--data", help="a GSM8K-format JSONL file or a save_to_disk directory (required)")
    p.add_argument("--perturb", action="store_true", help="change one number per annotation first (a verifier check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = command(sub, "check-answers", help="are candidate final answers equivalent to gold ones? (math-verify, as task math judges)", func=cmd_check_answers)
    p.add_argument("--data", required=True, help='JSONL of {"gold", "candidate"} lines')
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds per comparison (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help='print {"results": [{"gold", "candidate", "equivalent"}], "count"}')
