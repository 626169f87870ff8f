"""``caspo plan``: what every service of a config will ask Ray for, read before renting GPUs.

For each service (the generator's replicas, the scorer, the critic, the pair store, the CaT replicas of
Serve, the DPO workers): the resources it asks for (from ``caspo.config.service_resources``, the very
function the mesh runner, Serve and DPO call), the model and backend it loads, its context length and how
its entropies are computed. Then two checks, each a :class:`PlanError` naming the service and the numbers:

* **memory** (GPU services): the model's weights -- parameters (safetensors headers of a local model, or
  the "7B" of a hub id) x 2 bytes (bf16) -- must fit ``GPU_MEMORY_FRACTION`` of the GPU memory of the GPUs
  the actor asks for (vLLM keeps the rest for its KV cache); a DPO worker holds float32 weights, gradients
  and two AdamW moments (16 bytes a parameter), divided over the workers with ``dpo.fsdp``.
* **placement** (with cluster manifests, e.g. ``kustomize build k8s/overlays/gpu``): every actor is packed
  onto a pod of the RayJob's worker groups (the RayService's for Serve) that offers its custom resources,
  GPUs and CPUs, as Ray would schedule it; an actor that finds no room is refused.

Estimates only: nothing here loads a model or talks to a cluster.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from caspo.config import Config, service_resources
from caspo.models.base import ModelLoadError, context_length
from caspo.models.hf import resolve_model_path

GPU_MEMORY_FRACTION = 0.85  # the vLLM backend's gpu_memory_utilization: the weights must leave the rest for the KV cache
INFERENCE_BYTES = 2  # bf16 weights of a model served on a GPU (both backends load bf16 on CUDA)
TRAINING_BYTES = 16  # float32 weights + gradients + two AdamW moments, per parameter
GiB = 1024**3


class PlanError(ValueError):
    """A config whose services cannot all be placed; the message names the service and the limit."""


@dataclass
class ServicePlan:
    service: str
    count: int
    num_cpus: float
    num_gpus: float
    resources: dict
    on_head: bool
    model: str | None
    backend: str | None
    context_length: int | None
    entropy: str | None
    params_billion: float | None
    memory_gib: float | None  # per GPU-holding actor (weights, or DPO training state per worker)
    group: str | None = None  # the k8s worker group(s) it lands on (with cluster manifests)
    notes: list[str] = field(default_factory=list)


# ---- what a model is, without loading it --------------------------------------------------------------
def _safetensors_params(path: Path) -> int | None:
    total = 0
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total if files else None


def _hub_config(ref: str) -> dict | None:
    """A hub id's config.json when the local Hugging Face cache has it (no download)."""
    try:
        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: unknown
        return None
    return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None


def model_facts(ref: str) -> tuple[float | None, int | None, str]:
    """(parameters in billions, context length, where they come from) of a model reference."""
    try:
        path = Path(resolve_model_path(ref))
    except ModelLoadError:
        return None, None, "missing"
    if (path / "config.json").is_file():
        params = _safetensors_params(path)
        ctx = context_length(json.loads((path / "config.json").read_text()))
        return (params / 1e9 if params else None), ctx, "local"
    m = re.search(r"(\d+(?:\.\d+)?)\s*[Bb](?![a-z])", ref.split("/")[-1])
    cfg = _hub_config(ref)
    return (float(m.group(1)) if m else None), (context_length(cfg) if cfg else None), "hub id"


def entropy_mode(service: str, backend: str | None) -> str | None:
    """How the service's token entropies are computed: exact (full vocabulary) or a top-k estimate."""
    if backend is None or service == "critic":
        return None
    # the backend is what the service loads (the scorer's follows scorer.entropy: caspo.config.scorer_backend)
    return "top-k estimate" if backend == "vllm" else "exact"


# ---- cluster manifests ---------------------------------------------------------------------------------
@dataclass
class Pod:
    group: str
    gpus: float
    cpus: float
    resources: dict


