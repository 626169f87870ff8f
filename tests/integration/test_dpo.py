"""Step-wise DPO on Ray Train (2 CPU workers, gloo DDP) with the real tiny reasoner and real arithmetic pairs."""

from __future__ import annotations


import pytest

from caspo.core.pairs import CASE_INCORRECT, Pair
from caspo.models.tiny import resolve_tiny
from caspo.config import DPOTrainConfig
from caspo.trainer.dpo import train_dpo
from tests.arith_pairs import arith_pairs as make_arith_pairs


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def arith_pairs() -> list[Pair]:
    """24 real pairs (tests/arith_pairs.py)."""
    return make_arith_pairs(24, seed=3)


def _mean_margin(path: str, pairs: list[Pair]) -> float:
    """Mean over pairs of log p(chosen step) − log p(rejected step), teacher-forced, delimiter included."""
    from caspo.models.hf import HFBackend

    backend = HFBackend(path, device="cpu")
    prompts = [p.prompt for p in pairs]
    chosen = backend.score_steps(prompts, [p.chosen for p in pairs])
    rejected = backend.score_steps(prompts, [p.rejected for p in pairs])
    return sum(sum(c.token_logprobs) - sum(r.token_logprobs) for c, r in zip(chosen, rejected)) / len(pairs)


def test_empty_pairs_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least one preference pair"):
        train_dpo([], str(resolve_tiny()), str(resolve_tiny()), str(tmp_path / "out"), DPOTrainConfig(), progress=False)


def test_malformed_pairs_rejected(tmp_path):
    tiny = str(resolve_tiny())
    def pair(rejected: str) -> Pair:
        return Pair("Q:1+2\n", "1+2=3", rejected, CASE_INCORRECT, 0.0, 0.0)

    with pytest.raises(ValueError, match="lacks rejected"):
        train_dpo([pair("")], tiny, tiny, str(tmp_path / "out"), DPOTrainConfig())
    with pytest.raises(ValueError, match="non-empty"):
        train_dpo([pair("  ")], tiny, tiny, str(tmp_path / "out"), DPOTrainConfig())
    with pytest.raises(ValueError, match="not a caspo.core.pairs.Pair"):  # the one form of a pair
        train_dpo([{"prompt": "Q:1+2\n", "chosen": "1+2=3", "rejected": "1+2=4"}], tiny, tiny, str(tmp_path / "out"), DPOTrainConfig())


def test_dpo_two_workers_improves_margin(ray_local, arith_pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert len(arith_pairs) == 24
    tiny = str(resolve_tiny())
    out = tmp_path / "policy-r1"
    # 24 pairs over 2 workers × 12 per device: every step sees the whole (fixed) batch
    settings = DPOTrainConfig(num_workers=2, per_device_batch_size=12, epochs=3, learning_rate=2e-4)
    m = train_dpo(arith_pairs, tiny, tiny, str(out), settings, progress=False)
    print("dpo metrics:", {k: v for k, v in m.items() if k != "history"})

    assert m["workers"] == 2
    assert m["steps"] == 3
    assert m["samples"] == 72
    assert m["samples_per_s"] > 0
    # the first step scores the untouched policy against itself: loss log 2, margin 0
    assert m["loss_start"] == pytest.approx(0.6931, abs=1e-2)
    assert m["reward_margin_start"] == pytest.approx(0.0, abs=1e-2)
    assert m["loss_end"] < m["loss_start"]
    assert m["reward_margin_end"] > m["reward_margin_start"]

    # only rank 0 wrote a complete, loadable model; nothing of the run is left beside it
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-r1"]
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)

    # the trained policy separates chosen from rejected steps more than the reference does
    ref_margin = _mean_margin(tiny, arith_pairs)
    new_margin = _mean_margin(str(out), arith_pairs)
    print(f"log-prob margin chosen-rejected: reference {ref_margin:.3f} -> trained {new_margin:.3f}")
    assert new_margin > ref_margin
