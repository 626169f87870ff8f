"""Every DPO loss the config offers, through the project's trainer class on the real tiny reasoner: on one
fixed batch of real pairs, a few optimizer steps lower the loss and raise the chosen - rejected margin.
In-process (no Ray Train): the trainer is built by the same ``build_trainer`` the Ray workers call."""

import dataclasses

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caspo.config import DPOTrainConfig
from caspo.models.tiny import resolve_tiny
from caspo.trainer.dpo import _rows, build_trainer
from tests.arith_pairs import arith_pairs

PAIRS = 16


@pytest.mark.parametrize(
    "loss",
    [
        {"loss_type": "sigmoid"},
        {"loss_type": "sigmoid", "sft_weight": 1.0},
        {"loss_type": "ipo"},
        {"loss_type": "dpop", "dpop_lambda": 50.0},
    ],
    ids=["sigmoid", "sigmoid+nll", "ipo", "dpop"],
)
def test_each_loss_lowers_itself_and_raises_the_margin(loss, tmp_path):
    torch.manual_seed(0)
    tiny = str(resolve_tiny())
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = dataclasses.replace(
        DPOTrainConfig(), learning_rate=3e-4, per_device_batch_size=PAIRS, epochs=6, checkpoint_steps=0, num_workers=1, **loss
    )
    rows = _rows(arith_pairs(PAIRS, seed=5), cfg.delimiter)
    trainer = build_trainer(policy, None, tok, datasets.Dataset.from_list(rows), cfg, str(tmp_path / "trainer"))
    trainer.ref_model = None  # its log-probs are precomputed into the dataset
    trainer.train()
    steps = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(steps) == 6  # one batch holds every pair: each step sees the same batch
    first, last = steps[0], steps[-1]
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert abs(first["rewards/margins"]) < 1e-4  # the first step starts at the reference
    if loss["loss_type"] == "dpop":
        assert all(h["dpop/penalty"] >= 0 for h in steps)
        assert last["rewards/chosen"] > -1e-3  # DPOP does not let the chosen log-prob fall


def test_reference_columns_equal_trl_precompute_and_give_the_same_loss(tmp_path):
    """The reference log-probs the project computes (the scorer's teacher-forced pass, before the trainer wraps the
    model) equal TRL's own precompute on the same tokenised rows to 1e-5, and so does the loss of a batch."""
    from trl import DPOTrainer

    torch.manual_seed(0)
    tiny = str(resolve_tiny())
    tok = AutoTokenizer.from_pretrained(tiny)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = dataclasses.replace(DPOTrainConfig(), per_device_batch_size=8, epochs=1, checkpoint_steps=0, num_workers=1, max_length=40)
    rows = _rows(arith_pairs(12, seed=7), cfg.delimiter)
    trainer = build_trainer(policy, None, tok, datasets.Dataset.from_list(rows), cfg, str(tmp_path / "trainer"))
    ours = trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(ours.column_names)
    assert any(len(r["prompt_ids"]) + len(r["chosen_ids"]) > 40 for r in ours)  # truncation is exercised
    # TRL's own precompute on the same tokenised rows (its parent method, with the same unwrapped model)
    bare = ours.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    theirs = DPOTrainer._precompute_ref_logps(trainer, bare, "check", 8)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.tensor(ours[col]) == pytest.approx(torch.tensor(theirs[col]), abs=1e-5)
    batch = trainer.data_collator([ours[i] for i in range(8)])
    batch_trl = trainer.data_collator([theirs[i] for i in range(8)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        loss_trl = trainer.compute_loss(trainer.model, batch_trl)
    assert float(loss) == pytest.approx(float(loss_trl), abs=1e-5)
    assert float(loss) == pytest.approx(0.6931, abs=1e-4)  # reference = this policy: log 2
