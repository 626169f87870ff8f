"""``caspo train-base``, ``caspo train-chat``, ``caspo check-data`` and ``caspo check-answers``: the built-in
models and the data they and the tasks read."""

from __future__ import annotations

import json
from pathlib import Path

from caspo.cli.shared import command, print_table
from caspo.errors import UsageError
from caspo.models.tiny import TinyTrainConfig, caspo_home, train_tiny
from caspo.models.tiny_chat import DEFAULT_DATA as CHAT_DATA
from caspo.models.tiny_chat import TinyChatTrainConfig, train_tiny_chat
from caspo.tasks.answers import DEFAULT_TIMEOUT_S, AnswerChecker, read_answer_pairs
from caspo.tasks.gsm8k import check_data


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
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps (default 1600: the shipped weights)")
    p.add_argument("--seed", type=int, default=0)

    p = command(sub, "train-chat", help="train the built-in tiny-chat model (chat template, blank-line steps, boxed answers) in about a minute", func=cmd_train_chat)
    p.add_argument("--out", help="output directory (default $CASPO_HOME/tiny-chat)")
    p.add_argument("--data", default=CHAT_DATA, help=f"GSM8K-format JSONL to train on (default {CHAT_DATA})")
    p.add_argument("--steps", type=int, default=TinyChatTrainConfig.steps)
    p.add_argument("--seed", type=int, default=0)

    p = command(sub, "check-data", help="verify the calculator annotations of a GSM8K-format file", func=cmd_check_data)
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--data", required=True)
    p.add_argument("--perturb", action="store_true", help="change one number per annotation first (a verifier check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = command(sub, "check-answers", help="are candidate final answers equivalent to gold ones? (math-verify, as task math judges)", func=cmd_check_answers)
    p.add_argument("--data", required=True, help='JSONL of {"gold", "candidate"} lines')
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds per comparison (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help='print {"results": [{"gold", "candidate", "equivalent"}], "count"}')
