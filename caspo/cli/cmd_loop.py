"""``caspo demo``, ``caspo generate-pairs``, ``caspo loop``, ``caspo report`` and ``caspo sweep``: CASPO rounds
through the mesh, what they did, and the recipe study."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import ray

from caspo.cli.shared import command, print_table, config_of
from caspo.errors import UsageError
from caspo.mesh.client import MeshClient
from caspo.mesh.publisher import publish_policy
from caspo.mesh.runner import ON_HEAD, ensure_mesh
from caspo.models.hf import local_model_path
from caspo.models.prompting import load_prompter
from caspo.progress import quiet_terminal, say
from caspo.report import write_report
from caspo.tasks import get_task
from caspo.trainer import sweep
from caspo.trainer.collect import collect_round
from caspo.trainer.loop import RoundController, drift_line


ROUND_COLUMNS = ["round", "accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "cat_accuracy", "cat_recommended_accuracy", "pairs"]


def _round_rows(rows: list[dict]) -> list[dict]:
    return [{**r, "pairs": " ".join(f"{c}={n}" for c, n in sorted(r.get("pairs", {}).items())) or "-"} for r in rows]


# `caspo demo --quick` (`make demo QUICK=1`): a quicker look with fewer training questions and held-out
# problems, in a run directory of its own so that it never resumes into the full demo's run or the reverse
QUICK = {"run": "demo-quick", "loop.questions": 500, "loop.eval_n": 200}


def demo_settings(args) -> list[str]:
    """The config overrides ``caspo demo`` runs with: its run and rounds, the quick look's sizes with
    --quick, then the user's --set, which win."""
    quick = [f"{k}={v}" for k, v in QUICK.items() if k != "run"] if args.quick else []
    run = args.run or (QUICK["run"] if args.quick else "demo")
    return [f"loop.run={run}", f"loop.rounds={args.rounds}", *quick, *args.set]


def cmd_demo(args) -> int:
    """The main job on the built-in model, in one screen: CASPO rounds through the mesh with the config's
    recipe, each round's policy judged on the held-out set greedily and with CaT (Algorithm 2 and the
    recommended search); library logs go to a file."""
    args.set = demo_settings(args)
    cfg = config_of(args)
    run_dir = Path(cfg.loop.runs_dir) / cfg.loop.run
    log = quiet_terminal(run_dir / "logs" / "demo.log")
    t0 = time.time()
    if args.quick:
        say(f"quick look: {cfg.loop.questions} training questions, {cfg.loop.eval_n} held-out problems, wider intervals "
            f"(run {run_dir}); `make demo` for the full table")
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


def cmd_generate_pairs(args) -> int:
    cfg = config_of(args)
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


def cmd_publish(args) -> int:
    """Make a checkpoint policy VERSION on the running mesh and Serve: over the transport (publish.transport)."""
    cfg = config_of(args)
    if args.version < 0:
        raise UsageError(f"--version must be >= 0, got {args.version}")
    if args.path != "tiny" and not (Path(args.path) / "config.json").is_file():
        raise UsageError(f"path {args.path!r} is not a model directory (config.json is missing)")
    policy_file = args.policy_file or cfg.serve.policy_file
    with ensure_mesh(cfg, join_ray=True, progress=False) as st:
        client = MeshClient(st["registry"])

        async def go():
            try:
                return await publish_policy(client, cfg, args.version, args.path, policy_file)
            finally:
                await client.close()

        out = asyncio.run(go())
    if args.json:
        print(json.dumps(out, default=str))
    else:
        b = out["broadcast"]
        how = f"over the transport: {b['bytes'] / 1e6:.1f} MB in {b['seconds']:.2f} s" if b else "through the file"
        print(f"published v{args.version} ({args.path}) {how}; services: {out['versions']}" + (f"; from the file: {', '.join(out['fallback'])}" if out["fallback"] else ""))
    return 0


