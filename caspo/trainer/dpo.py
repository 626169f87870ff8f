"""One round of step-wise DPO (docs/design.md §3, §5): TRL's ``DPOTrainer`` run data-parallel by Ray Train.

The reference model is the previous round's policy and stays frozen, so by default its log-probs are computed
once before training (``precompute_ref_log_probs``) and it is not held in memory while the policy trains.

How the pieces fit:

* the driver (:func:`train_dpo`) validates the pairs, turns them into rows ``{prompt, chosen, rejected}`` with
  the step delimiter appended to each completion, and starts a ``ray.train.torch.TorchTrainer`` with the rows in
  ``train_loop_config`` (a round's pairs are small);
* Ray Train starts ``num_workers`` workers and joins them in a torch process group (gloo on CPU, nccl on GPU)
  and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; ``transformers.TrainingArguments`` (through
  accelerate) finds the live process group and wraps the policy in DDP — no launcher (torchrun, accelerate
  launch) is involved;
* each worker runs :func:`_train_loop`: load policy, reference and tokenizer, build the ``datasets.Dataset``,
  run ``DPOTrainer`` (wrapped by Ray's ``prepare_trainer``), then rank 0 writes the trained policy;
* with ``fsdp`` accelerate shards the policy with FSDP2 instead of DDP, each decoder layer a unit (on CPUs too, over
  gloo: see ``_StepDPOTrainer.create_accelerator_and_postprocess``):
  weights, gradients and AdamW moments are split over the workers, which is what a 7B policy needs; the whole
  weights are gathered onto rank 0 to be written;
* the loop's return value on rank 0 (``Result.return_value``, Ray Train V2) carries the metrics back; each rank
  also calls ``ray.train.report`` once with the summary so Ray's own callbacks see it (and so V1's
  ``Result.metrics`` carries it when ``RAY_TRAIN_V2_ENABLED=0``).

Three things are done by hand because TRL 1.16 does them differently from what step-wise DPO needs:

* TRL appends ``eos_token`` to every plain-text completion. A step is not the end of a solution: the model
  must learn to end the *step* with the delimiter, not the document with ``<eos>``, so :class:`_StepDPOTrainer`
  drops that appended token after TRL's own tokenisation. Chosen and rejected are then scored over exactly the
  tokens ``HFBackend.score_steps`` scores (step text plus delimiter).
* The reference log-probs: TRL would precompute them inside ``DPOTrainer.__init__`` with the policy as it is before
  the trainer wraps it (under FSDP: float32 on the CPU). :meth:`_StepDPOTrainer._precompute_ref_logps` computes them
  there instead, with the teacher-forced pass the scorer uses (:func:`caspo.models.hf.teacher_forced`) over
  exactly the tokens TRL's collator trains on, on this process's device (under FSDP on GPUs a bf16 copy of the
  reference on the rank's GPU), each rank a share of the rows, and hands them to TRL as the dataset's
  ``ref_chosen_logps``/``ref_rejected_logps`` columns; TRL computes nothing and caches nothing.
* accelerate shards with FSDP only on accelerators; on CPUs (gloo) the trainer makes it shard as well, so the CPU
  tests run the GPU code path (:meth:`_StepDPOTrainer.create_accelerator_and_postprocess`).

Rank 0 saves the rows with ``save_to_disk`` into the run's scratch directory and every rank loads that copy, so
the ``datasets`` caches of TRL's tokenisation are shared files a resumed run reuses.

Files: the scratch directory is ``.<out_dir name>.dpo`` next to ``out_dir``. It holds ``fingerprint.json`` (a
hash of the rows, the settings that change the result, the two models' files and the library versions), the
dataset copy ``data/`` with the ``datasets`` cache files TRL's maps write beside it,
``trainer/`` (``DPOConfig.output_dir``: the HF Trainer checkpoints) and ``ray/`` (``RunConfig.storage_path``,
wiped at each call). It is removed after a successful run and kept when :func:`train_dpo` raises or its process
is killed. The trained policy is written by rank 0 only, first into the scratch directory and then renamed to
``out_dir``, so a reader never sees a half-written model. On one machine any local path works; on a multi-node
Ray cluster ``out_dir`` must be on a filesystem every node can read and write (NFS, a mounted bucket), because
the workers read the dataset copy beside it, every rank writes its RNG state into the checkpoints and rank 0 (on
whichever node) writes the rest.

Checkpoints and resume: every ``checkpoint_steps`` optimizer steps the HF Trainer writes ``trainer/checkpoint-N``
(weights, optimizer, scheduler, the trainer state with its log history, one RNG state per rank; the last two are
kept, none after the final step, since the model is written right after it). When ``_train_loop`` starts, rank 0
deletes every checkpoint that is not complete (see :func:`_checkpoint_complete`: a rank killed while writing one, or
while the Trainer was rotating an old one away) and all ranks resume from the newest complete one, so the run
continues at step N with the optimizer, scheduler, RNG and data position it had there. Two kinds of restart end
up there: Ray Train restarts the worker group when a worker process dies (``FailureConfig(max_failures)``), and a
re-run of :func:`train_dpo` after the driver died or raised finds the scratch directory again: with the same
fingerprint it resumes from its checkpoints (and reuses the dataset copy and its caches), with another one it
wipes the directory and starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import datasets
import ray
import ray.train
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from ray.train import FailureConfig, RunConfig, ScalingConfig  # the V2 classes unless RAY_TRAIN_V2_ENABLED=0
from ray.train.huggingface.transformers import prepare_trainer
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import is_v2_enabled
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import global_then_local_main_first

from caspo.config import DPOTrainConfig, dpo_worker_resources
from caspo.core.losses import dpop_loss, dpop_penalty
from caspo.core.pairs import Pair
from caspo.models.hf import teacher_forced

log = logging.getLogger(__name__)

_PAIR_KEYS = ("prompt", "chosen", "rejected")


def scratch_dir(out_dir: str | os.PathLike) -> Path:
    """The scratch directory of the DPO run that writes ``out_dir`` (see the module docstring)."""
    out = Path(out_dir).expanduser().resolve()
    return out.parent / f".{out.name}.dpo"


def _rows(pairs: Sequence[Pair], delimiter: str) -> list[dict]:
    """The rows TRL reads (``{prompt, chosen, rejected}``): where a Pair stops being one."""
    if not pairs:
        raise ValueError("train_dpo needs at least one preference pair; got an empty list")
    rows = []
    for i, p in enumerate(pairs):
        if not isinstance(p, Pair):
            raise ValueError(f"pair {i} is a {type(p).__name__}, not a caspo.core.pairs.Pair")
        bad = [k for k in _PAIR_KEYS if not isinstance(getattr(p, k), str)]
        if bad:
            raise ValueError(f"pair {i}: {', '.join(bad)} must be strings")
        empty = [k for k in ("chosen", "rejected") if not getattr(p, k).strip()]
        if empty:
            raise ValueError(f"pair {i} lacks {' and '.join(empty)}: chosen and rejected must be non-empty steps")
        # the completion is the step plus its delimiter: the model learns to end the step there
        rows.append({"prompt": p.prompt, "chosen": p.chosen.strip() + delimiter, "rejected": p.rejected.strip() + delimiter})
    return rows


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# settings that do not change the trained model: a re-run that differs only in these still resumes
_FSDP_MODEL = "pytorch_model_fsdp.bin"  # accelerate's save_fsdp_model file (FULL_STATE_DICT)
_NOT_IN_FINGERPRINT = ("checkpoint_steps", "max_failures", "cpus_per_worker", "resources", "report_to")


def _zip_ok(path: Path) -> bool:
    """``torch.save`` writes a zip archive whose central directory comes last: a truncated file is not a zip."""
    try:
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


def _safetensors_ok(path: Path) -> bool:
    """The header (8-byte length, then JSON) names every tensor's byte range: the file must hold them all."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def _checkpoint_complete(ckpt: Path, world: int) -> bool:
    """Whether ``ckpt`` (an HF Trainer ``checkpoint-N``) holds everything an exact resume on ``world`` ranks reads.

    transformers 5.x writes a checkpoint without a marker: rank 0 writes the weights, ``optimizer.pt``,
    ``scheduler.pt``, its RNG state and then ``trainer_state.json``; every other rank writes only its own
    ``rng_state_<rank>.pth``, with no barrier, possibly after rank 0 is done; and rank 0 then deletes old
    checkpoints with ``rmtree`` (a kill leaves one half-deleted). So ``trainer_state.json`` alone does not say
    "complete": it must parse and name step N, and every file must be there and whole.
    """
    m = _CHECKPOINT.match(ckpt.name)
    if not m or not ckpt.is_dir():
        return False
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != int(m.group(1)):
        return False
    rng = ["rng_state.pth"] if world <= 1 else [f"rng_state_{r}.pth" for r in range(world)]
    if (ckpt / _FSDP_MODEL).exists():  # under FSDP (full state dict) rank 0 writes the gathered weights and optimizer
        return all(_zip_ok(ckpt / name) for name in [_FSDP_MODEL, "optimizer.bin", "scheduler.pt", *rng])
    if not all(_zip_ok(ckpt / name) for name in ["optimizer.pt", "scheduler.pt", *rng]):
        return False
    index = ckpt / "model.safetensors.index.json"
    if index.exists():  # a model too big for one file: every shard the index names
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return bool(shards) and all(_safetensors_ok(ckpt / shard) for shard in shards)
    return _safetensors_ok(ckpt / "model.safetensors")


