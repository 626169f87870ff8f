"""One round of step-wise DPO (DESIGN §4): TRL's ``DPOTrainer`` run data-parallel by Ray Train.

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
* the loop's return value on rank 0 (``Result.return_value``, Ray Train V2) carries the metrics back; each rank
  also calls ``ray.train.report`` once with the summary so Ray's own callbacks see it (and so V1's
  ``Result.metrics`` carries it when ``RAY_TRAIN_V2_ENABLED=0``).

Two things are done by hand because TRL 1.16 does them differently from what step-wise DPO needs:

* TRL appends ``eos_token`` to every plain-text completion. A step is not the end of a solution: the model
  must learn to end the *step* with the delimiter, not the document with ``<eos>``, so :class:`_StepDPOTrainer`
  drops that appended token after TRL's own tokenisation. Chosen and rejected are then scored over exactly the
  tokens ``HFBackend.score_steps`` scores (step text plus delimiter).
* TRL caches the precomputed reference log-probs in a file named next to the dataset's cache files and lets only
  the main process write it; the others read it back. A dataset built in memory has no cache files, so every
  process would pick its own random temporary file and the non-main ranks would fail to read. Rank 0 therefore
  saves the rows with ``save_to_disk`` into the run's scratch directory and every rank loads that copy.

Files: the scratch directory (``RunConfig.storage_path``, the dataset copy, ``DPOConfig.output_dir``) is created
next to ``out_dir`` and removed afterwards; the trained policy is written by rank 0 only, first into the scratch
directory and then renamed to ``out_dir``, so a reader never sees a half-written model. On one machine any local
path works; on a multi-node Ray cluster ``out_dir`` must be on a filesystem every node can read and write (NFS,
a mounted bucket), because the workers read the dataset copy beside it and rank 0 (on whichever node) writes it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class DPOSettings:
    """Hyper-parameters of one DPO round.

    ``learning_rate`` defaults to 5e-5, tuned for the tiny reasoner; the paper uses 5e-7 for its 7B models (with
    a global batch of 64 and max length 2048). ``per_device_batch_size`` is per Ray worker: the global batch is
    ``per_device_batch_size * gradient_accumulation_steps * num_workers``. ``precompute_ref_log_probs``: the
    reference is frozen, so its log-probs are computed once up front and the model is not held during training.
    """

    beta: float = 0.1
    learning_rate: float = 5e-5  # tiny model; paper (7B): 5e-7
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 1
    max_length: int = 256  # prompt + completion tokens; longer rows are truncated, prompt-only-too-long dropped
    loss_type: str = "sigmoid"
    sft_weight: float = 0.0  # weight of an added NLL term on the chosen completion (0: plain DPO)
    precompute_ref_log_probs: bool = True
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    logging_steps: int = 1
    delimiter: str = "\n"  # the step delimiter appended to each completion (DESIGN §4)
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per worker (a laptop mesh already holds some)
    resources: dict | None = None  # extra custom Ray resources per worker (pins workers to a trainer group)
    gradient_checkpointing: bool = False  # TRL turns it on by default; worth it for 7B, a slowdown for tiny


def _rows(pairs: list[dict], delimiter: str) -> list[dict]:
    if not pairs:
        raise ValueError("train_dpo needs at least one preference pair; got an empty list")
    rows = []
    for i, p in enumerate(pairs):
        missing = [k for k in _PAIR_KEYS if k not in p]
        if missing:
            raise ValueError(f"pair {i} lacks {', '.join(missing)} (a pair needs prompt, chosen and rejected)")
        bad = [k for k in _PAIR_KEYS if not isinstance(p[k], str)]
        if bad:
            raise ValueError(f"pair {i}: {', '.join(bad)} must be strings")
        chosen, rejected = p["chosen"].strip(), p["rejected"].strip()
        if not chosen or not rejected:
            raise ValueError(f"pair {i}: chosen and rejected must be non-empty steps")
        # the completion is the step plus its delimiter: the model learns to end the step there
        rows.append({"prompt": p["prompt"], "chosen": chosen + delimiter, "rejected": rejected + delimiter})
    return rows


def _step_trainer_class():
    """``DPOTrainer`` that keeps TRL's tokenisation but drops the ``<eos>`` TRL appends to each completion."""
    from trl import DPOTrainer

    class _StepDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            eos = self._tokenizer.eos_token_id

            def drop_eos(example):
                out = {}
                for key in ("chosen_ids", "rejected_ids"):
                    ids = example[key]
                    out[key] = ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids
                return out

            from trl.trainer.utils import global_then_local_main_first

            with global_then_local_main_first():  # main writes the cache file first, the others then read it
                return dataset.map(drop_eos, desc=f"Dropping appended EOS from {dataset_name} dataset")

    return _StepDPOTrainer


