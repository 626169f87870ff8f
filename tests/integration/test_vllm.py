"""vLLM backend on a real GPU, held against the exact HF backend (docs/design.md §5 "vLLM entropy": both paths are
tested against each other where a GPU is available). Skipped without CUDA or without the ``gpu`` extra.

Both sides run the tiny reasoner in float32 (vLLM ``dtype="float32"``, HF on the CPU), so differences
are kernel rounding plus, for entropies, the top-k estimate itself.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the vLLM backend needs a CUDA GPU (torch sees none)"),
]

if torch.cuda.is_available():  # without CUDA the marks above skip every test; vllm is not even imported
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'caspo-mesh[gpu]')")

from caspo.core.steps import join_steps  # noqa: E402
from caspo.models.hf import HFBackend  # noqa: E402
from caspo.models.tiny import resolve_tiny  # noqa: E402
from caspo.models.vllm import VLLMBackend  # noqa: E402
from caspo.tasks.arith import ArithTask  # noqa: E402

TOPK = 20


@pytest.fixture(scope="module")
def backend():
    b = VLLMBackend(
        "tiny", version=0, topk=TOPK, gpu_memory_utilization=0.3, dtype="float32", enforce_eager=True, seed=0
    )
    yield b
    del b.llm


@pytest.fixture(scope="module")
def exact():
    return HFBackend("tiny", device="cpu")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    task = ArithTask()
    out = []
    for problem in task.problems(6, seed=11, split="test"):
        gold = problem.gold_steps
        out.append(task.prompt(problem.question))
        out.append(task.prompt(problem.question) + join_steps(gold[:1]))
    return out


def test_sample_steps_shape_and_estimate_flag(backend, prompts):
    out = backend.sample_steps(prompts[:3], n=4, temperature=1.0, seeds=[1, 2, None])
    assert len(out) == 3
    for group in out:
        assert len(group) == 4
        for s in group:
            assert s.entropy_estimate is True
            assert s.tokens >= 1 and len(s.token_entropies) == s.tokens <= backend.max_step_tokens
            assert all(h >= 0 for h in s.token_entropies)
            assert all(lp <= 1e-6 for lp in s.token_logprobs)
            assert "\n" not in s.text and s.text == s.text.strip()
    greedy = backend.sample_steps(prompts[:2], n=1, temperature=0.0)
    assert [len(g) for g in greedy] == [1, 1] and greedy[0][0].text
    with pytest.raises(ValueError, match="greedy"):
        backend.sample_steps(prompts[:1], n=2, temperature=0.0)


def test_seeded_sampling_is_deterministic(backend, prompts):
    a = backend.sample_steps(prompts[:4], n=3, temperature=1.0, seeds=[5, 6, 7, 8])
    # same seeds in a different batch (other prompts around them) give the same samples
    b = backend.sample_steps(prompts[2:4] + prompts[:2], n=3, temperature=1.0, seeds=[7, 8, 5, 6])
    b = b[2:] + b[:2]
    for ga, gb in zip(a, b):
        assert [s.text for s in ga] == [s.text for s in gb]
        for sa, sb in zip(ga, gb):
            assert sa.token_logprobs == pytest.approx(sb.token_logprobs, abs=1e-4)


def test_estimated_entropies_agree_with_exact_hf(backend, exact, prompts):
    """The generator's top-k estimates vs the ConfidenceScorer path's exact teacher-forced entropies."""
    out = backend.sample_steps(prompts, n=4, temperature=1.0, seeds=list(range(len(prompts))))
    pairs = [(p, s) for p, group in zip(prompts, out) for s in group if not s.ended and s.text]
    assert pairs, "no complete step was sampled"
    scores = exact.score_steps([p for p, _ in pairs], [s.text for _, s in pairs])
    diffs, compared = [], 0
    for (_, s), sc in zip(pairs, scores):
        if sc.tokens != s.tokens:  # e.g. whitespace the step text no longer holds: not the same tokens
            continue
        compared += 1
        assert s.token_logprobs == pytest.approx(sc.token_logprobs, abs=1e-2)
        diffs += [abs(a - b) for a, b in zip(s.token_entropies, sc.token_entropies)]
    assert compared >= len(pairs) // 2
    assert sum(diffs) / len(diffs) < 0.05


def test_score_steps_agree_with_hf(backend, exact, prompts):
    task = ArithTask()
    problems = task.problems(6, seed=11, split="test")
    ps = [task.prompt(p.question) for p in problems]
    steps = [p.gold_steps[0] for p in problems]
    steps[0] = "  " + steps[0] + "  "  # stripped on both sides
    got = backend.score_steps(ps, steps)
    ref = exact.score_steps(ps, steps)
    diffs = []
    for g, r in zip(got, ref):
        assert g.tokens == r.tokens
        assert g.token_logprobs == pytest.approx(r.token_logprobs, abs=1e-2)
        diffs += [abs(a - b) for a, b in zip(g.token_entropies, r.token_entropies)]
    assert sum(diffs) / len(diffs) < 0.05
    assert backend.score_steps([], []) == []
    with pytest.raises(ValueError, match="length"):
        backend.score_steps(ps, steps[:-1])


def test_reload_swaps_weights_and_bumps_version(backend, prompts, tmp_path):
    from safetensors.torch import load_file, save_file

    src = resolve_tiny()
    other = tmp_path / "perturbed"
    shutil.copytree(src, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(other / "model.safetensors"))

    ps, st = prompts[:2], ["1+2=3", "4*5=20"]
    before = backend.score_steps(ps, st)
    backend.reload(str(other), version=1)
    assert backend.version == 1 and backend.path == str(other)
    changed = backend.score_steps(ps, st)
    assert any(abs(a - b) > 1e-3 for x, y in zip(before, changed) for a, b in zip(x.token_logprobs, y.token_logprobs))
    assert backend.sample_steps(ps, n=2, temperature=1.0, seeds=[1, 2])  # still serves after the swap

    backend.reload(str(src), version=2)
    assert backend.version == 2
    back = backend.score_steps(ps, st)
    for x, y in zip(before, back):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
