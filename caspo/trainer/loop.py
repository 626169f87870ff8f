"""The continuous CASPO loop: a round controller over the mesh (paper §3.2, Algorithm 1, §4.5).

Round k (k = 1, 2, ...):
  pairs    fresh seeded questions → corrected-trajectory rollouts with policy k-1 at the scheduled
           temperature → exact confidence + critic → three-case rule → pair store (round k)
           (or, with ``loop.pairs: trajectory``, the most likely right against the most likely wrong of K
           independently sampled full solutions per question: the control)
  train    exactly round k's pairs, read from the pair store over gRPC (consumer group "trainer") →
           DPO on Ray Train, reference = policy k-1 → checkpoint runs/NAME/policies/vk
  publish  version k goes from the trainer's memory to the generator pool and the scorer over a tensor
           transport (caspo/mesh/publisher.py; ``publish.transport: disk``: they read the checkpoint);
           Serve gets it only through the promotion gate, after eval
  eval     the fixed held-out set through the generator service: greedy metrics, CaT@K with entropy and
           with logprob scoring; then the promotion gate (caspo/trainer/serving.py): version k reaches
           Serve (runs/NAME/policy.json) only when its evaluation, paired with the serving version's on
           the same problems, passes serve.promotion → one row appended to runs/NAME/rounds.jsonl

Every stage's duration, the pairs, DPO's loss and drift, and the gate's decisions are exported as
Prometheus metrics (caspo/telemetry.py) and written to TensorBoard under runs/NAME/tb (tracking.py).

Round 0 is the base policy evaluated the same way. Overlap: eval of round k and the pairs stage of
round k+1 both use policy k, so they run concurrently; the generator pool keeps serving while DPO
trains (Ray Train runs in its own workers).

Resume: every finished stage is recorded in runs/NAME/state.json and in Redis; running the same
command again continues after the last finished stage. Pairs are keyed by content and seeded, so a
repeated pairs stage stores nothing twice; a round's checkpoint is written atomically, so a round is
never trained twice; pairs are acknowledged in the store only after the checkpoint exists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import time
import zlib
from pathlib import Path

import ray
import redis

from caspo import telemetry
from caspo.config import Config, PairsConfig, config_from_dict
from caspo.core.contract import derive_seed
from caspo.core.search import SearchConfig
from caspo.core.metrics import reliability_bins
from caspo.core.pairs import Pair
from caspo.evaluation import METRICS as ROUND_METRICS
from caspo.evaluation import evaluate_async, write_records
from caspo.mesh.client import MeshClient, MeshProposer
from caspo.mesh.publisher import policy_source, publish_policy
from caspo.models.hf import local_model_path
from caspo.models.prompting import load_prompter
from caspo.netutil import redact_url
from caspo.progress import say
from caspo.tasks import get_task
from caspo.trainer.collect import collect_round, solution_pairs
from caspo.trainer.dpo import scratch_dir, train_dpo
from caspo.trainer.serving import apply_gate, ensure_serving, eval_records_path, gate_round
from caspo.trainer.shift import round_drift
from caspo.trainer.tracking import dpo_dir, write_round

log = logging.getLogger(__name__)

STAGES = ("pairs", "train", "publish", "eval")
TRAINER_GROUP = "trainer"
ROW_KEYS = ("round", "accuracy", "step_accuracy", "ece", "brier", "auroc", "entropy_gap", "cat_accuracy", "cat_recommended_accuracy", "pairs", "policy_version")


def store_round(run: str, k: int) -> int:
    """Pair-store round id of round k of a run: runs sharing one store (a CASPO run and its control,
    say) must never read each other's pairs, so each run's rounds live in their own block of ids."""
    return (zlib.crc32(run.encode()) % 1_000_000) * 1000 + k


def temperature_for(cfg: Config, round_: int) -> float:
    """The sampling temperature of round k (1-based): paper schedule 0.7 ×3, 1.0 ×2, 1.2 after."""
    temps = cfg.loop.temperatures
    return float(temps[min(round_, len(temps)) - 1])


class RunState:
    """Which stages of which rounds are done; in runs/NAME/state.json and mirrored into Redis."""

    def __init__(self, run_dir: Path, redis_url: str | None = None, run: str = ""):
        self.path = run_dir / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"done": {}, "policies": {"0": None}}
        self.redis = None
        self.key = f"caspo:run:{run}:state"
        if redis_url:
            self.redis = redis.Redis.from_url(redis_url)
            if not self.path.exists():  # the run dir was lost but Redis remembers
                raw = self.redis.get(self.key)
                if raw:
                    self.data = json.loads(raw)

    def done(self, round_: int, stage: str) -> bool:
        return stage in self.data["done"].get(str(round_), {})

    def info(self, round_: int, stage: str):
        return self.data["done"].get(str(round_), {}).get(stage)

    def mark(self, round_: int, stage: str, info=True) -> None:
        self.data["done"].setdefault(str(round_), {})[stage] = info
        self._save()

    def set_policy(self, version: int, path: str) -> None:
        self.data["policies"][str(version)] = path
        self._save()

    def policy(self, version: int) -> str | None:
        return self.data["policies"].get(str(version))

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)
        if self.redis is not None:
            try:
                self.redis.set(self.key, json.dumps(self.data))
            except Exception as e:  # noqa: BLE001 - the file is the source of truth
                log.warning("could not mirror run state into Redis: %s", e)


class RoundController:
    """Drives rounds over a running mesh. Run it in-process or as a Ray actor (``caspo loop``)."""

    def __init__(self, cfg_dict: dict, registry_address: str, redis_url: str | None = None):
        self.cfg = config_from_dict(cfg_dict)
        self.client = MeshClient(registry_address)
        self.run_dir = (Path(self.cfg.loop.runs_dir) / self.cfg.loop.run).resolve()  # services may run elsewhere
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shown = self.cfg.to_dict()
        shown["mesh"]["redis_url"] = redact_url(shown["mesh"]["redis_url"])  # no password on disk
        (self.run_dir / "config.json").write_text(json.dumps(shown, indent=2) + "\n")
        self.state = RunState(self.run_dir, redis_url, self.cfg.loop.run)
        if self.state.policy(0) is None:
            self.state.set_policy(0, local_model_path(self.cfg.model.policy))
        self.task = get_task(self.cfg.task.name, self.cfg.task.data, self.cfg.task)
        # model input in the policy's format (model.prompt_format, model.step_delimiter); only its tokenizer is read
        self.prompter = load_prompter(self.cfg.model, self.task)
        self.eval_problems = self.task.problems(self.cfg.loop.eval_n, seed=self.cfg.loop.eval_seed, split="test")
        self.rows_path = self.run_dir / "rounds.jsonl"
        # rank 0 of DPO hands its weights to this source; publishing broadcasts them from its memory
        self.source = policy_source(self.cfg) if self.cfg.publish.transport == "collective" and ray.is_initialized() else None

    def _sr(self, k: int) -> int:
        return store_round(self.cfg.loop.run, k)

    # ---- the loop -----------------------------------------------------------------------------
    async def run(self, rounds: int | None, progress: bool = True) -> list[dict]:
        """Run rounds 1..rounds (None: forever), resuming after the last finished stage."""
        await self._ensure_published(self._last_policy_version())
        k = 1
        while rounds is None or k <= rounds:
            jobs = []
            if not self.state.done(k - 1, "eval"):
                jobs.append(self._eval(k - 1, progress))
            if not self.state.done(k, "pairs"):
                jobs.append(self._pairs(k, progress))
            await asyncio.gather(*jobs)  # eval(k-1) overlaps pairs(k): both use policy k-1
            if not self.state.done(k, "train"):
                await self._train(k, progress)
            if not self.state.done(k, "publish"):
                await self._publish(k)
            k += 1
        if rounds is not None and not self.state.done(rounds, "eval"):
            await self._eval(rounds, progress)
        await self.client.close()
        return self.rows()

    def rows(self) -> list[dict]:
        if not self.rows_path.exists():
            return []
        rows = {}
        for line in self.rows_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["round"]] = row
        return [rows[k] for k in sorted(rows)]

    def _last_policy_version(self) -> int:
        return max(int(v) for v, p in self.state.data["policies"].items() if p is not None and (v == "0" or self.state.done(int(v), "train")))

    async def _ensure_published(self, version: int) -> None:
        """After a restart the services may hold an older policy: publish the newest trained one to the
        generators. Serve gets the base policy until a round passes the promotion gate."""
        ensure_serving(self.run_dir, 0, self.state.policy(0))
        services = {s["name"]: s for s in await self.client.registry()}
        if services.get("generator", {}).get("policy_version") != version:
            await publish_policy(self.client, self.cfg, version, self.state.policy(version), None, self.source, targets="mesh")

    def _timed(self, k: int, stage: str, t0: float) -> float:
        seconds = round(time.time() - t0, 1)
        telemetry.round_stage(self.cfg.loop.run, k, stage, seconds)
        return seconds

    # ---- stages -------------------------------------------------------------------------------
    async def _pairs(self, k: int, progress: bool) -> None:
        t0 = time.time()
        pcfg = dataclasses.replace(self.cfg.pairs, temperature=temperature_for(self.cfg, k))
        problems = self.task.problems(self.cfg.loop.questions, seed=derive_seed("loop", pcfg.seed, k) % (2**31), split="train")
        if self.cfg.loop.pairs in ("trajectory", "crew"):
            summary = await self._solution_pairs(k, problems, pcfg, progress, self.cfg.loop.pairs)
        else:
            rep = await collect_round(self.client, self.task, problems, pcfg, self._sr(k), progress=progress, desc=f"round {k} pairs", prompter=self.prompter)
            summary = rep.summary()
        summary["seconds"] = self._timed(k, "pairs", t0)
        telemetry.round_pairs(self.cfg.loop.run, k, summary.get("pairs", {}))
        summary["store_round"] = self._sr(k)
        summary["round"] = k
        (self.run_dir / f"round{k}_pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.state.mark(k, "pairs", summary)
        log.info("round %d pairs: %s", k, summary["pairs"])

    async def _solution_pairs(self, k: int, problems, pcfg: PairsConfig, progress: bool, mode: str) -> dict:
        rows, skipped, version = await solution_pairs(self.client, self.task, problems, pcfg, k, mode, progress, prompter=self.prompter)
        added = dup = 0
        for i in range(0, len(rows), 500):
            r = await self.client.put_pairs(self._sr(k), rows[i : i + 500])
            added, dup = added + r.added, dup + r.duplicates
        return {"round": k, "policy_version": version, "questions": len(problems), "pairs": {mode: len(rows)} if rows else {}, "skipped": dict(skipped), "added": added, "duplicates": dup}

    async def _read_round(self, k: int) -> tuple[list[Pair], list[str]]:
        """Exactly round k's pairs, through the pair store's consumer group."""
        # as many as one Read may return: the store re-delivers un-acked pairs first, so a round is read in one go
        batch = self.cfg.pair_store.max_read_count
        pairs, ids = [], []
        while True:
            got = await self.client.read_pairs(self._sr(k), TRAINER_GROUP, f"{self.cfg.loop.run}-trainer", batch)
            new = [(sid, p) for sid, p in got if sid not in set(ids)]
            if not new:
                return pairs, ids
            for sid, p in new:
                ids.append(sid)
                pairs.append(p)
            if len(got) < batch:
                return pairs, ids

    async def _ack(self, k: int, ids: list[str]) -> None:
        for i in range(0, len(ids), 1000):
            await self.client.ack_pairs(self._sr(k), TRAINER_GROUP, ids[i : i + 1000])

    async def _train(self, k: int, progress: bool) -> None:
        t0 = time.time()
        out = self.run_dir / "policies" / f"v{k}"
        pairs, ids = await self._read_round(k)
        prev = self.state.policy(k - 1)
        if (out / "model.safetensors").exists():
            metrics = {"resumed": True}  # trained before a crash; only the acknowledgement was missing
            shutil.rmtree(scratch_dir(out), ignore_errors=True)  # and maybe the clean-up of its checkpoints
        elif not pairs:
            log.warning("round %d produced no pairs: policy v%d is carried over unchanged", k, k - 1)
            out = Path(prev)
            metrics = {"pairs": 0, "carried_over": True}
        else:
            dpo = dataclasses.replace(self.cfg.dpo, seed=k)
            metrics = await asyncio.to_thread(train_dpo, pairs, prev, prev, str(out), dpo, progress, self.source, str(dpo_dir(self.run_dir, k)))
            metrics.pop("history", None)
            if self.cfg.loop.drift:
                heldout = [(self.prompter(p.question), "".join(s + self.cfg.dpo.delimiter for s in p.gold_steps)) for p in self.eval_problems[:200]]
                metrics["drift"] = await asyncio.to_thread(round_drift, prev, str(out), pairs, heldout, self.cfg.dpo.delimiter)
        await self._ack(k, ids)
        metrics["pairs_read"] = len(pairs)
        metrics["stage_seconds"] = self._timed(k, "train", t0)
        telemetry.round_training(self.cfg.loop.run, k, metrics)
        self.state.set_policy(k, str(out))
        self.state.mark(k, "train", metrics)
        (self.run_dir / f"round{k}_train.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")

    async def _publish(self, k: int) -> None:
        """Version k to the generators and the scorer (over the transport unless publish.transport is disk);
        Serve only through the gate, after eval."""
        t0 = time.time()
        out = await publish_policy(self.client, self.cfg, k, self.state.policy(k), None, self.source, targets="mesh")
        b = out["broadcast"] or {}
        self.state.mark(k, "publish", {"version": k, "path": self.state.policy(k), "transport": out["transport"], "fallback": out["fallback"], "bytes": b.get("bytes"), "seconds": self._timed(k, "publish", t0)})

    async def _eval(self, k: int, progress: bool) -> dict:
        t0 = time.time()
        lc = self.cfg.loop
        proposer = MeshProposer(self.client, self.prompter, self.prompter.delimiter)
        greedy = await evaluate_async(proposer, self.task, self.eval_problems, SearchConfig(method="greedy", seed=lc.eval_seed), batch=lc.eval_batch, progress=progress, desc=f"round {k} eval greedy")
        # CaT as the paper writes it (Algorithm 2, entropy confidence) and the project's recommended CaT
        alg2 = SearchConfig(method="cat", k=lc.cat_k, tau=lc.cat_tau, scoring="entropy", temperature=0.7, seed=lc.eval_seed)
        cats = {"entropy": alg2, "recommended": self.cfg.cat.search_config(seed=lc.eval_seed)}
        for name, cfg in cats.items():
            cats[name] = await evaluate_async(proposer, self.task, self.eval_problems, cfg, batch=lc.eval_batch, progress=progress, desc=f"round {k} eval cat/{name}")
        pairs_info = self.state.info(k, "pairs") or {}
        g = greedy.summary()
        row = {
            "round": k,
            "policy_version": k,
            "eval_n": g["n"],
            **{m: g[m] for m in ROUND_METRICS},
            **{f"{m}_ci": g[f"{m}_ci"] for m in ROUND_METRICS},
            "cat_accuracy": cats["entropy"].accuracy,
            "cat_accuracy_ci": cats["entropy"].summary()["accuracy_ci"],
            "cat_recommended_accuracy": cats["recommended"].accuracy,
            "cat_recommended_accuracy_ci": cats["recommended"].summary()["accuracy_ci"],
            "cat_k": lc.cat_k,
            "cat_tau": lc.cat_tau,
            "pairs": pairs_info.get("pairs", {}),
            "temperature": temperature_for(self.cfg, k) if k > 0 else None,
            "mode": lc.pairs,
            "reliability": _reliability(greedy),
            "drift": (self.state.info(k, "train") or {}).get("drift") if k > 0 else None,
            "finished_at": time.time(),
        }
        write_records(eval_records_path(self.run_dir, k), greedy.records)
        row["eval_seconds"] = self._timed(k, "eval", t0)
        if k > 0:  # the promotion gate: does version k reach Serve?
            gate = gate_round(self.run_dir, lc.run, k, self.state.policy(k), self.cfg.serve, apply=False)
            if gate["promote"] and gate["compared_with"] != k:  # Serve's replicas get the weights first, then the record
                await publish_policy(self.client, self.cfg, k, self.state.policy(k), None, self.source, targets="serve")
            gate = apply_gate(self.run_dir, lc.run, gate, self.state.policy(k))
            row["promotion"] = {key: gate[key] for key in ("promote", "policy", "reason", "figures", "n", "serving", "compared_with")}
        write_round(self.run_dir, row)
        with self.rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.state.mark(k, "eval", True)
        say(summary_line(row))
        if row.get("promotion"):  # in the records and `caspo status`; the printed output stays one line a round
            g = row["promotion"]
            outcome = "promoted to Serve" if g["promote"] else f"not promoted, Serve keeps v{g['serving']}"
            log.info("round %d: %s: %s", k, outcome, g["reason"])
        return row


def _reliability(report) -> list[dict]:
    return reliability_bins([r.confidence for r in report.records], [r.correct for r in report.records])


def summary_line(row: dict) -> str:
    pairs = ", ".join(f"{c} {n}" for c, n in sorted(row.get("pairs", {}).items())) or "-"
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731

    def ci(m):
        lo, hi = row.get(f"{m}_ci") or (None, None)
        return f"{f(row[m])} [{f(lo)}, {f(hi)}]" if lo is not None else f(row[m])

    return (
        f"round {row['round']}: accuracy {ci('accuracy')}  step {f(row['step_accuracy'])}  ECE {ci('ece')}  "
        f"Brier {f(row['brier'])}  AUROC {f(row['auroc'])}  gap {f(row['entropy_gap'])}  "
        f"CaT@{row['cat_k']} Alg. 2 {f(row['cat_accuracy'])} recommended {f(row.get('cat_recommended_accuracy'))}  pairs: {pairs}"
        + (drift_line(row["drift"]) if row.get("drift") else "")
    )


def drift_line(d: dict) -> str:
    return (
        f"  drift: chosen {d['chosen_logp_change']:+.3f} rejected {d['rejected_logp_change']:+.3f} nats "
        f"(chosen fell in {d['chosen_fell']:.0%}), weights {d['weight_change']:.2%}, KL {d['kl_heldout']:.4f}"
    )