def _train_loop(config: dict) -> dict:
    """Ray Train worker loop (runs on every rank)."""
    import datasets
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    s = DPOSettings(**config["settings"])
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
    dtype = torch.bfloat16 if bf16 else torch.float32

    tok = AutoTokenizer.from_pretrained(config["policy_path"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # DPOTrainer's requirement for its processing class
    policy = AutoModelForCausalLM.from_pretrained(config["policy_path"], dtype=dtype, use_safetensors=True)
    same = os.path.realpath(config["policy_path"]) == os.path.realpath(config["ref_path"])
    ref = None
    if not (same and s.precompute_ref_log_probs):
        # with the same weights and precomputation, TRL scores the reference with the initial policy itself
        ref = AutoModelForCausalLM.from_pretrained(config["ref_path"], dtype=dtype, use_safetensors=True)

    data_dir = run_dir / "data"
    if rank == 0:
        datasets.Dataset.from_list(config["rows"]).save_to_disk(str(data_dir))
    barrier()
    train_ds = datasets.load_from_disk(str(data_dir))

    args = DPOConfig(
        output_dir=str(run_dir / "trainer"),
        beta=s.beta,
        learning_rate=s.learning_rate,
        per_device_train_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        num_train_epochs=s.epochs,
        max_length=s.max_length,
        # sft_weight > 0 adds NLL on the chosen step (RPO): keeps DPO from lowering the chosen likelihood too
        loss_type=[s.loss_type] + (["sft"] if s.sft_weight > 0 else []),
        loss_weights=[1.0] + ([s.sft_weight] if s.sft_weight > 0 else []),
        precompute_ref_log_probs=s.precompute_ref_log_probs,
        gradient_checkpointing=s.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
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
    )
    trainer = _step_trainer_class()(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=train_ds,
        processing_class=tok,
    )
    if s.precompute_ref_log_probs and trainer.ref_model is not None:
        trainer.ref_model = None  # its log-probs are in the dataset now; free it before training
        ref = None
    trainer = prepare_trainer(trainer)  # Ray's hook for Ray Data iterables; a no-op for a datasets.Dataset
    n_train = len(trainer.train_dataset)

    out = trainer.train()
    history = [dict(h) for h in trainer.state.log_history]
    steps = [h for h in history if "loss" in h and "rewards/margins" in h]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    runtime = float(out.metrics.get("train_runtime", float("nan")))
    samples = int(round(n_train * s.epochs))
    summary = {
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "samples": samples,
        "samples_per_s": samples / runtime if runtime > 0 else float("nan"),
        "reward_margin_start": float(first.get("rewards/margins", float("nan"))),
        "reward_margin_end": float(last.get("rewards/margins", float("nan"))),
        "loss_start": float(first.get("loss", float("nan"))),
        "loss_end": float(last.get("loss", float("nan"))),
        "reward_accuracy_end": float(last.get("rewards/accuracies", float("nan"))),
        "train_runtime": runtime,
        "workers": int(world),
    }

    if rank == 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.eval()
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        staging = run_dir / "model"
        model.save_pretrained(str(staging), safe_serialization=True)
        tok.save_pretrained(str(staging))
        os.replace(staging, config["out_dir"])  # one rename: readers see no model or the whole model
    barrier()
    ray.train.report(summary)
    return {**summary, "history": history}


def _worker_env() -> dict:
    """RunConfig arguments that turn off Ray Train V2's ``print`` patch in the workers (unless the user set it).

    The patch sends ``print`` to Ray's logger, which defeats ``dill``'s stdout capture while ``datasets`` hashes
    the map functions for its fingerprints: every TRL map would dump the bytecode of its functions to the log.
    """
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        return {}
    var = "RAY_TRAIN_ENABLE_PRINT_PATCH"
    return {"worker_runtime_env": {"env_vars": {var: os.environ.get(var, "0")}}}


def train_dpo(
    pairs: list[dict],
    policy_path: str,
    ref_path: str,
    out_dir: str,
    settings: DPOSettings,
    progress: bool = True,
) -> dict:
    """Train ``policy_path`` with DPO against ``ref_path`` on ``pairs``; write the result to ``out_dir``.

    ``pairs``: dicts with at least string ``prompt``, ``chosen`` and ``rejected`` (one reasoning step each; the
    delimiter is appended here; other keys are ignored). ``out_dir`` must not exist or be empty; it ends up with
    ``model.safetensors``, ``config.json`` and ``tokenizer.json``, loadable by ``from_pretrained``. It is a local
    path on one machine; on a multi-node Ray cluster it must be on storage shared by all nodes (see the module
    docstring), as the run's scratch directory is created beside it.

    Uses the running Ray (``ray.init`` by the caller), or starts a local one. Returns ``train_loss``, ``steps``,
    ``samples`` (pairs trained on × epochs), ``samples_per_s`` (over the training loop, without model loading and
    reference precomputation), ``loss_start``/``loss_end`` and ``reward_margin_start``/``reward_margin_end`` (TRL's
    ``loss`` and ``rewards/margins`` at the first and last logged steps, averaged over workers), ``workers``,
    ``seconds`` (wall time of this call) and ``history`` (TRL's log history).
    """
    rows = _rows(pairs, settings.delimiter)
    if settings.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {settings.num_workers}")
    for name, p in (("policy", policy_path), ("reference", ref_path)):
        if not (Path(p) / "config.json").exists():
            raise ValueError(f"no {name} model at {p}: config.json is missing")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; DPO writes a fresh model directory")

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    if not ray.is_initialized():
        log.info("no Ray running: starting a local one for DPO")
        ray.init(include_dashboard=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.dpo-", dir=out.parent))
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "rows": rows,
                "policy_path": str(Path(policy_path).expanduser().resolve()),
                "ref_path": str(Path(ref_path).expanduser().resolve()),
                "out_dir": str(out),
                "run_dir": str(run_dir),
                "settings": asdict(settings),
                "progress": progress,
            },
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers,
                use_gpu=settings.use_gpu,
                resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {}), **(settings.resources or {})},
            ),
            run_config=RunConfig(name="dpo", storage_path=str(run_dir / "ray"), **_worker_env()),
        )
        result = trainer.fit()
        summary = getattr(result, "return_value", None) or dict(result.metrics or {})
        if not summary or "train_loss" not in summary:
            raise RuntimeError(f"DPO run returned no metrics (result: {result})")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    summary = dict(summary)
    summary["seconds"] = time.time() - t0
    for k in ("loss_start", "loss_end", "reward_margin_start", "reward_margin_end"):
        if not math.isfinite(summary.get(k, float("nan"))):
            log.warning("DPO metric %s is missing from TRL's log history", k)
    return summary
