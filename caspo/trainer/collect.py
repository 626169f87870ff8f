"""One data round through the mesh (docs/design.md §3, §5), entirely over gRPC.

For every question, walk the *corrected* trajectory: at sub-question q_j the generator samples K
candidate steps (the first is the policy's step s_j, the rest are its competitors), the scorer gives
each its exact confidence and log-probability in one teacher-forced pass, the critic judges each; the
trajectory continues with s_j when it is correct and with the critic's reference step when it is not.
Once every step of the round is known, τ_train is fixed (a quantile of the round's step confidences
unless set), the three-case rule makes the pairs, and the pair store acknowledges them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

from caspo.progress import bar as progress_bar
from caspo.config import PairsConfig
from caspo.core.contract import derive_seed
from caspo.core.pairs import (
    CASE_CREW,
    CASE_TRAJECTORY,
    Candidate,
    Pair,
    Skip,
    Solution,
    build_pair,
    resolve_tau,
    solution_pair,
)
from caspo.core.confidence import answer_confidence
from caspo.core.steps import final_answer, is_final
from caspo.models.base import prefix_text
from caspo.tasks.base import Problem, Task

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    problem_id: str
    prompt: str  # q_j: task prompt + corrected steps so far
    step: str  # s_j, the policy's step
    correct: bool
    confidence: float  # eq. 2: -mean entropy (exact, from the scorer)
    competitors: list[Candidate]
    reference: str
    over_context: bool = False  # the prompt or step did not fit the model's context length: never a pair


@dataclass
class RoundReport:
    round: int
    policy_version: int
    questions: int
    steps_judged: int
    step_accuracy: float
    tau: float
    pairs: dict[str, int]
    skipped: dict[str, int]
    added: int = 0
    duplicates: int = 0
    critic: str = ""
    records: list[StepRecord] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {
            "round": self.round,
            "policy_version": self.policy_version,
            "questions": self.questions,
            "steps_judged": self.steps_judged,
            "step_accuracy": self.step_accuracy,
            "tau": self.tau,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "added": self.added,
            "duplicates": self.duplicates,
            "critic": self.critic,
        }


_NO_STEP = SimpleNamespace(correct=False, reference="", reason="empty step", p_correct=0.0)


def solution_of(task: Task, problem: Problem, steps, mode: str, delimiter: str = "\n") -> Solution | None:
    """A rolled-out solution (generator ``Step`` messages) as a :class:`Solution` scored for ``mode``:
    ``trajectory``, mean token log-prob of the whole solution; ``crew``, confidence in its final answer.
    Its text is the steps joined with ``delimiter`` (model.step_delimiter). None for a solution with no text."""
    steps = [st for st in steps if st.text.strip()]
    if not steps:
        return None
    last = steps[-1]
    if mode == "crew":
        score = answer_confidence(last.text, last.token_logprobs)
    elif mode == "trajectory":
        lps = [lp for st in steps for lp in st.token_logprobs]
        score = sum(lps) / max(1, len(lps))
    else:
        raise ValueError(f"mode must be trajectory or crew, got {mode!r}")
    correct = task.answer_correct(problem, final_answer(last.text))
    return Solution(text=delimiter.join(st.text for st in steps), correct=bool(correct), score=float(score))


async def solution_pairs(client, task: Task, problems: Sequence[Problem], cfg: PairsConfig, round_: int, mode: str, progress: bool = True, prompter=None):
    """Pairs of whole solutions from ``cfg.candidates`` samples per question (the sample budget of K
    candidates per step), by ``caspo.core.pairs.solution_pair``: ``trajectory`` (the control) scores a
    solution by its mean token log-prob, ``crew`` (CRew-DPO) by its confidence in its final answer.
    ``prompter`` builds model input and gives the step delimiter (default: the task's plain prompt, a
    step a line). Returns (pairs, skip counts, policy version)."""
    prompt = prompter or task.prompt
    delimiter = getattr(prompter, "delimiter", "\n")
    kk = cfg.candidates
    rows, skipped, version = [], Counter(), 0
    bar = progress_bar(len(problems), f"round {round_} {mode} pairs", "q", progress)
    for s in range(0, len(problems), cfg.batch):
        chunk = problems[s : s + cfg.batch]
        prompts = [prompt(p.question) for p in chunk for _ in range(kk)]
        seeds = [derive_seed(cfg.seed, round_, p.id, j) for p in chunk for j in range(kk)]
        resp = await client.rollout(prompts, cfg.temperature, cfg.max_steps, seeds)
        version = resp.policy_version
        for i, p in enumerate(chunk):
            sols = [solution_of(task, p, tr.steps, mode, delimiter) for tr in resp.trajectories[i * kk : (i + 1) * kk]]
            out = solution_pair([x for x in sols if x is not None])
            if isinstance(out, Skip):
                skipped[out.reason] += 1
                continue
            chosen, rejected = out
            rows.append(
                Pair(
                    prompt=prompt(p.question),
                    chosen=chosen.text,
                    rejected=rejected.text,
                    case=CASE_CREW if mode == "crew" else CASE_TRAJECTORY,
                    confidence=rejected.score,
                    tau=0.0,
                    policy_version=version,
                    question_id=p.id,
                    critic=f"answer:{task.name}",
                )
            )
        bar.update(len(chunk))
    bar.close()
    return rows, skipped, version


async def _score(client, prompts, steps) -> list:
    return list((await client.score(prompts, steps)).scores) if steps else []


async def _walk(client, task: Task, problems: Sequence[Problem], cfg: PairsConfig, round_: int, on_done=None, prompt=None):
    """Corrected trajectories for a chunk of problems; returns step records, critic name, version.
    ``prompt``: what builds model input (a Prompter: model.prompt_format and model.step_delimiter);
    default the task's plain prompt with one step a line."""
    prompt = prompt or task.prompt
    prefixes: list[list[str]] = [[] for _ in problems]
    active = list(range(len(problems)))
    records: list[StepRecord] = []
    critic_name, version = "", 0
    for t in range(cfg.max_steps):
        if not active:
            break
        prompts = [prefix_text(prompt, problems[i].question, prefixes[i]) for i in active]
        seeds = [derive_seed(cfg.seed, round_, problems[i].id, t) for i in active]
        gen = await client.propose(prompts, cfg.candidates, cfg.temperature, seeds)
        version = gen.policy_version
        cands = [[s.text for s in c.steps] for c in gen.candidates]
        flat_prompts = [p for p, cs in zip(prompts, cands) for _ in cs]
        flat_steps = [s for cs in cands for s in cs]
        # an empty step is not a step: the scorer refuses it, the records below mark it wrong and unsure
        keep = [j for j, s in enumerate(flat_steps) if s.strip()]
        scored, verdicts = await asyncio.gather(
            _score(client, [flat_prompts[j] for j in keep], [flat_steps[j] for j in keep]),
            client.judge(
                [(problems[i].id, problems[i].question, prefixes[i], s) for i, cs in zip(active, cands) for s in cs if s.strip()],
                scope=f"round:{round_}",
            ),
        )
        critic_name = verdicts.critic
        # the critic refuses empty steps as the scorer does: they are wrong, with no reference
        judged = iter(verdicts.verdicts)
        flat_verdicts = [next(judged) if s.strip() else _NO_STEP for s in flat_steps]
        scores = [None] * len(flat_steps)
        for j, score in zip(keep, scored):
            scores[j] = score
        k = 0
        still = []
        for i, cs in zip(active, cands):
            sc = scores[k : k + len(cs)]
            vd = flat_verdicts[k : k + len(cs)]
            k += len(cs)
            own, own_v = cs[0], vd[0]
            competitors = [
                Candidate(text=cs[j], correct=vd[j].correct, logprob=float(sum(sc[j].token_logprobs)))
                for j in range(1, len(cs))
                if cs[j].strip()
            ]
            records.append(
                StepRecord(
                    problem_id=problems[i].id,
                    prompt=prompts[active.index(i)],
                    step=own,
                    correct=bool(own_v.correct) and bool(own.strip()),
                    confidence=float(sc[0].confidence) if sc[0] is not None else 0.0,
                    competitors=competitors,
                    reference=own_v.reference,
                    over_context=gen.candidates[active.index(i)].steps[0].over_context or bool(sc[0] is not None and sc[0].over_context),
                )
            )
            nxt = own if (own_v.correct and own.strip()) else own_v.reference
            prefixes[i].append(nxt)
            if is_final(nxt) or not nxt.strip():  # an answer, or nothing to go on with
                if on_done:
                    on_done(1)
            else:
                still.append(i)
        active = still
    if on_done and active:
        on_done(len(active))  # ran out of steps
    return records, critic_name, version