def _checkpoints(trainer_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory in ``trainer_dir``, oldest step first."""
    if not trainer_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in trainer_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def _latest_checkpoint(trainer_dir: Path, world: int) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    for _, path in reversed(_checkpoints(trainer_dir)):
        if _checkpoint_complete(path, world):
            return path
    return None


def _drop_incomplete_checkpoints(trainer_dir: Path, world: int) -> list[str]:
    """Delete the checkpoints a resume must not use (and the Trainer's mtime-based rotation must not keep)."""
    dropped = []
    for _, path in _checkpoints(trainer_dir):
        if not _checkpoint_complete(path, world):
            shutil.rmtree(path, ignore_errors=True)
            dropped.append(path.name)
    return dropped


def _model_files(path: str) -> list:
    """Name, size and mtime of each file of a model directory: a cheap identity (hashing 7B weights is not)."""
    p = Path(path).expanduser().resolve()
    return [str(p)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()]


def _fingerprint(rows: list[dict], policy_path: str, ref_path: str, cfg: DPOTrainConfig) -> dict:
    """What makes two ``train_dpo`` calls the same run: rows, result-changing settings, models, library versions."""

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    parts = {
        "rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "settings": {k: v for k, v in sorted(asdict(cfg).items()) if k not in _NOT_IN_FINGERPRINT},
        "policy": _model_files(policy_path),
        "ref": _model_files(ref_path),
        "versions": {pkg: ver(pkg) for pkg in ("torch", "transformers", "trl", "datasets")},
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, **parts}


def _open_run_dir(run_dir: Path, fingerprint: dict) -> bool:
    """Make ``run_dir`` this run's scratch directory; True when it already was (same fingerprint: resume)."""
    marker = run_dir / "fingerprint.json"
    if run_dir.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and old.get("fingerprint") == fingerprint["fingerprint"]:
            steps = [step for step, path in _checkpoints(run_dir / "trainer")]
            log.info("DPO scratch dir %s is from this run (same pairs and settings): resuming (checkpoints at steps %s)",
                     run_dir, steps or "none")
            return True
        changed = sorted(k for k in fingerprint if k != "fingerprint" and (old or {}).get(k) != fingerprint[k])
        log.warning("DPO scratch dir %s is from another run (%s differ): wiping it and starting fresh",
                    run_dir, ", ".join(changed) if old else "no readable fingerprint")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    tmp = run_dir / "fingerprint.json.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=2, default=str) + "\n")
    os.replace(tmp, marker)  # written last: a directory without it is wiped on the next call
    log.info("DPO scratch dir %s: starting fresh", run_dir)
    return False


def _loss_sum(history: list[dict], upto: int) -> tuple[float, int]:
    """Sum of the per-step training loss over the logged steps up to ``upto`` and how many steps that covers.

    The Trainer logs ``loss`` as the mean over the steps since the previous log, so each entry weighs by that span.
    """
    total, covered, last = 0.0, 0, 0
    for h in history:
        step = h.get("step")
        if "loss" in h and "train_loss" not in h and isinstance(step, int) and last < step <= upto:
            total += float(h["loss"]) * (step - last)
            covered += step - last
            last = step
    return total, covered


def reference_logps(model, dataset, pad_id: int, max_length: int | None, batch: int, rank: int = 0, world: int = 1) -> tuple[list[float], list[float]]:
    """Each row's summed log-prob of its chosen and of its rejected tokens under ``model`` (the frozen reference),
    over exactly the tokens TRL's collator trains on: ``prompt_ids + chosen_ids`` (and rejected) cut to
    ``max_length`` from the start, the completion's tokens scored. One teacher-forced pass per batch
    (:func:`caspo.models.hf.teacher_forced`, what the scorer uses). With ``world`` > 1 each rank scores rows
    ``rank, rank + world, ...`` and the ranks exchange them (every rank returns every row's values)."""
    mine = list(range(rank, len(dataset), world))
    values: dict[int, tuple[float, float]] = {}
    for s in range(0, len(mine), max(1, batch)):
        idx = mine[s : s + batch]
        seqs, spans = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for i in idx:
                row = dataset[i]
                seq = (list(row["prompt_ids"]) + list(row[key]))[:max_length]
                start = len(row["prompt_ids"])
                seqs.append(seq)
                spans.append((start, max(0, len(seq) - start)))
        scored = teacher_forced(model, seqs, spans, pad_id, entropies=False)
        for j, i in enumerate(idx):
            values[i] = (math.fsum(scored[j][1]), math.fsum(scored[len(idx) + j][1]))
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, values)
        values = {i: v for part in parts for i, v in part.items()}
    if sorted(values) != list(range(len(dataset))):
        raise RuntimeError(f"reference log-probs cover {len(values)} of {len(dataset)} rows")
    return [values[i][0] for i in range(len(dataset))], [values[i][1] for i in range(len(dataset))]


class _StepDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that keeps TRL's tokenisation but drops the ``<eos>`` TRL appends to each completion, adds
    the losses TRL lacks (``dpop_lambda`` > 0: DPO-Positive, ``caspo.core.losses.dpop_loss``), computes the
    reference log-probs itself (``reference``: the frozen reference model, default the policy before training)
    and shards with FSDP2 on CPU too (see :meth:`create_accelerator_and_postprocess`)."""

    def __init__(self, *args, dpop_lambda: float = 0.0, reference=None, **kwargs):
        self.dpop_lambda = dpop_lambda
        self._reference = reference
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self):
        """accelerate keeps an FSDP plugin only on accelerator devices: ``AcceleratorState.__init__``
        (accelerate/state.py) makes the distributed type FSDP only for MULTI_GPU and its kin, so under a gloo process
        group on CPUs (MULTI_CPU) it drops the plugin and the Trainer trains replicated with DDP. FSDP2
        (``fully_shard``) itself runs on CPU over a gloo device mesh, so here the state is made FSDP as it is on
        GPUs, and from then on the CPU run takes the GPU run's code path: accelerate's ``fsdp2_prepare_model``,
        its sharded optimizer step, and ``get_state_dict`` gathering the whole weights onto rank 0."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Where TRL would run its own precompute (inside ``__init__``, before the policy is wrapped): the
        reference log-probs become the dataset's ``ref_chosen_logps``/``ref_rejected_logps`` columns, computed by
        :func:`reference_logps` with the reference model on this process's device, so TRL computes nothing (its
        pass would score with the policy as it is before wrapping: under FSDP still float32 on the CPU)."""
        if self.ld_alpha is not None:
            raise ValueError("ld_alpha is not supported: the reference log-probs are plain sums")
        model = self._reference if self._reference is not None else self.model
        training = model.training
        model.eval()
        model.to(self.accelerator.device)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        chosen, rejected = reference_logps(model, dataset, self._tokenizer.pad_token_id, self.args.max_length, batch_size, rank, world)
        model.train(training)
        self._reference = None  # scored: the trainer keeps no reference
        dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names])
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        eos = self._tokenizer.eos_token_id

        def drop_eos(example):
            out = {}
            for key in ("chosen_ids", "rejected_ids"):
                ids = example[key]
                out[key] = ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids
            return out

        with global_then_local_main_first():  # main writes the cache file first, the others then read it
            return dataset.map(drop_eos, desc=f"Dropping appended EOS from {dataset_name} dataset")

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.dpop_lambda:
            return super()._compute_loss(model, inputs, return_outputs)
        # TRL's forward for the batch [chosen..., rejected...]: per-token log-probs of the completion tokens
        kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        mask = inputs["completion_mask"][..., 1:]
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        logps = (outputs.log_probs[:, -mask.size(1) :] * mask).sum(dim=1)
        chosen, rejected = logps.chunk(2, dim=0)
        chosen_ratio = chosen - inputs["ref_chosen_logps"]
        rejected_ratio = rejected - inputs["ref_rejected_logps"]
        loss = dpop_loss(chosen_ratio, rejected_ratio, self.beta, self.dpop_lambda).mean()
        for kind, weight in zip(self.loss_types, self.loss_weights):
            if kind == "sft":  # the NLL anchor, as TRL computes it
                chosen_mask, _ = mask.chunk(2, dim=0)
                chosen_token_logps, _ = outputs.log_probs[:, -mask.size(1) :].chunk(2, dim=0)
                loss = loss + weight * -chosen_token_logps[chosen_mask.bool()].mean()
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather
        rewards_c, rewards_r = (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(rewards_c).mean().item())
        metrics["rewards/rejected"].append(gather(rewards_r).mean().item())
        metrics["rewards/accuracies"].append(gather((rewards_c > rewards_r).float()).mean().item())
        metrics["rewards/margins"].append(gather(rewards_c - rewards_r).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        metrics["dpop/penalty"].append(gather(dpop_penalty(chosen_ratio.detach(), self.dpop_lambda)).mean().item())
        return (loss, outputs) if return_outputs else loss


class _NoFinalCheckpoint(TrainerCallback):
    """The Trainer also checkpoints after the last step; the model is written right after it, so skip that."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and state.global_step >= state.max_steps:
            control.should_save = False
        return control