def cmd_loop(args) -> int:

    overrides = list(args.set)
    if args.run:
        overrides.append(f"loop.run={args.run}")
    if args.pairs:
        overrides.append(f"loop.pairs={args.pairs}")
    if args.rounds is not None:
        overrides.append(f"loop.rounds={args.rounds}")
    args.set = overrides
    cfg = config_of(args)
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


def cmd_sweep(args) -> int:
    if not args.settings:
        raise UsageError("give at least one setting (a JSON object), e.g. '{\"name\": \"paper DPO\"}'")
    settings = [sweep.parse_setting(raw, i, args.questions) for i, raw in enumerate(args.settings)]
    out = Path(args.out)
    args.set = [*args.set, f"mesh.run_dir={out}/mesh", "mesh.namespace=caspo-sweep"]
    cfg = config_of(args)
    task = get_task(cfg.task.name, cfg.task.data, cfg.task)
    n = args.n or cfg.loop.eval_n
    command = "caspo sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    log = quiet_terminal(out / "logs" / "sweep.log")
    print(f"sweep: {len(settings)} settings, eval on {n} held-out problems; logs in {log}", flush=True)
    sweep.run(cfg, task, settings, out, n, progress=True, command=command)
    print(f"wrote {out}/sweep.json, sweep.md, sweep.png", flush=True)
    return 0


def add_parser(sub) -> None:
    """The demo, generate-pairs, loop, report, sweep subcommands."""
    p = command(sub, "demo", help="the main job on the built-in model: inference methods side by side, then CASPO rounds", func=cmd_demo, config=True)
    p.add_argument("--run", help="run name: runs/NAME (default demo; demo-quick with --quick)")
    p.add_argument("--rounds", type=int, default=1, help="CASPO rounds (default 1: about 9 minutes on 2 cores)")
    p.add_argument("--quick", action="store_true", help=f"a quicker look: {QUICK['loop.questions']} training questions and "
                   f"{QUICK['loop.eval_n']} held-out problems instead of the config's (wider intervals), in runs/{QUICK['run']}")

    p = command(sub, "generate-pairs", help="one data round through the mesh: rollouts, confidence, critic, pairs", func=cmd_generate_pairs, config=True)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("-n", type=int, default=200, help="questions (default 200)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "loop", help="the continuous CASPO loop: pairs → DPO → publish → evaluate, round after round", func=cmd_loop, config=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rounds", type=int, help="rounds to run (default loop.rounds)")
    g.add_argument("--forever", action="store_true", help="keep going until stopped")
    p.add_argument("--run", help="run name: runs/NAME (default loop.run)")
    p.add_argument("--pairs", choices=["step", "trajectory", "crew"], help="step: CASPO; trajectory: the final-answer control; crew: CRew-DPO (answer confidence)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "publish", help="make a checkpoint the policy everywhere: generators, scorer, Serve (over the tensor transport unless publish.transport=disk)", func=cmd_publish, config=True)
    p.add_argument("path", help="a model directory (a checkpoint `caspo loop` or `caspo train` wrote) or tiny")
    p.add_argument("--version", type=int, required=True, help="the policy version it becomes")
    p.add_argument("--policy-file", help="the published-policy record to write (default serve.policy_file)")
    p.add_argument("--json", action="store_true")

    p = command(sub, "report", help="draw a loop run: reliability diagrams, per-round curves, summary.md", func=cmd_report)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding rounds.jsonl (runs/NAME)")
    p.add_argument("--out", help="output directory (default RUN_DIR/report)")
    p.add_argument("--compare", action="extend", nargs="+", default=[], metavar="RUN_DIR", help="other runs to overlay (the trajectory control, say)")

    p = command(sub, "sweep", help="the CASPO recipe study: one round per setting from the same base and data, judged on held-out problems", func=cmd_sweep, config=True)
    p.add_argument("settings", nargs="*", metavar="SETTING", help="JSON objects: name, pairs (step|trajectory|crew), questions, tau_quantile, cases, and dpo fields")
    p.add_argument("--questions", type=int, default=200, help="training questions of a setting that does not say (default 200)")
    p.add_argument("-n", type=int, default=None, help="held-out problems (default loop.eval_n)")
    p.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