def make_pairs(records: Sequence[StepRecord], cfg: PairsConfig) -> tuple[float, list[tuple[StepRecord, Pair]], Counter]:
    """τ_train for the round, then the three-case rule on every step record."""
    if not records:
        return float("nan"), [], Counter()
    tau = resolve_tau([r.confidence for r in records], cfg.tau, cfg.tau_quantile)
    pairs, skipped = [], Counter()
    for r in records:
        if r.over_context:
            skipped["over_context"] += 1
            continue
        if not r.step.strip():
            skipped["empty_step"] += 1
            continue
        out = build_pair(r.prompt, r.step, r.correct, r.confidence, r.competitors, r.reference, tau)
        if isinstance(out, Skip):
            skipped[out.reason] += 1
        else:
            pairs.append((r, out))
    return tau, pairs, skipped


async def collect_round(
    client,
    task: Task,
    problems: Sequence[Problem],
    cfg: PairsConfig,
    round_: int,
    progress: bool = True,
    store: bool = True,
    desc: str | None = None,
    prompter=None,
) -> RoundReport:
    """One data round over ``problems``; ``prompter`` builds model input (default: the task's plain prompt)."""
    bar = progress_bar(len(problems), desc or f"round {round_} pairs", "q", progress)
    records: list[StepRecord] = []
    critic, version = "", 0
    sem = asyncio.Semaphore(2)  # two chunks in flight: generation of one overlaps scoring of the other

    async def run(chunk):
        async with sem:
            return await _walk(client, task, chunk, cfg, round_, on_done=bar.update, prompt=prompter)

    chunks = [problems[i : i + cfg.batch] for i in range(0, len(problems), cfg.batch)]
    for recs, c, v in await asyncio.gather(*(run(ch) for ch in chunks)):
        records += recs
        critic, version = c or critic, max(version, v)
    bar.close()
    tau, pairs, skipped = make_pairs(records, cfg)
    report = RoundReport(
        round=round_,
        policy_version=version,
        questions=len(problems),
        steps_judged=len(records),
        step_accuracy=sum(r.correct for r in records) / max(1, len(records)),
        tau=tau,
        pairs=dict(Counter(p.case for _, p in pairs)),
        skipped=dict(skipped),
        critic=critic,
        records=records,
    )
    if store and pairs:
        # the lineage is known now that the whole round is: the policy that wrote it and who judged it
        rows = [dataclasses.replace(p, policy_version=version, question_id=r.problem_id, critic=critic) for r, p in pairs]
        for i in range(0, len(rows), 500):
            resp = await client.put_pairs(round_, rows[i : i + 500])
            report.added += resp.added
            report.duplicates += resp.duplicates
    return report
