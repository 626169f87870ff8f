"""Trainer faults: kill a Ray Train worker or the whole trainer mid-epoch; DPO resumes from its last checkpoint.

Real local Ray (2 CPUs), the built-in tiny reasoner, real arithmetic pairs, TRL's DPOTrainer on 2 gloo workers.
48 pairs over 2 workers × 4 per device are 6 optimizer steps an epoch; a checkpoint every 2 steps. The kills are
SIGKILL (no handler runs): one ``RayTrainWorker`` process (Ray Train restarts the worker group, whose loop resumes
inside the same ``train_dpo`` call) and the driver process that called ``train_dpo`` (a second call resumes).
``--long`` trains twice as long, checks the resumed run against an uninterrupted one step by step, and trains a
run with other pairs over the killed run's scratch directory (fast mode checks that wipe without training).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from caspo.config import DPOTrainConfig
from caspo.core.pairs import Pair
from caspo.models.tiny import resolve_tiny
from caspo.trainer.dpo import (
    _checkpoint_complete,
    _drop_incomplete_checkpoints,
    _fingerprint,
    _latest_checkpoint,
    _open_run_dir,
    _rows,
    train_dpo,
)
from tests.arith_pairs import arith_pairs
from tests.ray_actors import alive_actor_pids

REPO = Path(__file__).resolve().parents[2]
N_PAIRS, WORKERS, BATCH, CKPT = 48, 2, 4, 2
WAIT_S = 420  # generous bound for waits on a loaded 2-core machine; no timing is asserted


def _expected_steps(n_pairs: int, s: DPOTrainConfig) -> int:
    """Optimizer steps of an uninterrupted run: each rank gets ceil(n / workers) rows, in per-device batches."""
    per_epoch = math.ceil(math.ceil(n_pairs / s.num_workers) / s.per_device_batch_size) // s.gradient_accumulation_steps
    return int(per_epoch * s.epochs)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return arith_pairs(N_PAIRS, seed=3)


@pytest.fixture(scope="module")
def settings(long_mode) -> DPOTrainConfig:
    # epochs: 4 (24 steps) fast, 8 (48 steps) long; the first checkpoint comes at step 2, leaving most of the run
    return DPOTrainConfig(
        num_workers=WORKERS,
        per_device_batch_size=BATCH,
        epochs=8 if long_mode else 4,
        learning_rate=2e-4,
        checkpoint_steps=CKPT,
        max_failures=2,
    )


def _wait_for_checkpoint(trainer_dir: Path, running) -> int:
    """Poll until the run has a complete checkpoint; its step. Fails if the run ends first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ckpt = _latest_checkpoint(trainer_dir, WORKERS)
        if ckpt is not None:
            return int(ckpt.name.split("-")[1])
        assert running(), "the DPO run ended before its first checkpoint"
        time.sleep(0.1)
    raise AssertionError(f"no complete checkpoint in {trainer_dir} after {WAIT_S}s")


def _train_worker_pids(ray) -> list[int]:
    """Pids of the live Ray Train workers of this cluster (not of any other Ray on the machine)."""
    return alive_actor_pids("RayTrainWorker")


def _wait_no_train_workers(ray) -> None:
    deadline = time.monotonic() + 60
    while _train_worker_pids(ray):
        assert time.monotonic() < deadline, f"Ray Train workers still alive: {_train_worker_pids(ray)}"
        time.sleep(0.2)


def _logged_losses(m: dict) -> dict[int, float]:
    steps = [h for h in m["history"] if "loss" in h and "rewards/margins" in h]
    by_step = {h["step"]: h["loss"] for h in steps}
    assert len(by_step) == len(steps), "a step was logged twice"
    return by_step


def _check_resumed_run(m: dict, out: Path, first_ckpt: int, n_pairs: int, s: DPOTrainConfig, pairs: list[Pair]) -> None:
    total = _expected_steps(n_pairs, s)
    print("resumed run:", {k: v for k, v in m.items() if k != "history"})
    assert m["steps"] == total
    assert first_ckpt <= m["resumed_from_step"] < total
    assert m["resumed_from_step"] % s.checkpoint_steps == 0
    assert m["samples"] == n_pairs * s.epochs
    # the log history came back with the checkpoint: every step once, from the first
    losses = _logged_losses(m)
    assert sorted(losses) == list(range(1, total + 1))
    # train_loss is the whole run's mean step loss, not only the steps after the resume
    assert m["train_loss"] == pytest.approx(sum(losses.values()) / total, rel=1e-5)
    # the first step (before the kill) scores the untouched policy against itself: loss log 2
    assert m["loss_start"] == pytest.approx(0.6931, abs=1e-2)
    assert m["reward_margin_end"] > m["reward_margin_start"]
    assert m["samples_per_s"] > 0
    assert not (out.parent / f".{out.name}.dpo").exists(), "the scratch directory outlived a successful run"

    from caspo.models.hf import HFBackend

    backend = HFBackend(str(out), device="cpu")
    scores = backend.score_steps([p.prompt for p in pairs[:8]], [p.chosen for p in pairs[:8]])
    assert len(scores) == 8
    for sc in scores:
        assert sc.tokens > 0 and all(math.isfinite(x) and x <= 0 for x in sc.token_logprobs)


