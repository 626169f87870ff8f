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


def test_save_policy_writes_bf16_weights_that_load(tmp_path):
    """After GPU training the float32 master weights are published in bf16: half the bytes, what vLLM serves."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from caspo.trainer.dpo import save_policy

    tiny = str(resolve_tiny())
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny)
    save_policy(model, tok, model.state_dict(), tmp_path / "bf16", torch.bfloat16)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    ids = tok("Q:12+7*3-5\n", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        got = back(ids).logits.float()
    assert (got - want).abs().max() < 0.5  # bf16 rounding of the same weights (logits ~20), not other weights
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_fsdp_on_cpu_needs_two_workers(tmp_path):
    """FSDP on CPU shards over the gloo workers: one worker has nothing to shard over, so say so."""
    from caspo.config import ConfigError, load_config

    tiny = str(resolve_tiny())
    with pytest.raises(ValueError, match="fsdp on CPU needs num_workers >= 2"):
        train_dpo(make_arith_pairs(2, seed=1), tiny, tiny, str(tmp_path / "out"), DPOTrainConfig(fsdp=True, num_workers=1))
    with pytest.raises(ConfigError, match="dpo.fsdp on CPU needs dpo.num_workers >= 2"):
        load_config(None, ["dpo.fsdp=true", "dpo.num_workers=1"])
    cfg = load_config(None, ["dpo.fsdp=true", "dpo.use_gpu=true", "dpo.fsdp_config={cpu_offload: true}"])
    assert cfg.dpo.fsdp and cfg.dpo.fsdp_config == {"cpu_offload": True}


def test_fsdp_round_on_cpu_two_workers(ray_local, arith_pairs, tmp_path):
    """The GPU path of dpo.fsdp on two CPU workers (gloo): accelerate's FSDP2 shards every parameter, the reference
    log-probs are computed before sharding, training lowers the loss, and rank 0 gathers and writes whole weights
    that load with from_pretrained and score the chosen steps higher than before."""
    tiny = str(resolve_tiny())
    out = tmp_path / "policy-fsdp-cpu"
    s = DPOTrainConfig(num_workers=2, per_device_batch_size=12, epochs=2, learning_rate=2e-4, fsdp=True, cpus_per_worker=1, checkpoint_steps=0)
    m = train_dpo(arith_pairs, tiny, tiny, str(out), s, progress=False)
    assert m["workers"] == 2 and m["sharded"] is True
    assert m["steps"] == 2
    assert m["loss_start"] == pytest.approx(0.6931, abs=1e-2)  # reference = policy: the first step starts at log 2
    assert m["loss_end"] < m["loss_start"]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert _mean_margin(str(out), arith_pairs) > _mean_margin(tiny, arith_pairs)


def test_fsdp_settings_reach_accelerate_as_full_state_dict(tmp_path):
    """The real TrainingArguments take the sharding settings: FSDP2, the user's fsdp_config kept, and the
    whole-weights state dict the published model is gathered with."""
    from trl import DPOConfig

    from caspo.trainer.dpo import _sharding

    assert _sharding(DPOTrainConfig()) == {}
    s = DPOTrainConfig(fsdp=True, use_gpu=True, fsdp_config={"cpu_offload": True, "state_dict_type": "SHARDED_STATE_DICT"})
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **_sharding(s))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["cpu_offload"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="FSDP shards only across GPUs")
def test_fsdp_round_on_gpu(ray_local, arith_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny = str(resolve_tiny())
    out = tmp_path / "policy-fsdp"
    s = DPOTrainConfig(num_workers=1, per_device_batch_size=12, epochs=3, learning_rate=2e-4, use_gpu=True, fsdp=True, cpus_per_worker=1)
    m = train_dpo(arith_pairs, tiny, tiny, str(out), s, progress=False)
    assert m["steps"] == 6 and m["loss_end"] < m["loss_start"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype.is_floating_point
    assert _mean_margin(str(out), arith_pairs) > _mean_margin(tiny, arith_pairs)
