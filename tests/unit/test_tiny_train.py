"""Training the tiny reasoner: the schedules, document boundaries in packed rows, the validation split,
and the validation curve with checkpoint selection (real training, a few steps)."""

import json

import pytest
import torch

from caspo.cli.main import main
from caspo.models.tiny import TinyTrainConfig, _packed_batches, build_model, build_tokenizer, lr_at, train_tiny
from caspo.tasks.arith import ArithTask


def test_wsd_shorter_run_is_the_start_of_a_longer_one_until_it_decays():
    short, long = TinyTrainConfig(steps=1000, schedule="wsd"), TinyTrainConfig(steps=2000, schedule="wsd")
    assert [lr_at(short, s) for s in range(800)] == [lr_at(long, s) for s in range(800)]
    assert lr_at(short, 999) < 0.01 * short.lr and lr_at(long, 999) == long.lr
    # cosine ties its whole shape to the run's length: the two runs part at once after warm-up
    short, long = TinyTrainConfig(steps=1000), TinyTrainConfig(steps=2000)
    assert lr_at(short, 500) < lr_at(long, 500)


def test_packed_rows_with_boundaries_hold_whole_documents_each_seeing_only_itself():
    tok = build_tokenizer()
    cfg = TinyTrainConfig(batch_size=3, seq_len=200, doc_boundaries=True, hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64)
    ids, labels, weights, pos = next(_packed_batches(cfg, tok, seed=0))
    assert ids.shape == labels.shape == weights.shape == pos.shape == (3, 200)
    for row in range(3):
        starts = (ids[row] == tok.bos_token_id).nonzero().flatten().tolist()
        assert starts[0] == 0 and all(pos[row, s] == 0 for s in starts)
        ends = (ids[row] == tok.eos_token_id).nonzero().flatten().tolist()
        assert len(ends) == len(starts)  # no document is cut at the end of a row
        assert (weights[row, ends[-1] + 1 :] == 0).all() and (labels[row, ends[-1] + 1 :] == -100).all()
    torch.manual_seed(0)
    model = build_model(cfg, tok).eval()
    a, b = (ids[0] == tok.bos_token_id).nonzero().flatten().tolist()[1:3]
    with torch.no_grad():
        packed = model(input_ids=ids[:1], position_ids=pos[:1], use_cache=False).logits[0, a:b]
        alone = model(input_ids=ids[:1, a:b]).logits[0]
        run_on = model(input_ids=ids[:1]).logits[0, a:b]
    assert torch.allclose(packed, alone, atol=1e-4)  # as served: the question alone after <bos>
    assert not torch.allclose(run_on, alone, atol=1e-2)  # without boundaries it sees the documents before


def test_the_validation_split_is_held_out_from_training_and_from_test():
    task = ArithTask()
    val = task.problems(50, seed=0, split="val")
    assert all(task.is_validation(p.question) and task.split_of(p.question) == "train" for p in val)
    stream = task.iter_train_text(0)
    trained = {next(stream)[0] for _ in range(3000)}
    assert all(task.split_of(q[2:].strip()) == "train" and not task.is_validation(q[2:].strip()) for q in trained)
    assert not trained & {task.prompt(p.question) for p in val}
    assert not {p.question for p in val} & {p.question for p in task.problems(200, seed=0, split="test")}


def test_eval_every_writes_the_curve_and_keeps_the_best_checkpoint_also_after_resume(tmp_path):
    from safetensors.torch import load_file

    cfg = TinyTrainConfig(steps=6, batch_size=2, seq_len=128, checkpoint_every=2, eval_every=2, eval_n=4,
                          hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64, lr=1e-2, warmup=2, schedule="wsd", doc_boundaries=True)
    train_tiny(cfg, tmp_path / "whole", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["n"] == 4 and r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and r["loss"] > 0
    meta = json.loads((tmp_path / "whole" / "train_meta.json").read_text())
    best = max(rows, key=lambda r: (r["accuracy"], r["step"]))
    assert meta["selected"]["step"] == best["step"] and meta["selected"]["split"] == "val"
    assert (tmp_path / "whole" / "curve.png").stat().st_size > 0
    assert not (tmp_path / "whole" / "_resume").exists()
    # stopped after step 2 and resumed: the same curve and the same chosen weights
    assert train_tiny(cfg, tmp_path / "broken", progress=False, stop_at=2) is None
    train_tiny(cfg, tmp_path / "broken", progress=False)
    again = [json.loads(line) for line in (tmp_path / "broken" / "curve.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in again] == [(r["step"], r["accuracy"]) for r in rows]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "broken" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "depth=3"], "expected FIELD=VALUE with FIELD one of"),
        (["--set", "lr=fast"], "--set lr: expected a float"),
        (["--set", "schedule=linear"], "schedule must be one of cosine, wsd"),
        (["--eval-every", "-1"], "eval_every must be >= 0"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_train_base_refuses_a_bad_recipe_naming_the_field(tmp_path, argv, needle, capsys):
    assert main(["train-base", "--out", str(tmp_path / "m"), *argv]) == 2
    assert needle in capsys.readouterr().err