# ---------------------------------------------------------------------------------------------------------------
# which checkpoint counts as complete (no Ray, no training)


def _fake_checkpoint(root: Path, step: int, world: int = 2) -> Path:
    import torch
    from safetensors.torch import save_file

    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.zeros(4, 4)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    for r in range(world):
        torch.save({"cpu": torch.zeros(3)}, ckpt / f"rng_state_{r}.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return ckpt


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    root = tmp_path / "trainer"
    good = _fake_checkpoint(root, 4)
    assert _checkpoint_complete(good, 2)
    assert not _checkpoint_complete(good, 3)  # a third rank's RNG state is missing

    no_rank1 = _fake_checkpoint(root, 6)  # rank 1 died before writing its RNG state (rank 0 was done)
    (no_rank1 / "rng_state_1.pth").unlink()
    cut_rng = _fake_checkpoint(root, 8)  # rank 1 died while writing it
    data = (cut_rng / "rng_state_1.pth").read_bytes()
    (cut_rng / "rng_state_1.pth").write_bytes(data[: len(data) // 2])
    no_state = _fake_checkpoint(root, 10)  # rank 0 died before trainer_state.json
    (no_state / "trainer_state.json").unlink()
    cut_state = _fake_checkpoint(root, 12)  # ... or while writing it
    (cut_state / "trainer_state.json").write_text('{"global_step": 1')
    cut_model = _fake_checkpoint(root, 14)  # truncated weights
    weights = (cut_model / "model.safetensors").read_bytes()
    (cut_model / "model.safetensors").write_bytes(weights[:-10])
    half_deleted = _fake_checkpoint(root, 16)  # rank 0 died while rotating it away
    (half_deleted / "optimizer.pt").unlink()
    wrong_step = _fake_checkpoint(root, 18)
    (wrong_step / "trainer_state.json").write_text(json.dumps({"global_step": 17}))
    (root / "checkpoint-20").mkdir()  # only the directory

    for bad in (no_rank1, cut_rng, no_state, cut_state, cut_model, half_deleted, wrong_step, root / "checkpoint-20"):
        assert not _checkpoint_complete(bad, 2), bad.name
    assert _latest_checkpoint(root, 2) == good
    dropped = _drop_incomplete_checkpoints(root, 2)
    assert sorted(dropped) == sorted(p.name for p in (no_rank1, cut_rng, no_state, cut_state, cut_model, half_deleted, wrong_step, root / "checkpoint-20"))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4"]
    assert _latest_checkpoint(tmp_path / "absent", 2) is None


def test_fsdp_checkpoints_count_when_their_gathered_files_are_whole(tmp_path):
    """Under FSDP rank 0 writes the gathered weights and optimizer as ``pytorch_model_fsdp.bin`` and
    ``optimizer.bin`` (accelerate's names): such a checkpoint resumes; one with either file cut does not."""
    import torch

    root = tmp_path / "trainer"
    good = _fake_checkpoint(root, 2)
    for ckpt in (good, _fake_checkpoint(root, 4)):
        (ckpt / "optimizer.pt").unlink()
        torch.save({"w": torch.zeros(4)}, ckpt / "pytorch_model_fsdp.bin")
        torch.save({"state": {}}, ckpt / "optimizer.bin")
    cut = root / "checkpoint-4"
    (cut / "optimizer.bin").write_bytes((cut / "optimizer.bin").read_bytes()[:20])
    assert _checkpoint_complete(good, 2)
    assert not _checkpoint_complete(cut, 2)
    assert _latest_checkpoint(root, 2) == good


def test_fingerprint_follows_pairs_and_result_changing_settings(pairs):
    tiny = str(resolve_tiny())
    s = DPOTrainConfig()
    base = _fingerprint(_rows(pairs, s.delimiter), tiny, tiny, s)["fingerprint"]
    assert _fingerprint(_rows(pairs, s.delimiter), tiny, tiny, s)["fingerprint"] == base
    assert _fingerprint(_rows(pairs[:-1], s.delimiter), tiny, tiny, s)["fingerprint"] != base
    assert _fingerprint(_rows(pairs, s.delimiter), tiny, tiny, replace(s, learning_rate=1e-3))["fingerprint"] != base
    assert _fingerprint(_rows(pairs, s.delimiter), tiny, tiny, replace(s, seed=1))["fingerprint"] != base
    # how often to checkpoint or retry, and where the workers run, do not change the trained model
    same = replace(s, checkpoint_steps=7, max_failures=0, cpus_per_worker=0.5, resources={"trainer": 1})
    assert _fingerprint(_rows(pairs, s.delimiter), tiny, tiny, same)["fingerprint"] == base


# ---------------------------------------------------------------------------------------------------------------
# faults during real runs


def test_worker_killed_mid_epoch_resumes_from_checkpoint(ray_local, pairs, settings, tmp_path, long_mode):
    tiny = str(resolve_tiny())
    out = tmp_path / "policy"
    result: dict = {}
    errors: list[BaseException] = []

    def run():
        try:
            result.update(train_dpo(pairs, tiny, tiny, str(out), settings, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    th = threading.Thread(target=run, name="train_dpo", daemon=True)
    th.start()
    first = _wait_for_checkpoint(tmp_path / ".policy.dpo" / "trainer", th.is_alive)
    pids = _train_worker_pids(ray_local)
    assert len(pids) == WORKERS, pids
    assert th.is_alive(), "the run finished before the kill"
    os.kill(pids[-1], signal.SIGKILL)
    th.join(timeout=WAIT_S)
    assert not th.is_alive(), "train_dpo did not return after the worker was killed"
    assert not errors, errors
    _check_resumed_run(result, out, first, N_PAIRS, settings, pairs)

    if long_mode:  # resume is exact: an uninterrupted run logs the same loss at every step
        ref = train_dpo(pairs, tiny, tiny, str(tmp_path / "uninterrupted"), settings, progress=False)
        assert ref["resumed_from_step"] == 0
        assert _logged_losses(result) == pytest.approx(_logged_losses(ref), abs=1e-4)


_DRIVER = """
import json, logging, sys
import ray
from caspo.core.pairs import Pair
from caspo.config import DPOTrainConfig
from caspo.trainer.dpo import train_dpo
logging.basicConfig(level=logging.INFO)
a = json.load(open(sys.argv[1]))
ray.init(address=a["address"])
train_dpo([Pair(**p) for p in a["pairs"]], a["tiny"], a["tiny"], a["out"], DPOTrainConfig(**a["settings"]), progress=False)
print("TRAIN_DPO_RETURNED", flush=True)
"""


def test_trainer_killed_resumes_and_other_pairs_start_fresh(ray_local, pairs, settings, tmp_path, caplog, long_mode):
    tiny = str(resolve_tiny())
    out = tmp_path / "policy"
    scratch = tmp_path / ".policy.dpo"
    args = tmp_path / "args.json"
    address = ray_local.get_runtime_context().gcs_address
    args.write_text(json.dumps({"address": address, "pairs": [asdict(p) for p in pairs], "tiny": tiny, "out": str(out), "settings": asdict(settings)}))
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log_file:
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(args)], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            first = _wait_for_checkpoint(scratch / "trainer", lambda: driver.poll() is None)
            assert driver.poll() is None, "the run finished before the kill"
            driver.send_signal(signal.SIGKILL)
            assert driver.wait(timeout=60) == -signal.SIGKILL
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert "TRAIN_DPO_RETURNED" not in log_path.read_text(errors="replace")
    # the dead driver's job takes its trainer and workers with it; what it wrote stays
    _wait_no_train_workers(ray_local)
    assert (scratch / "fingerprint.json").exists() and _latest_checkpoint(scratch / "trainer", WORKERS) is not None
    assert not (out / "model.safetensors").exists()
    other_scratch = tmp_path / ".other.dpo"
    shutil.copytree(scratch, other_scratch)  # for the fresh-start check below

    caplog.set_level(logging.INFO, logger="caspo.trainer.dpo")
    m = train_dpo(pairs, tiny, tiny, str(out), settings, progress=False)
    assert "is from this run" in caplog.text
    _check_resumed_run(m, out, first, N_PAIRS, settings, pairs)

    # the killed run's scratch directory met by a run with other pairs: wiped, so training starts at step 0
    caplog.clear()
    other_pairs = arith_pairs(8, seed=4)
    assert other_pairs != pairs[:8]
    if not long_mode:  # cheap: the driver's decision alone (no training), on the real directory
        fresh = _fingerprint(_rows(other_pairs, settings.delimiter), tiny, tiny, settings)
        assert _open_run_dir(other_scratch, fresh) is False
        assert "from another run (rows differ)" in caplog.text
        assert sorted(p.name for p in other_scratch.iterdir()) == ["fingerprint.json"]
        assert json.loads((other_scratch / "fingerprint.json").read_text())["fingerprint"] == fresh["fingerprint"]
        return
    # long: a whole run (8 pairs: 1 step an epoch)
    m2 = train_dpo(other_pairs, tiny, tiny, str(tmp_path / "other"), settings, progress=False)
    assert "from another run (rows differ)" in caplog.text
    assert m2["resumed_from_step"] == 0
    assert m2["steps"] == _expected_steps(8, settings)
    assert sorted(_logged_losses(m2)) == list(range(1, m2["steps"] + 1))
    assert not other_scratch.exists()
