"""One typed configuration for the mesh, loaded from YAML with command-line overrides.

    cfg = load_config("configs/tiny-cpu.yaml", ["generator.replicas=2", "pairs.tau_quantile=0.3"])

Every key has a default here; a YAML file sets any subset; ``--set section.key=value`` overrides
(values parsed as YAML scalars). Unknown sections or keys are errors that name them. Every limit a
service enforces is a key here. A loaded config is frozen: code that needs a variant of a section
(the pairs temperature of a round, say) makes one with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from caspo.core.gate import DEFAULT_GATE_METRICS, check_gate
from caspo.core.search import SearchConfig


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MeshConfig:
    run_dir: str = "runs/mesh"  # state file, Redis data, logs
    namespace: str = "caspo"  # Ray namespace of the mesh's named actors
    host: str = "127.0.0.1"  # where gRPC servers bind
    redis_url: str | None = None  # external Redis; None: start a local redis-server (or $CASPO_REDIS_URL)
    num_cpus: int | None = None  # local Ray's CPUs (None: all)
    # custom Ray resources each service's actors ask for, so a cluster can pin them to worker groups,
    # e.g. {generator: {generator: 1}} with a worker group started with resources {"generator": N}
    placement: dict = field(default_factory=dict)
    # the port where the head's Ray exports Prometheus metrics (Ray's, Serve's and caspo's own); null: Ray picks
    metrics_export_port: int | None = None
    # GPUs each model actor asks Ray for, by service (generator: per replica; scorer; critic), overriding what
    # model.device implies (caspo.config.model_gpus): e.g. {scorer: 0.5, critic: 0.5} packs two HF models on
    # one GPU. Ray reserves them and sets the actor's CUDA_VISIBLE_DEVICES to exactly those.
    gpus: dict = field(default_factory=dict)


# the zero-shot CoT prompt of the Qwen-Math evaluation suite, which the paper's evaluation follows
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_FORMATS = ("plain", "chat")


def model_defaults(policy: str, prompt_format: str | None = None, step_delimiter: str | None = None) -> tuple[str, str]:
    """``(prompt_format, step_delimiter)`` for a policy, the given ones kept: the built-in ``tiny`` writes
    one step a line after a plain prompt; every other model (real chat models, ``tiny-chat``) gets its chat
    template and blank-line steps."""
    plain = policy == "tiny"
    return (prompt_format or ("plain" if plain else "chat"), step_delimiter or ("\n" if plain else "\n\n"))


@dataclass(frozen=True)
class ModelConfig:
    policy: str = "tiny"  # "tiny", a directory, or a hub id
    backend: str = "hf"  # hf | vllm
    max_step_tokens: int = 32  # a step longer than this ends the output
    max_batch_rows: int = 256  # rows per forward pass
    # how a question becomes model input: plain (the task's own prompt, e.g. "Q: ...") or chat (the
    # tokenizer's apply_chat_template with system_prompt and the question); null: plain for the
    # built-in "tiny", chat for any other model
    prompt_format: str | None = None
    # what separates reasoning steps (the one source of truth: sampling stops there, prompts join steps
    # with it, the scorer and DPO append it); null: "\n" for "tiny", "\n\n" for any other model
    step_delimiter: str | None = None
    system_prompt: str = SYSTEM_PROMPT  # the chat format's system message (the Qwen-Math evaluation prompt)
    tensor_parallel_size: int = 1  # vllm backend: GPUs one replica's model is split over
    # where every model of the mesh runs (generator replicas, the scorer, an llm/judge critic): cpu, or cuda,
    # in which case each such actor asks Ray for its GPUs (model_gpus: tensor_parallel_size on vllm, 1 on hf)
    # and sees only those; nothing probes CUDA to decide it
    device: str = "cpu"
    # the model's context length in tokens (prompt + step); null: read from its config.json
    # (max_position_embeddings, ...); passed to vLLM as max_model_len, and every item is checked against it
    max_model_len: int | None = None


@dataclass(frozen=True)
class GeneratorConfig:
    replicas: int = 1
    max_k: int = 16  # samples per prompt a request may ask for
    max_prompts: int = 512  # prompts per request
    max_prompt_chars: int = 8192
    max_steps: int = 16  # rollout steps a request may ask for
    max_temperature: float = 2.0  # sampling temperature a request may ask for
    max_path_chars: int = 4096  # checkpoint path of a Reload
    batch_wait_ms: float = 5.0  # how long a replica waits to merge concurrent requests


ENTROPY_MODES = ("exact", "topk")


@dataclass(frozen=True)
class ScorerConfig:
    # how the scorer computes eq. 2's token entropies: exact (the HF backend's full-vocabulary entropy, whatever
    # model.backend is: on the scorer's own GPU for real models) or topk (model.backend; on vLLM an estimate from
    # the top-20 log-probs with the tail spread uniformly, biased: docs/real-models.md gives the measured bias)
    entropy: str = "exact"
    max_items: int = 1024
    max_prompt_chars: int = 8192
    max_step_chars: int = 2048
    max_path_chars: int = 4096  # checkpoint path of a Reload


@dataclass(frozen=True)
class CriticConfig:
    kind: str = "exact"  # exact: the task's verifier; llm: a model writes the reference step; judge: a model verifies
    model: str | None = None  # for kind llm and judge
    threshold: float = 0.5  # kind judge: a step is correct when the judge's P(yes) is at least this
    max_items: int = 1024


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arith"
    data: str | None = None  # JSONL for file-backed tasks (math: also Parquet or a save_to_disk directory)
    # task math: the record fields, a DatasetDict's split (null: all, train/test kept), and how long one
    # math-verify comparison of final answers may take
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str = "solution"
    split: str | None = None
    answer_timeout_s: float = 5.0


@dataclass(frozen=True)
class PairsConfig:
    candidates: int = 4  # sampled steps per sub-question: the policy's step and its competitors
    temperature: float = 0.7
    tau: float | None = None  # fixed τ_train (eq. 2 scale: -mean entropy); None: use the quantile
    tau_quantile: float = 0.5  # τ_train = this quantile of the round's step confidences
    max_steps: int = 12
    batch: int = 32  # questions per gRPC batch
    seed: int = 0


@dataclass(frozen=True)
class PairStoreConfig:
    max_prompt_chars: int = 16384
    max_step_chars: int = 4096  # chosen and rejected
    max_name_chars: int = 256  # question_id, critic, consumer group, consumer
    max_put_pairs: int = 10000  # pairs one Put may carry
    max_read_count: int = 10000  # pairs one Read may return
    max_block_ms: int = 60000  # longest a Read may wait for new pairs


@dataclass(frozen=True)
class DPOTrainConfig:
    """One round of DPO (caspo/trainer/dpo.py); the ``dpo`` section of the config is this dataclass.

    ``per_device_batch_size`` is per Ray Train worker: the global batch is ``per_device_batch_size *
    gradient_accumulation_steps * num_workers``. ``precompute_ref_log_probs``: the reference is frozen,
    so its log-probs are computed once up front and the model is not held during training.
    """

    beta: float = 0.1  # DPO temperature (paper: 0.1)
    loss_type: str = "sigmoid"  # sigmoid (the paper's DPO) | ipo | dpop (DPO-Positive); see _loss in caspo/trainer/dpo.py
    dpop_lambda: float = 50.0  # weight of DPO-Positive's penalty on the chosen log-prob falling (loss_type dpop)
    sft_weight: float = 0.0  # NLL on the chosen step added to the DPO loss (0: plain DPO as in the paper)
    learning_rate: float = 2e-6  # tiny model (larger rates shift its digits, see docs/training.md); paper (7B): 5e-7
    per_device_batch_size: int = 8  # per Ray Train worker
    gradient_accumulation_steps: int = 1
    epochs: float = 2
    max_length: int = 256  # prompt + completion tokens; longer rows are truncated, prompt-only-too-long dropped
    precompute_ref_log_probs: bool = True
    gradient_checkpointing: bool = False  # TRL turns it on by default; worth it for 7B, a slowdown for tiny
    logging_steps: int = 1
    seed: int = 0  # the loop trains round k with seed k
    # the step delimiter appended to each completion: not a key of the dpo section; set from
    # model.step_delimiter when the config is built
    delimiter: str = "\n"
    num_workers: int = 2  # data-parallel Ray Train workers
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per worker
    use_gpu: bool = False
    resources: dict = field(default_factory=dict)  # extra custom Ray resources per worker (a trainer group)
    # shard weights, gradients and AdamW moments over the workers (FSDP2 through HF Trainer/accelerate,
    # each decoder layer a unit) instead of replicating them (DDP): what a 7B policy needs (~16 bytes a
    # parameter). fsdp_config: TrainingArguments.fsdp_config (cpu_offload, activation_checkpointing, ...)
    fsdp: bool = False
    fsdp_config: dict = field(default_factory=dict)
    checkpoint_steps: int = 20  # optimizer steps between resumable checkpoints in the scratch dir (0: none)
    max_failures: int = 3  # Ray Train restarts of the worker group after a worker dies (resumes from a checkpoint)
    # TRL's logging integrations: tensorboard writes the curves under runs/NAME/tb/dpo/roundK when the loop
    # trains; wandb and mlflow may be named when installed (not dependencies of caspo)
    report_to: list = field(default_factory=lambda: ["tensorboard"])


@dataclass(frozen=True)
class LoopConfig:
    run: str = "caspo"  # runs/NAME holds rounds.jsonl, policies/vK, state
    runs_dir: str = "runs"
    rounds: int = 3
    questions: int = 200  # fresh questions per round (seeded by round)
    # step: CASPO's three-case rule; trajectory: most likely correct vs most likely wrong full solution
    # (the control); crew: CRew-DPO, the same with each solution scored by its confidence in its answer
    pairs: str = "step"
    temperatures: list = field(default_factory=lambda: [0.7, 0.7, 0.7, 1.0, 1.0, 1.2])  # per round; last repeats
    eval_n: int = 1000  # fixed held-out problems evaluated after every round (95% interval of accuracy about ±0.03)
    eval_seed: int = 12345
    cat_k: int = 4
    cat_tau: float = 0.5
    eval_batch: int = 64
    # after each round's DPO, measure on the driver what it did (chosen/rejected log-prob change, weight
    # change, KL on held-out gold solutions; caspo.trainer.shift): cheap for the tiny model, two model
    # loads on the driver for a real one
    drift: bool = False


@dataclass(frozen=True)
class PublishConfig:
    # collective: a new policy goes from the trainer's memory to every replica over a tensor transport
    # (gloo on CPU, NCCL on GPU; caspo/mesh/publisher.py); disk: every replica reads the checkpoint
    transport: str = "collective"
    bucket_mb: float = 256.0  # the broadcast's unit: one bucket more than the weights in memory per side
    timeout_s: float = 120.0  # a broadcast a subscriber drops out of fails after this; it then goes by the file


@dataclass(frozen=True)
class ServeConfig:
    app_name: str = "caspo"  # the Serve application (gRPC clients may send it as "application" metadata)
    host: str = "127.0.0.1"  # HTTP bind address (0.0.0.0 in a cluster)
    http_port: int = 8000
    grpc_port: int = 9000
    policy_file: str | None = "runs/caspo/policy.json"  # written by `caspo loop`; replicas hot-reload from it
    watch_interval_s: float = 2.0  # how often replicas look at policy_file
    min_replicas: int = 1  # autoscaling bounds of the CaT deployment
    max_replicas: int = 1
    target_ongoing_requests: float = 8  # autoscaling target per replica
    max_ongoing_requests: int = 32  # per replica; more wait in the proxy
    num_cpus: float = 0.5  # per replica
    num_gpus: float | None = None  # per replica; null: what model.device asks for (model_gpus), 0 on cpu
    request_timeout_s: float = 120.0  # end-to-end limit of a request (HTTP and gRPC); the search is cancelled
    batch_wait_ms: float = 5.0  # a replica merges concurrent requests' branch proposals for this long
    # request defaults and limits
    method: str = "cat"
    k: int = 4
    tau: float = 0.5
    max_steps: int = 12
    temperature: float = 0.7
    scoring: str = "entropy"
    max_question_chars: int = 2000
    max_k: int = 32
    max_max_steps: int = 32
    max_temperature: float = 2.0
    # the promotion gate between the loop and Serve (caspo.core.gate.py): always | not_worse | better,
    # judged by the paired 95% intervals of these metrics, the round's evaluation against the serving policy's
    promotion: str = "not_worse"
    promotion_metrics: list = field(default_factory=lambda: list(DEFAULT_GATE_METRICS))


@dataclass(frozen=True)
class CatConfig:
    """The project's recommended CaT (issue 16): what ``caspo eval --method cat`` with no other search flags,
    ``caspo bench`` and Serve's ``cat`` requests run. A calibration file (``caspo calibrate``) replaces
    ``tau`` and ``branch_threshold`` (and ``uncertainty``) when the branching is adaptive and the request
    does not set them. ``branching: always`` with ``width``/``prune_scoring`` unset is Algorithm 2."""

    k: int = 4  # candidates at a branch point (the probe + k-1 samples); Algorithm 2: samples per branch
    tau: float = 0.0  # prune a branch whose cumulative confidence (under prune_scoring) falls below this
    max_steps: int = 12
    temperature: float = 0.7
    scoring: str = "logprob"  # ranks siblings and picks the answer (sibling-discriminative; never critic)
    prune_scoring: str | None = "entropy"  # the paper's cumulative confidence for τ (null: scoring)
    branching: str = "adaptive"  # adaptive | always (Algorithm 2)
    branch_threshold: float = 0.5  # nats; expand where the greedy step's uncertainty is above this
    uncertainty: str = "max_entropy"  # first_entropy | mean_entropy | max_entropy
    width: int | None = 1  # live branches kept after each step (null: k, as Algorithm 2)
    window: int = 16  # tokens per window of the group scoring
    calibration: str | None = None  # calibration.json; null: the one next to the policy, when there is one

    def search_config(self, calibration=None, seed: int | None = None, **given) -> SearchConfig:
        """The SearchConfig of a ``cat`` request: fields in ``given`` (not None) win, then the calibration's
        τ / threshold / uncertainty (adaptive only; a ``caspo.models.calibration_file.Calibration``), then
        this section. With ``branching`` always, width and
        prune_scoring not given are unset (Algorithm 2 exactly). ValueError names a bad field."""
        given = {k: v for k, v in given.items() if v is not None}
        fields = {f: getattr(self, f) for f in ("k", "tau", "max_steps", "temperature", "scoring", "prune_scoring", "branching", "branch_threshold", "uncertainty", "width", "window")}
        branching = given.get("branching", self.branching)
        if branching == "always":
            fields["width"] = fields["prune_scoring"] = None
        elif calibration is not None:
            fields.update(tau=calibration.tau, branch_threshold=calibration.branch_threshold, uncertainty=calibration.uncertainty)
        fields.update(given)
        return SearchConfig(method="cat", seed=seed, **fields)


@dataclass(frozen=True)
class Config:
    mesh: MeshConfig = field(default_factory=MeshConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    pair_store: PairStoreConfig = field(default_factory=PairStoreConfig)
    dpo: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    cat: CatConfig = field(default_factory=CatConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(section: str, key: str, value: Any, typ: Any) -> Any:
    t = str(typ)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{section}.{key} may not be null")
    try:
        if t.startswith("int") and not isinstance(value, bool):
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ValueError
        if t.startswith("str"):
            return str(value)
        if (t.startswith("dict") and not isinstance(value, dict)) or (t.startswith("list") and not isinstance(value, list)):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key} must be {t.split(' ')[0]}, got {value!r}") from None
    return value


# the section classes, by section name
_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _apply(values: dict[str, dict], section: str, given: dict, origin: str) -> None:
    """Check and coerce ``given`` (keys of one section) and merge it into ``values``."""
    if section not in _SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r} (sections: {', '.join(_SECTIONS)})")
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
    if not isinstance(given, dict):
        raise ConfigError(f"{origin}: section {section!r} must be a mapping")
    for key, value in given.items():
        if section == "dpo" and key == "delimiter":
            raise ConfigError(f"{origin}: dpo.delimiter is not a key: DPO uses model.step_delimiter")
        if key not in fields:
            raise ConfigError(f"{origin}: unknown key {section}.{key} (keys: {', '.join(fields)})")
        values.setdefault(section, {})[key] = _coerce(section, key, value, fields[key].type)


def _build(values: dict[str, dict]) -> Config:
    cfg = Config(**{name: cls(**values.get(name, {})) for name, cls in _SECTIONS.items()})
    fmt, delim = model_defaults(cfg.model.policy, cfg.model.prompt_format, cfg.model.step_delimiter)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, prompt_format=fmt, step_delimiter=delim),
        dpo=dataclasses.replace(cfg.dpo, delimiter=delim),
    )
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    values: dict[str, dict] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        for section, given in data.items():
            _apply(values, section, given or {}, str(p))
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(values, section, {key: yaml.safe_load(raw) if raw else None}, "--set")
    return _build(values)


def validate(cfg: Config) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    need(cfg.model.backend in ("hf", "vllm"), f"model.backend must be hf or vllm, got {cfg.model.backend!r}")
    need(cfg.model.prompt_format in PROMPT_FORMATS, f"model.prompt_format must be plain or chat, got {cfg.model.prompt_format!r}")
    need(cfg.model.tensor_parallel_size >= 1, f"model.tensor_parallel_size must be >= 1, got {cfg.model.tensor_parallel_size}")
    need(cfg.model.device in DEVICES, f"model.device must be cpu or cuda, got {cfg.model.device!r}")
    need(cfg.model.backend != "vllm" or cfg.model.device == "cuda", "model.backend vllm needs model.device: cuda (vLLM runs on GPUs only)")
    need(cfg.model.max_model_len is None or cfg.model.max_model_len >= 2, f"model.max_model_len must be >= 2 tokens or null, got {cfg.model.max_model_len}")
    need(cfg.serve.num_gpus is None or cfg.serve.num_gpus >= 0, f"serve.num_gpus must be >= 0 or null, got {cfg.serve.num_gpus}")
    need(cfg.serve.num_gpus is None or cfg.model.device == "cpu" or cfg.serve.num_gpus > 0, "serve.num_gpus must be > 0 with model.device cuda (null: model_gpus)")
    need(bool(cfg.model.step_delimiter) and len(cfg.model.step_delimiter) <= 16, f"model.step_delimiter must be 1 to 16 characters, got {cfg.model.step_delimiter!r}")
    need(cfg.scorer.entropy in ENTROPY_MODES, f"scorer.entropy must be exact or topk, got {cfg.scorer.entropy!r}")
    need(cfg.generator.replicas >= 1, f"generator.replicas must be >= 1, got {cfg.generator.replicas}")
    need(1 <= cfg.pairs.candidates <= cfg.generator.max_k, f"pairs.candidates must be in [1, generator.max_k={cfg.generator.max_k}], got {cfg.pairs.candidates}")
    need(0.0 <= cfg.pairs.tau_quantile <= 1.0, f"pairs.tau_quantile must be in [0, 1], got {cfg.pairs.tau_quantile}")
    need(cfg.pairs.temperature > 0, f"pairs.temperature must be > 0, got {cfg.pairs.temperature}")
    need(cfg.critic.kind in ("exact", "llm", "judge"), f"critic.kind must be exact, llm or judge, got {cfg.critic.kind!r}")
    need(cfg.critic.kind not in ("llm", "judge") or bool(cfg.critic.model), f"critic.kind {cfg.critic.kind} needs critic.model")
    need(0.0 <= cfg.critic.threshold <= 1.0, f"critic.threshold must be in [0, 1], got {cfg.critic.threshold}")
    need(not cfg.dpo.fsdp or cfg.dpo.use_gpu or cfg.dpo.num_workers >= 2, f"dpo.fsdp on CPU needs dpo.num_workers >= 2 (one process has nothing to shard over), got {cfg.dpo.num_workers}")
    need(cfg.dpo.loss_type in ("sigmoid", "ipo", "dpop"), f"dpo.loss_type must be sigmoid, ipo or dpop, got {cfg.dpo.loss_type!r}")
    need(cfg.dpo.loss_type != "dpop" or cfg.dpo.precompute_ref_log_probs, "dpo.loss_type dpop needs dpo.precompute_ref_log_probs: true")
    need(cfg.dpo.dpop_lambda >= 0 and cfg.dpo.sft_weight >= 0, f"dpo.dpop_lambda and dpo.sft_weight must be >= 0, got {cfg.dpo.dpop_lambda}, {cfg.dpo.sft_weight}")
    need(cfg.task.name != "math" or cfg.critic.kind != "exact", "task math has no exact step verifier: set critic.kind judge (or llm)")
    need(cfg.task.answer_timeout_s > 0, f"task.answer_timeout_s must be > 0, got {cfg.task.answer_timeout_s}")
    need(cfg.loop.pairs in ("step", "trajectory", "crew"), f"loop.pairs must be step, trajectory or crew, got {cfg.loop.pairs!r}")
    need(cfg.loop.rounds >= 0, f"loop.rounds must be >= 0, got {cfg.loop.rounds}")
    need(cfg.loop.questions >= 1 and cfg.loop.eval_n >= 1, "loop.questions and loop.eval_n must be >= 1")
    need(
        isinstance(cfg.loop.temperatures, list) and cfg.loop.temperatures and all(float(t) > 0 for t in cfg.loop.temperatures),
        f"loop.temperatures must be a non-empty list of temperatures > 0, got {cfg.loop.temperatures!r}",
    )
    need(0.0 <= cfg.loop.cat_tau <= 1.0, f"loop.cat_tau must be in [0, 1], got {cfg.loop.cat_tau}")
    services = ("generator", "scorer", "critic", "pair_store")
    need(isinstance(cfg.mesh.placement, dict) and set(cfg.mesh.placement) <= set(services), f"mesh.placement keys must be among {', '.join(services)}, got {cfg.mesh.placement!r}")
    gpu_services = ("generator", "scorer", "critic")
    need(isinstance(cfg.mesh.gpus, dict) and set(cfg.mesh.gpus) <= set(gpu_services), f"mesh.gpus keys must be among {', '.join(gpu_services)}, got {cfg.mesh.gpus!r}")
    for name, n in cfg.mesh.gpus.items():
        need(isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0, f"mesh.gpus.{name} must be a number >= 0, got {n!r}")
        vllm = service_backend(cfg, name) == "vllm"
        need(not vllm or n >= cfg.model.tensor_parallel_size, f"mesh.gpus.{name} must be >= model.tensor_parallel_size={cfg.model.tensor_parallel_size} on vllm, got {n}")
    for name, res in [*cfg.mesh.placement.items(), ("dpo.resources", cfg.dpo.resources)]:
        need(isinstance(res, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in res.items()), f"{name} must map resource names to amounts > 0, got {res!r}")
    ct = cfg.cat
    need(ct.scoring != "critic" and ct.prune_scoring != "critic", "cat.scoring and cat.prune_scoring may not be critic (the verifier-guided yardstick is never a default)")
    try:
        ct.search_config()
    except ValueError as e:
        raise ConfigError(f"cat.{e}") from None
    pb = cfg.publish
    need(pb.transport in ("collective", "disk"), f"publish.transport must be collective or disk, got {pb.transport!r}")
    need(0 < pb.bucket_mb <= 65536, f"publish.bucket_mb must be in (0, 65536], got {pb.bucket_mb}")
    need(pb.timeout_s > 0, f"publish.timeout_s must be > 0, got {pb.timeout_s}")
    sv = cfg.serve
    need(ct.k <= sv.max_k, f"cat.k must be in [1, serve.max_k={sv.max_k}], got {ct.k}")
    need(ct.max_steps <= sv.max_max_steps, f"cat.max_steps must be in [1, serve.max_max_steps={sv.max_max_steps}], got {ct.max_steps}")
    need(1 <= sv.min_replicas <= sv.max_replicas, f"serve.min_replicas must be in [1, serve.max_replicas={sv.max_replicas}], got {sv.min_replicas}")
    need(sv.max_ongoing_requests >= 1, f"serve.max_ongoing_requests must be >= 1, got {sv.max_ongoing_requests}")
    need(1 <= sv.k <= sv.max_k, f"serve.k must be in [1, serve.max_k={sv.max_k}], got {sv.k}")
    need(1 <= sv.max_steps <= sv.max_max_steps, f"serve.max_steps must be in [1, serve.max_max_steps={sv.max_max_steps}], got {sv.max_steps}")
    need(0.0 <= sv.tau <= 1.0, f"serve.tau must be in [0, 1], got {sv.tau}")
    need(sv.request_timeout_s > 0, f"serve.request_timeout_s must be > 0, got {sv.request_timeout_s}")
    try:
        check_gate(sv.promotion, sv.promotion_metrics)
    except ValueError as e:
        raise ConfigError(f"serve.{e}") from None
    reporters = ("tensorboard", "wandb", "mlflow")
    need(isinstance(cfg.dpo.report_to, list) and set(cfg.dpo.report_to) <= set(reporters), f"dpo.report_to must list some of {', '.join(reporters)}, got {cfg.dpo.report_to!r}")
    for name in cfg.dpo.report_to:
        found = any(importlib.util.find_spec(m) is not None for m in (("tensorboardX", "tensorboard") if name == "tensorboard" else (name,)))
        need(found, f"dpo.report_to names {name} but it is not installed (pip install {name})")
    need(cfg.mesh.metrics_export_port is None or 1 <= cfg.mesh.metrics_export_port <= 65535, f"mesh.metrics_export_port must be in [1, 65535], got {cfg.mesh.metrics_export_port}")


def config_from_dict(data: dict) -> Config:
    """A Config from ``Config.to_dict()`` output (how actors receive it)."""
    values: dict[str, dict] = {}
    for section, given in (data or {}).items():
        if section == "dpo" and isinstance(given, dict):  # derived from model.step_delimiter when built
            given = {k: v for k, v in given.items() if k != "delimiter"}
        _apply(values, section, given or {}, "config")
    return _build(values)


# ---- what each service asks Ray for -----------------------------------------------------------------
# The one place that turns a config into Ray resource requests: the mesh runner (caspo/mesh), the Serve
# deployment (caspo/serve), DPO's ScalingConfig (caspo/trainer) and `caspo plan` all read it. Nothing here
# or there probes CUDA: an actor that holds a model on model.device cuda asks for its GPUs, so Ray reserves
# them and sets its CUDA_VISIBLE_DEVICES to exactly those; an actor that asks for none gets none reserved
# (and Ray leaves CUDA_VISIBLE_DEVICES as the node has it, so it must not use CUDA: model.device cpu).
DEVICES = ("cpu", "cuda")
REPLICA_CPUS = 0.5  # logical CPUs a generator replica reserves (its torch threads on cpu)


@dataclass(frozen=True)
class ActorResources:
    """One kind of actor of a service: ``count`` actors, each asking for this much."""

    num_cpus: float
    num_gpus: float = 0
    resources: dict = field(default_factory=dict)  # custom Ray resources: a worker group's (mesh.placement, dpo.resources)
    count: int = 1
    on_head: bool = False  # pinned to the Ray head node (neither placed on a group nor asking for a GPU)
    backend: str | None = None  # the model backend it loads (None: it holds no model)
    model: str | None = None

    def ray_options(self) -> dict:
        """``num_cpus`` / ``num_gpus`` / ``resources`` for ``ray.remote`` / ``.options`` (head pin not included)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


