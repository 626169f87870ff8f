import math

import pytest
import torch

from caspo.core.confidence import (
    log_step_score,
    step_confidence,
    step_multiplier,
    token_entropy,
    token_logprobs,
)


def test_uniform_entropy_is_log_v():
    for v in (2, 25, 100, 151_936):
        h = token_entropy(torch.zeros(3, v))
        assert torch.allclose(h, torch.full((3,), math.log(v)), atol=1e-4)


def test_one_hot_entropy_is_zero_even_with_minus_inf():
    logits = torch.full((2, 10), float("-inf"))
    logits[:, 3] = 0.0
    assert torch.equal(token_entropy(logits), torch.zeros(2))
    big = torch.tensor([[1e4, 0.0, -1e4]])
    assert token_entropy(big).item() == pytest.approx(0.0, abs=1e-6)


def test_random_logits_match_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 50, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    direct = -(p * torch.log(p)).sum(-1)
    assert torch.allclose(token_entropy(logits).double(), direct, atol=1e-5)


def test_entropy_ignores_temperature_free_scale_only_via_logits():
    # entropy is a property of the logits it is given; scaling logits changes it (sharper → lower)
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert token_entropy(logits * 2) < token_entropy(logits)


def test_padding_is_masked():
    logits = torch.randn(2, 5, 30)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = token_entropy(logits, mask)
    assert torch.equal(h[0, 3:], torch.zeros(2))
    assert torch.allclose(h[0, :3], token_entropy(logits[0, :3]))
    lp = token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), mask)
    assert torch.equal(lp[0, 3:], torch.zeros(2))


def test_a_nan_at_a_masked_position_does_not_survive_the_mask():
    # masking by multiplication kept NaN (NaN * 0 is NaN); padding must read 0 whatever its logits
    logits = torch.randn(1, 4, 30)
    logits[0, 3] = float("nan")
    mask = torch.tensor([[1, 1, 1, 0]])
    h = token_entropy(logits, mask)
    assert torch.equal(h[0, 3:], torch.zeros(1)) and torch.isfinite(h).all()
    lp = token_logprobs(logits, torch.zeros(1, 4, dtype=torch.long), mask)
    assert torch.equal(lp[0, 3:], torch.zeros(1)) and torch.isfinite(lp).all()


def test_token_logprobs_direct():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert token_logprobs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))


def test_step_confidence_and_multiplier():
    ents = [0.2, 0.4]
    assert step_confidence(ents) == pytest.approx(-0.3)
    assert step_multiplier(ents) == pytest.approx(math.exp(-0.3))
    assert step_multiplier([]) == 1.0


def test_scorings():
    ents, lps = [0.1, 0.3], [-0.5, -1.5]
    assert log_step_score("entropy", ents, lps) == pytest.approx(-0.2)
    assert log_step_score("logprob", ents, lps) == pytest.approx(-1.0)
    assert log_step_score("product", ents, lps) == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="scoring"):
        log_step_score("ppl", ents, lps)


# ---- top-k entropy estimate (what the vLLM generator reports; docs/design.md §5 "vLLM entropy") ----------
from caspo.core.confidence import topk_entropy_estimate  # noqa: E402


def _topk(logits: torch.Tensor, k: int) -> list[float]:
    return torch.log_softmax(logits.double(), -1).topk(k).values.tolist()


def test_topk_estimate_is_exact_when_topk_covers_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    for scale in (0.0, 1.0, 4.0):
        logits = torch.randn(12, generator=g, dtype=torch.float64) * scale
        exact = token_entropy(logits).item()
        full = _topk(logits, 12)
        assert topk_entropy_estimate(full) == pytest.approx(exact, abs=1e-6)
        assert topk_entropy_estimate(full, vocab_size=12) == pytest.approx(exact, abs=1e-6)
    # a one-hot distribution with -inf entries: zero entropy, no nan
    assert topk_entropy_estimate([0.0, float("-inf"), float("-inf")], vocab_size=3) == 0.0


def test_topk_estimate_brackets_and_is_close_for_a_peaked_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g, dtype=torch.float64)
    logits[7] += 10.0
    logits[3] += 7.0
    exact = token_entropy(logits).item()
    top5 = _topk(logits, 5)
    lower = topk_entropy_estimate(top5)
    upper = topk_entropy_estimate(top5, vocab_size=100)
    assert lower <= exact + 1e-5 <= upper + 2e-5  # token_entropy works in float32
    assert upper - exact < 0.02  # ~1% of the mass is outside the top 5: the uniform tail is close
    assert exact - lower < 0.1


def test_topk_estimate_bounds_tighten_monotonically_with_k():
    g = torch.Generator().manual_seed(2)
    for scale in (0.5, 2.0):
        logits = torch.randn(40, generator=g, dtype=torch.float64) * scale
        exact = token_entropy(logits).item()
        lowers = [topk_entropy_estimate(_topk(logits, k)) for k in range(1, 41)]
        uppers = [topk_entropy_estimate(_topk(logits, k), vocab_size=40) for k in range(1, 41)]
        for a, b in zip(lowers, lowers[1:]):
            assert b >= a - 1e-9
        for a, b in zip(uppers, uppers[1:]):
            assert b <= a + 1e-9
        assert all(lo <= exact + 1e-5 <= up + 2e-5 for lo, up in zip(lowers, uppers))
        assert lowers[-1] == pytest.approx(exact, abs=1e-6)
        assert uppers[-1] == pytest.approx(exact, abs=1e-6)


def test_verdict_probability_renormalises_yes_against_no():
    from caspo.core.confidence import verdict_probability

    assert verdict_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert verdict_probability(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow
    assert verdict_probability(0.0, -math.inf) == 1.0 and verdict_probability(-math.inf, 0.0) == 0.0
    assert math.isnan(verdict_probability(-math.inf, -math.inf))
