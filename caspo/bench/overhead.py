"""Suite ``overhead``: what confidence costs.

1. Decoding with and without the per-token full-vocabulary entropy (the same prompts, greedy, runs
   interleaved ``repeats`` times; the median of each is compared).
2. The exact scorer (one teacher-forced pass over prompt + step) per step, against the time to
   generate that step. Paper anchor: 0.03 s/step for entropy vs 2.9 s/step for a PRM.
3. K samples per prompt with the prompt prefilled once and its KV cache shared, against K prefills.
4. The backend's greedy tokens/s on first steps against a plain batched ``generate`` of the same model.
5. Forward passes and tokens per question of greedy, SC@K, Algorithm 2 and the recommended adaptive CaT.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from caspo.models.factory import make_backend
from caspo.bench.common import SuiteResult, Timer, suite_model, median
from caspo.config import load_config
from caspo.core.search import SearchConfig, run_searches
from caspo.evaluation import evaluate, make_searches
from caspo.models.base import PromptedProposer, prefix_text
from caspo.models.prompting import prompter_for_backend
from caspo.tasks import get_task

COLUMNS = ["measure", "seconds", "per", "ratio", "note"]
DEFAULT_CONFIG = "configs/tiny-cpu.yaml"


def _sharing_rows(backend, task, problems, k: int, repeats: int) -> list[dict]:
    """K samples of every first step with the prompt prefilled once (KV cache shared) against K prefills."""
    if not hasattr(backend, "share_prefill"):
        return []
    prompt = prompter_for_backend(backend, task)
    prompts = [prompt(p.question) for p in problems]
    seeds = list(range(len(prompts)))
    times = {True: [], False: []}
    for _ in range(repeats):
        for share in (True, False):
            backend.share_prefill = share
            with Timer() as t:
                backend.sample_steps(prompts, k, 0.7, seeds)
            times[share].append(t.seconds)
    backend.share_prefill = True
    shared, separate = median(times[True]), median(times[False])
    return [
        {"measure": f"sample {k} first steps, one shared prefill", "seconds": shared, "per": f"{len(prompts)} prompts", "ratio": 1.0, "note": "KV cache fanned out to the samples"},
        {"measure": f"sample {k} first steps, {k} prefills", "seconds": separate, "per": f"{len(prompts)} prompts", "ratio": separate / shared, "note": "ratio: / shared prefill"},
    ]


def _generate_rows(backend, task, problems, repeats: int) -> list[dict]:
    """The backend's greedy tokens/s on first steps against a plain batched ``generate`` of the same model
    (left padding, greedy, max_step_tokens new tokens a row, no entropies)."""
    if not (hasattr(backend, "model") and hasattr(backend, "tokenizer") and hasattr(backend, "max_step_tokens")):
        return []
    prompt = prompter_for_backend(backend, task)
    prompts = [prompt(p.question) for p in problems]
    tok, model = backend.tokenizer, backend.model
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tok.padding_side = side
    gen_s, own_s, gen_tokens, own_tokens = [], [], 0, 0
    for _ in range(repeats):
        with Timer() as t, torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=backend.max_step_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        gen_s.append(t.seconds)
        gen_tokens = int(out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1]))
        with Timer() as t:
            steps = backend.sample_steps(prompts, 1, 0.0)
        own_s.append(t.seconds)
        own_tokens = sum(s.tokens for g in steps for s in g)
    gen_rate, own_rate = gen_tokens / median(gen_s), own_tokens / median(own_s)
    return [
        {"measure": "plain batched generate, tokens/s", "seconds": median(gen_s), "per": f"{len(prompts)} prompts, {gen_tokens} tokens", "ratio": 1.0, "note": f"{gen_rate:.0f} tokens/s"},
        {"measure": "backend sample_steps (greedy, entropies), tokens/s", "seconds": median(own_s), "per": f"{len(prompts)} prompts, {own_tokens} tokens", "ratio": own_rate / gen_rate, "note": f"{own_rate:.0f} tokens/s; ratio: / generate's"},
    ]


def _method_rows(backend, task, problems, k: int, seed: int, batch: int) -> list[dict]:
    """Forward passes and tokens per question of each search (forward passes on backends that count them)."""
    cat = load_config(DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None).cat
    methods = [
        ("greedy", SearchConfig(method="greedy", seed=seed)),
        (f"SC@{k}", SearchConfig(method="sc", k=k, seed=seed)),
        (f"CaT@{k} Alg. 2", SearchConfig(method="cat", k=k, tau=0.5, scoring="entropy", seed=seed)),
        (f"CaT@{k} adaptive", dataclasses.replace(cat.search_config(seed=seed), k=k)),
    ]
    rows = []
    for name, cfg in methods:
        before = getattr(backend, "forward_passes", None)
        with Timer() as t:
            rep = evaluate(backend, task, problems, cfg, batch=batch)
        passes = None if before is None else (backend.forward_passes - before) / len(problems)
        rows.append({"measure": f"{name}: forward passes / question", "seconds": t.seconds, "per": f"{len(problems)} problems", "ratio": passes,
                     "note": f"ratio: forward passes per question (batch {batch}); {rep.tokens:.1f} tokens per question"})
    return rows


def run(n: int, model: str = "tiny", engine: str = "hf", seed: int = 0, repeats: int = 5, batch: int = 16, k: int = 4, progress: bool = True) -> SuiteResult:
    task = get_task("arith")
    problems = task.problems(n, seed=seed, split="test")
    backend = make_backend(suite_model(model, engine))
    prompter = prompter_for_backend(backend, task)  # model.prompt_format, step_delimiter
    proposer = PromptedProposer(backend, prompter)
    greedy = SearchConfig(method="greedy", seed=seed)

    def decode_all() -> tuple[float, list]:
        results = []
        with Timer() as t:
            for s in range(0, len(problems), batch):
                results += run_searches(make_searches(problems[s : s + batch], greedy), proposer)
        return t.seconds, results

    decode_all()  # warm up
    toggle = hasattr(backend, "compute_entropy")  # HF; vLLM returns its top-k logprobs either way
    with_h, without_h = [], []
    results = []
    for _ in range(repeats):
        if toggle:
            backend.compute_entropy = True
        sec, results = decode_all()
        with_h.append(sec)
        if toggle:
            backend.compute_entropy = False
            without_h.append(decode_all()[0])
    if toggle:
        backend.compute_entropy = True
    steps = sum(len(r.steps) for r in results)
    gen_per_step = median(with_h) / steps

    prompts, texts = [], []
    for p, r in zip(problems, results):
        for i, st in enumerate(r.steps):
            prompts.append(prefix_text(prompter, p.question, r.steps[:i]))
            texts.append(st)
    score = []
    for _ in range(repeats):
        with Timer() as t:
            for s in range(0, len(prompts), batch * 4):
                backend.score_steps(prompts[s : s + batch * 4], texts[s : s + batch * 4])
        score.append(t.seconds)
    score_per_step = median(score) / len(prompts)
    extra_rows = _sharing_rows(backend, task, problems, k, repeats) + _generate_rows(backend, task, problems, repeats) + _method_rows(backend, task, problems, k, seed, batch)
    rows = [
        {"measure": "greedy decode, entropy on", "seconds": median(with_h), "per": f"{n} problems", "ratio": median(with_h) / median(without_h) if toggle else None, "note": "ratio: / entropy off" if toggle else "no toggle on this backend"},
        *([{"measure": "greedy decode, entropy off", "seconds": median(without_h), "per": f"{n} problems", "ratio": 1.0, "note": ""}] if toggle else []),
        {"measure": "generate one step", "seconds": gen_per_step, "per": "step", "ratio": 1.0, "note": f"{steps} steps, batch {batch}"},
        {"measure": "exact scorer, one step", "seconds": score_per_step, "per": "step", "ratio": score_per_step / gen_per_step, "note": "ratio: / generating it"},
        *extra_rows,
    ]
    return SuiteResult(
        suite="overhead",
        title=f"Confidence overhead (tiny reasoner, {n} problems, median of {repeats})",
        command=f"caspo bench --suite overhead -n {n}",
        rows=rows,
        columns=COLUMNS,
        notes=["Paper anchor: entropy 0.03 s/step vs a process reward model 2.9 s/step (7B, GPU)."],
        extra={"decode_with_entropy_s": with_h, "decode_without_entropy_s": without_h, "score_s": score},
    )


def plot(plt, res: SuiteResult):
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["measure"] for r in res.rows], [r["seconds"] for r in res.rows])
    ax.set(xlabel="seconds (see 'per')", xscale="log")
    fig.suptitle(res.title, fontsize=9)
    return fig