def model_gpus(cfg: Config, backend: str, service: str | None = None) -> float:
    """GPUs one model actor asks for: ``mesh.gpus[service]`` when given; else none on model.device cpu and, on
    cuda, model.tensor_parallel_size for a vLLM engine (one tensor-parallel shard a GPU) and 1 for the HF
    backend (which does not split a model)."""
    if service in cfg.mesh.gpus:
        return cfg.mesh.gpus[service]
    if cfg.model.device != "cuda":
        return 0
    return cfg.model.tensor_parallel_size if backend == "vllm" else 1


def scorer_backend(cfg: Config) -> str:
    """The backend the ConfidenceScorer loads: ``scorer.entropy`` exact takes the HF backend (full-vocabulary
    entropies, on the scorer's own GPU with model.device cuda), topk the policy's ``model.backend`` (on vLLM:
    top-k estimates)."""
    return "hf" if cfg.scorer.entropy == "exact" else cfg.model.backend


def service_backend(cfg: Config, service: str) -> str | None:
    """The model backend a mesh service loads (None: it holds no model)."""
    if service == "scorer":
        return scorer_backend(cfg)
    if service == "critic":
        return cfg.model.backend if cfg.critic.kind in ("llm", "judge") else None
    return cfg.model.backend if service == "generator" else None