LOSS_TYPES = ("sigmoid", "ipo", "dpop")


def _loss(cfg: DPOTrainConfig) -> dict:
    """The loss, as ``DPOConfig`` arguments and the trainer's own: the one place a loss is chosen.

    ``loss_type``: ``sigmoid`` (the paper's DPO), ``ipo`` (both TRL's), or ``dpop`` (sigmoid DPO with
    DPO-Positive's penalty, weight ``dpop_lambda``, computed by ``_StepDPOTrainer``); ``sft_weight`` > 0
    adds NLL on the chosen step (RPO), which also keeps the chosen step's likelihood from falling."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    losses, weights = ["sigmoid" if cfg.loss_type == "dpop" else cfg.loss_type], [1.0]
    if cfg.sft_weight > 0:
        losses.append("sft")
        weights.append(cfg.sft_weight)
    return {
        "args": {"loss_type": losses, "loss_weights": weights},
        "trainer": {"dpop_lambda": cfg.dpop_lambda if cfg.loss_type == "dpop" else 0.0},
    }


def _sharding(s: DPOTrainConfig) -> dict:
    """``TrainingArguments`` for FSDP (none under plain DDP). The trained policy is gathered whole for
    saving (``FULL_STATE_DICT``), so the published model is one ``from_pretrained`` directory."""
    if not s.fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {**s.fsdp_config, "state_dict_type": "FULL_STATE_DICT"}}


def _reporters(s: DPOTrainConfig, tb_dir: str | None) -> list[str] | str:
    """TrainingArguments.report_to: ``dpo.report_to``, tensorboard only where its files go (``tb_dir``,
    handed to transformers' TensorBoardCallback as $TENSORBOARD_LOGGING_DIR)."""
    names = [r for r in s.report_to if r != "tensorboard" or tb_dir]
    return names or "none"


def build_trainer(policy, ref, tokenizer, train_ds, s: DPOTrainConfig, output_dir: str, use_gpu: bool = False, progress: bool = False, tb_dir: str | None = None) -> _StepDPOTrainer:
    """TRL's trainer for one round, with the project's loss and checkpointing; Ray Train's workers and the
    loss tests build it the same way. ``tb_dir``: where TRL's curves go when ``dpo.report_to`` names
    tensorboard (the loop gives runs/NAME/tb/dpo/roundK)."""
    if tb_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir  # read by the callback transformers makes below
    bf16 = use_gpu and torch.cuda.is_bf16_supported()
    loss = _loss(s)
    args = DPOConfig(
        output_dir=output_dir,
        beta=s.beta,
        learning_rate=s.learning_rate,
        per_device_train_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        num_train_epochs=s.epochs,
        max_length=s.max_length,
        **loss["args"],
        precompute_ref_log_probs=s.precompute_ref_log_probs,
        gradient_checkpointing=s.gradient_checkpointing,
        report_to=_reporters(s, tb_dir),
        # full checkpoints (weights, optimizer, scheduler, trainer state, per-rank RNG) for an exact resume
        save_strategy="steps" if s.checkpoint_steps > 0 else "no",
        save_steps=max(s.checkpoint_steps, 1),
        save_total_limit=2,  # the newest may lack a rank's RNG file when that rank died: keep the one before
        save_only_model=False,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        use_cpu=not use_gpu,
        bf16=bf16,
        fp16=False,
        seed=s.seed,
        data_seed=s.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        # every parameter gets a gradient (tied embeddings included); searching for unused ones costs a pass
        ddp_find_unused_parameters=False,
        **_sharding(s),
    )
    # with precomputed reference log-probs the reference only scores, in _StepDPOTrainer._precompute_ref_logps;
    # TRL gets none (under FSDP TRL 1.16 then loads a copy of the policy as its own reference in __init__, unused
    # and freed at the end of __init__: DPOTrainer.__init__'s `ref_model is None` branch)
    if s.precompute_ref_log_probs:
        return _StepDPOTrainer(model=policy, ref_model=None, reference=ref, args=args, train_dataset=train_ds, processing_class=tokenizer, **loss["trainer"])
    return _StepDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=train_ds, processing_class=tokenizer, **loss["trainer"])