def _quantity(v) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _group_pods(name: str, spec: dict, replicas: int) -> list[Pod]:
    params = spec.get("rayStartParams") or {}
    limits = (((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0].get("resources", {}).get("limits", {})
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    raw = params.get("resources") or "{}"
    res = json.loads(json.loads(raw) if raw.startswith('"') else raw)  # KubeRay's quoted JSON string
    return [Pod(name, gpus, cpus, dict(res)) for _ in range(replicas)]


def cluster_pods(docs: list[dict]) -> dict[str, list[Pod]]:
    """Pods by cluster ("job": the RayJob's, "serve": the RayService's) from manifests; the head is a pod
    of group "head" with the head-only resource."""
    out: dict[str, list[Pod]] = {}
    for d in docs:
        kind = (d or {}).get("kind")
        spec = (d or {}).get("spec") or {}
        cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec.get("rayClusterConfig") if kind == "RayService" else None
        if cluster is None:
            continue
        head = _group_pods("head", cluster.get("headGroupSpec") or {}, 1)
        head[0].resources["node:__internal_head__"] = 1.0
        pods = head
        for g in cluster.get("workerGroupSpecs") or []:
            pods += _group_pods(g.get("groupName", "?"), g, int(g.get("maxReplicas", g.get("replicas", 1))))
        out["job" if kind == "RayJob" else "serve"] = pods
    return out


def _place(sp: ServicePlan, pods: list[Pod]) -> None:
    want = dict(sp.resources)
    if sp.on_head:
        want["node:__internal_head__"] = 0.001
    groups = []
    for i in range(sp.count):
        for p in pods:
            if p.gpus >= sp.num_gpus and p.cpus >= sp.num_cpus and all(p.resources.get(k, 0) >= v for k, v in want.items()):
                p.gpus -= sp.num_gpus
                p.cpus -= sp.num_cpus
                for k, v in want.items():
                    p.resources[k] -= v
                groups.append(p.group)
                break
        else:
            asks = ", ".join(f"{k} {v:g}" for k, v in {"GPU": sp.num_gpus, "CPU": sp.num_cpus, **want}.items() if v)
            offer = "; ".join(sorted({f"{p.group}: {p.gpus:g} GPU, {p.cpus:g} CPU free, {p.resources}" for p in pods}))
            raise PlanError(f"{sp.service}: actor {i + 1} of {sp.count} asks for {asks or 'nothing'} and finds no room on the cluster's groups ({offer})")
    sp.group = ",".join(sorted(set(groups)))


# ---- the plan ------------------------------------------------------------------------------------------
def plan(cfg: Config, gpu_memory_gib: float = 80.0, cluster: list[dict] | None = None) -> list[ServicePlan]:
    """Every service's plan; PlanError when a model cannot fit its GPUs or an actor finds no pod."""
    out = []
    facts: dict[str, tuple] = {}
    for name, r in service_resources(cfg).items():
        ref = r.model if r.backend else None
        if ref and ref not in facts:
            facts[ref] = model_facts(ref)
        params, ctx, source = facts[ref] if ref else (None, None, "")
        if ref and cfg.model.max_model_len:
            ctx = cfg.model.max_model_len
        sp = ServicePlan(name, r.count, r.num_cpus, r.num_gpus, dict(r.resources), r.on_head, ref, r.backend, ctx,
                         entropy_mode(name, r.backend), params, None)
        if source == "hub id":
            sp.notes.append("hub id: parameters from its name" + ("" if ctx else "; context length read from config.json at load"))
        if params and r.num_gpus:
            if name == "dpo":
                shards = cfg.dpo.num_workers if cfg.dpo.fsdp else 1
                sp.memory_gib = params * 1e9 * TRAINING_BYTES / shards / GiB
                room = gpu_memory_gib * r.num_gpus
                what = f"{params:g}B parameters x {TRAINING_BYTES} bytes (float32 weights, gradients, AdamW) / {shards} worker{'s' * (shards > 1)}"
            else:
                sp.memory_gib = params * 1e9 * INFERENCE_BYTES / GiB
                room = gpu_memory_gib * r.num_gpus * GPU_MEMORY_FRACTION
                what = f"{params:g}B parameters x {INFERENCE_BYTES} bytes (bf16)"
            if sp.memory_gib > room:
                raise PlanError(
                    f"{name}: {ref} needs about {sp.memory_gib:.0f} GiB ({what}) but asks for {r.num_gpus:g} GPU of "
                    f"{gpu_memory_gib:g} GiB ({room:.0f} GiB usable); raise model.tensor_parallel_size / mesh.gpus, or use a smaller model"
                )
        out.append(sp)
    if cluster is not None:
        pods = cluster_pods(cluster)
        if "job" not in pods:
            raise PlanError("the cluster manifests hold no RayJob (the loop's cluster)")
        for sp in out:
            where = "serve" if sp.service == "serve" else "job"
            if where in pods:
                _place(sp, pods[where])
    return out


def plan_json(plans: list[ServicePlan]) -> dict:
    return {"services": [asdict(p) for p in plans]}