def dpo_worker_resources(d: DPOTrainConfig) -> dict:
    """Ray Train's ``resources_per_worker`` of one DPO worker: its CPUs, one GPU with ``use_gpu``, the trainer group's resources."""
    return {"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {}), **d.resources}


def service_resources(cfg: Config) -> dict[str, ActorResources]:
    """Every actor kind the mesh, Serve and DPO start, by service: ``generator`` (one per replica), ``scorer``,
    ``critic``, ``pair_store``, ``serve`` (per CaT replica), ``dpo`` (per Ray Train worker). The mesh's
    CPU-only helpers (registry, generator front, round controller) always stay on the head."""
    place = cfg.mesh.placement
    m = cfg.model

    def model_actor(service: str, backend: str | None, model: str | None, cpus: float, count: int = 1) -> ActorResources:
        gpus = model_gpus(cfg, backend, service) if backend else 0
        res = dict(place.get(service) or {})
        # unplaced CPU work stays on the head (a worker group's node may go away); an unplaced GPU service
        # goes wherever Ray finds a free GPU (a head without GPUs could never take it)
        return ActorResources(cpus, gpus, res, count, on_head=not res and not gpus, backend=backend, model=model)

    critic_model = cfg.critic.kind in ("llm", "judge")
    sv = cfg.serve
    d = cfg.dpo
    dpo_res = dpo_worker_resources(d)
    return {
        "generator": model_actor("generator", service_backend(cfg, "generator"), m.policy, REPLICA_CPUS, cfg.generator.replicas),
        "scorer": model_actor("scorer", service_backend(cfg, "scorer"), m.policy, 0),
        "critic": model_actor("critic", service_backend(cfg, "critic"), cfg.critic.model if critic_model else None, 0),
        "pair_store": model_actor("pair_store", None, None, 0),
        "serve": ActorResources(
            sv.num_cpus, model_gpus(cfg, m.backend) if sv.num_gpus is None else sv.num_gpus, {}, sv.max_replicas,
            backend=m.backend, model=m.policy,
        ),
        "dpo": ActorResources(
            dpo_res.pop("CPU"), dpo_res.pop("GPU", 0), dpo_res, d.num_workers, backend="hf", model=m.policy,
        ),
    }