def save_policy(model, tok, state: dict, path: Path, dtype: torch.dtype) -> None:
    """Write a trained policy as one ``from_pretrained`` directory: ``state`` (the whole weights) in ``dtype``
    (bf16 after GPU training: what vLLM serves, half the bytes of the float32 master weights)."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if dtype != torch.float32:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(str(path), state_dict=state, safe_serialization=True)
    model.config.dtype = dtype  # save_pretrained wrote the in-memory (float32) parameters' dtype
    model.config.save_pretrained(str(path))
    tok.save_pretrained(str(path))


def _train_loop(config: dict) -> dict:
    """Ray Train worker loop (runs on every rank)."""
    s = DPOTrainConfig(**config["settings"])
    progress = config["progress"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(config["run_dir"])
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute bar reads it
        datasets.disable_progress_bars()

    def barrier():
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    use_gpu = s.use_gpu and torch.cuda.is_available()
    bf16 = use_gpu and torch.cuda.is_bf16_supported()
    # the policy's weights stay float32 (the optimizer's master copy) and bf16 is autocast compute: an AdamW
    # step at the paper's lr 5e-7 is far below bf16's resolution of a weight (~1e-4 at 0.02) and would be
    # rounded away in bf16 weights. The frozen reference only scores, so bf16 does for it.
    ref_dtype = torch.bfloat16 if bf16 else torch.float32

    tok = AutoTokenizer.from_pretrained(config["policy_path"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # DPOTrainer's requirement for its processing class
    policy = AutoModelForCausalLM.from_pretrained(config["policy_path"], dtype=torch.float32, use_safetensors=True)
    same = os.path.realpath(config["policy_path"]) == os.path.realpath(config["ref_path"])
    ref = None
    if not (same and s.precompute_ref_log_probs) or (s.fsdp and use_gpu):
        # with the same weights and precomputation the initial policy scores the reference log-probs itself, except
        # under FSDP on GPUs: the policy is float32 on the CPU until training shards it, so a bf16 copy on this
        # rank's GPU scores them (and is freed right after)
        ref = AutoModelForCausalLM.from_pretrained(config["ref_path"], dtype=ref_dtype, use_safetensors=True)

    data_dir = run_dir / "data"
    trainer_dir = run_dir / "trainer"
    if rank == 0:
        # a re-run with the same fingerprint (a Ray Train restart, or train_dpo called again) finds the copy already
        # there, with the cache files of TRL's maps beside it: reuse them. The copy is
        # renamed into place whole, so "state.json present" means complete.
        if not (data_dir / "state.json").exists():
            staging = run_dir / "data.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)
            datasets.Dataset.from_list(config["rows"]).save_to_disk(str(staging))
            os.replace(staging, data_dir)
        dropped = _drop_incomplete_checkpoints(trainer_dir, world)
        if dropped:
            log.warning("dropped incomplete DPO checkpoints %s (a rank died while writing or rotating them)", dropped)
    barrier()
    train_ds = datasets.load_from_disk(str(data_dir))
    resume = _latest_checkpoint(trainer_dir, world)  # every rank reads the same directory, nobody writes it now
    resumed_from = int(_CHECKPOINT.match(resume.name).group(1)) if resume else 0
    if rank == 0:
        log.info("DPO %s", f"resuming from {resume}" if resume else "starting at step 0")

    trainer = build_trainer(policy, ref, tok, train_ds, s, str(trainer_dir), use_gpu, progress, config.get("tb_dir"))
    ref = None  # with precomputation its log-probs are in the dataset now and the trainer holds no reference
    if s.fsdp and not trainer.is_fsdp_enabled:  # never train replicated under the name FSDP
        raise RuntimeError(f"dpo.fsdp is set but accelerate did not shard (distributed type {trainer.accelerator.distributed_type})")
    trainer = prepare_trainer(trainer)  # Ray's hook for Ray Data iterables; a no-op for a datasets.Dataset
    trainer.add_callback(_NoFinalCheckpoint())
    n_train = len(trainer.train_dataset)

    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    history = [dict(h) for h in trainer.state.log_history]  # restored from the checkpoint, then continued
    steps = [h for h in history if "loss" in h and "rewards/margins" in h]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    runtime = float(out.metrics.get("train_runtime", float("nan")))  # this attempt's training loop only
    samples = int(round(n_train * s.epochs))
    total_steps = int(trainer.state.global_step)
    run_steps = total_steps - resumed_from  # the steps this attempt trained
    # the Trainer's training_loss and samples/s cover only the steps of this train() call: extend the loss to the
    # whole run with the logged losses up to the checkpoint, and count the samples of this call's steps only
    pre_sum, pre_steps = _loss_sum(history, resumed_from)
    train_loss = (pre_sum + float(out.training_loss) * run_steps) / max(pre_steps + run_steps, 1)
    run_samples = samples * run_steps / max(total_steps, 1)
    summary = {
        "train_loss": train_loss,
        "steps": total_steps,
        "resumed_from_step": resumed_from,
        "samples": samples,
        "samples_per_s": run_samples / runtime if runtime > 0 and run_steps > 0 else float("nan"),
        "reward_margin_start": float(first.get("rewards/margins", float("nan"))),
        "reward_margin_end": float(last.get("rewards/margins", float("nan"))),
        "loss_start": float(first.get("loss", float("nan"))),
        "loss_end": float(last.get("loss", float("nan"))),
        "reward_accuracy_end": float(last.get("rewards/accuracies", float("nan"))),
        "train_runtime": runtime,
        "workers": int(world),
        # under FSDP every parameter is a DTensor shard (what the FSDP tests read)
        "sharded": bool(trainer.is_fsdp_enabled) and all(isinstance(p, DTensor) for p in trainer.model.parameters()),
    }

    staging = run_dir / "model"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a rank 0 killed while writing it
    barrier()
    state = trainer.accelerator.get_state_dict(trainer.model)  # every rank: under FSDP the shards gather on rank 0
    if rank == 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        dtype = torch.bfloat16 if bf16 else torch.float32
        if config.get("source") is not None:  # the publisher gets the weights from memory, before the disk has them
            ray.get(config["source"].hold.remote(config["out_dir"], {k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state.items()}))
        save_policy(model, tok, state, staging, dtype)
        os.replace(staging, config["out_dir"])  # one rename: readers see no model or the whole model
    barrier()
    ray.train.report(summary)
    return {**summary, "history": history}


def _worker_env() -> dict:
    """RunConfig arguments that turn off Ray Train V2's ``print`` patch in the workers (unless the user set it).

    The patch sends ``print`` to Ray's logger, which defeats ``dill``'s stdout capture while ``datasets`` hashes
    the map functions for its fingerprints: every TRL map would dump the bytecode of its functions to the log.
    """
    if not is_v2_enabled():
        return {}
    var = "RAY_TRAIN_ENABLE_PRINT_PATCH"
    return {"worker_runtime_env": {"env_vars": {var: os.environ.get(var, "0")}}}


def train_dpo(
    pairs: Sequence[Pair],
    policy_path: str,
    ref_path: str,
    out_dir: str,
    cfg: DPOTrainConfig,
    progress: bool = True,
    source=None,
    tb_dir: str | None = None,
) -> dict:
    """Train ``policy_path`` with DPO against ``ref_path`` on ``pairs``; write the result to ``out_dir``.

    ``pairs``: :class:`caspo.core.pairs.Pair` (chosen and rejected are one reasoning step each; the delimiter is
    appended here; the case and lineage do not change training). ``out_dir`` must not exist or be empty; it ends up with
    ``model.safetensors``, ``config.json`` and ``tokenizer.json``, loadable by ``from_pretrained``. It is a local
    path on one machine; on a multi-node Ray cluster it must be on storage shared by all nodes (see the module
    docstring), as the run's scratch directory is created beside it.

    Uses the running Ray (``ray.init`` by the caller), or starts a local one. Returns ``train_loss``, ``steps``,
    ``samples`` (pairs trained on × epochs), ``samples_per_s`` (over the training loop, without model loading and
    reference precomputation), ``loss_start``/``loss_end`` and ``reward_margin_start``/``reward_margin_end`` (TRL's
    ``loss`` and ``rewards/margins`` at the first and last logged steps, averaged over workers), ``workers``,
    ``seconds`` (wall time of this call) and ``history`` (TRL's log history).

    ``source``: a :class:`caspo.mesh.publisher.PolicySource` handle; rank 0 hands it the trained weights
    (in the checkpoint's dtype) before writing the checkpoint, so a publish over the transport reads no file.

    Resume: a call that finds the scratch directory of an earlier call with the same fingerprint (same rows, models
    and result-changing settings; it died or raised) continues from its newest complete checkpoint, as does Ray
    Train after a worker died. ``resumed_from_step`` says where the last attempt began (0: from scratch). ``steps``,
    ``train_loss`` and the ``*_start`` metrics cover the whole run, resumed or not; ``samples_per_s`` and
    ``train_runtime`` cover the last attempt's steps only.
    """
    rows = _rows(pairs, cfg.delimiter)
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.fsdp and cfg.num_workers < 2 and not cfg.use_gpu:
        raise ValueError("fsdp on CPU needs num_workers >= 2 (one CPU process has nothing to shard over)")
    if cfg.checkpoint_steps < 0 or cfg.max_failures < -1:
        raise ValueError("checkpoint_steps must be >= 0 and max_failures >= -1 (-1: restart without limit)")
    for name, p in (("policy", policy_path), ("reference", ref_path)):
        if not (Path(p) / "config.json").exists():
            raise ValueError(f"no {name} model at {p}: config.json is missing")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; DPO writes a fresh model directory")

    t0 = time.time()
    if not ray.is_initialized():
        log.info("no Ray running: starting a local one for DPO")
        ray.init(include_dashboard=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = scratch_dir(out)  # deterministic: a re-run after a crash finds it
    _open_run_dir(run_dir, _fingerprint(rows, policy_path, ref_path, cfg))
    # Ray Train V2 restores its own run state from storage_path/name when it exists; this run keeps its state in
    # the HF checkpoints, so Ray's starts empty every call
    shutil.rmtree(run_dir / "ray", ignore_errors=True)
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "rows": rows,
                "policy_path": str(Path(policy_path).expanduser().resolve()),
                "ref_path": str(Path(ref_path).expanduser().resolve()),
                "out_dir": str(out),
                "run_dir": str(run_dir),
                "settings": asdict(cfg),
                "progress": progress,
                "source": source,
                "tb_dir": str(Path(tb_dir).expanduser().resolve()) if tb_dir else None,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker=dpo_worker_resources(cfg),
            ),
            run_config=RunConfig(
                name="dpo",
                storage_path=str(run_dir / "ray"),
                # a dead worker process fails the worker group; Ray Train then starts a new one, whose loop resumes
                # from the newest complete checkpoint in run_dir/trainer
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                **_worker_env(),
            ),
        )
        result = trainer.fit()
        summary = getattr(result, "return_value", None) or dict(result.metrics or {})
        if not summary or "train_loss" not in summary:
            raise RuntimeError(f"DPO run returned no metrics (result: {result})")
    except BaseException:
        log.warning("DPO into %s failed: %s is kept, a re-run with the same pairs and settings resumes from it",
                    out, run_dir)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = dict(summary)
    if summary.get("resumed_from_step"):
        log.info("DPO into %s resumed from step %d of %d", out, summary["resumed_from_step"], summary["steps"])
    summary["seconds"] = time.time() - t0
    for k in ("loss_start", "loss_end", "reward_margin_start", "reward_margin_end"):
        if not math.isfinite(summary.get(k, float("nan"))):
            log.warning("DPO metric %s is missing from TRL's log history", k)
    return summary
