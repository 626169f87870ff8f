"""The transformers backend prefills each prompt once and shares its KV cache with the prompt's n samples:
for fixed seeds that gives the same tokens, entropies and log-probs as n separate prefills."""

import pytest

from caspo.models.hf import HFBackend


@pytest.fixture(scope="module")
def backend():
    return HFBackend("tiny", device="cpu")


def test_shared_prefill_matches_separate_prefills(backend):
    prompts = ["Q:12+7*3\n", "Q:(5+9)*2-4\n", "Q:8*3\n"]  # different lengths: left padding is exercised too
    seeds = [11, 22, 33]
    backend.share_prefill = True
    before = (backend.forward_passes, backend.prefill_rows)
    shared = backend.sample_steps(prompts, 4, 0.9, seeds)
    shared_rows = backend.prefill_rows - before[1]
    backend.share_prefill = False
    try:
        separate = backend.sample_steps(prompts, 4, 0.9, seeds)
    finally:
        backend.share_prefill = True
    assert shared_rows == 3 and backend.prefill_rows - before[1] - shared_rows == 12  # 3 prefills instead of 12
    for a_group, b_group in zip(shared, separate):
        for a, b in zip(a_group, b_group):
            assert a.text == b.text and a.ended == b.ended
            assert a.token_entropies == pytest.approx(b.token_entropies, abs=1e-4)
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert len({s.text for g in shared for s in g}) > 3  # the samples differ: a real sampling test
