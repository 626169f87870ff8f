"""Publishing a policy over a tensor transport: the trainer's weights go from memory to every process
that serves the policy, and the disk stays the record, not the path.

    source (rank 0) ──broadcast, bucket by bucket──▶ generator replicas, scorer, Serve replicas
                                                    (and the critic when it is the policy)

* ``PolicySource``: a Ray actor beside the trainer. DPO's rank 0 hands it the gathered weights of a round
  (``train_dpo(..., source=...)``) before it writes the checkpoint; ``publish`` broadcasts them with
  caspo.models.transport. Asked for a checkpoint it was not handed (``caspo publish PATH``, a restarted
  loop), it reads that checkpoint once, itself; the subscribers still get it over the transport.
* ``publish_policy``: one publish, as ``caspo loop`` and ``caspo publish`` run it. The subscribers are
  found through Ray (the mesh's named actors, and Serve's replicas of the CaT app); each joins the
  publish's group, fills a copy of its model bucket by bucket and switches to version k only when all of
  k has arrived and its checksum equals the source's (requests in flight finish on the old weights).
  Then the policy file names version k and its checkpoint: a subscriber that missed the broadcast
  (restarted, scaled up later, or the broadcast failed) loads the checkpoint from it, and a service
  whose broadcast failed is sent the file's ``Reload`` at once.
* ``publish.transport: disk`` (or no Ray to reach): the old path, every service reads the checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.util import get_node_ip_address

from caspo.config import Config, config_from_dict
from caspo.mesh.actors import ACTOR_NAMES
from caspo.mesh.client import MeshClient
from caspo.models.hf import load_model, resolve_model_path
from caspo.models.transport import TransportError, make_plan, open_store, send_weights
from caspo.models.worker import receive_published
from caspo.policy_file import write_policy_file

log = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"
SERVE_DEPLOYMENT = "CaT"  # caspo.serve.deployment.DEPLOYMENT (serve is beside mesh, not below it)


class PolicySource:
    """Rank 0 of every publish: holds the newest policy the trainer handed it, in memory."""

    def __init__(self, cfg_dict: dict):
        self.cfg: Config = config_from_dict(cfg_dict)
        self.held: tuple[str, dict] | None = None
        self._plan: tuple[str, dict] | None = None
        self.disk_reads = 0  # checkpoints this source had to read (never, when the trainer hands them over)

    def hold(self, path: str, state: dict) -> int:
        """The trainer's weights of the checkpoint it is writing to ``path``; returns how many tensors. Their
        wire plan (order, buckets, checksum) is made now, so a publish does not spend a pass over them on it."""
        self.held = (str(Path(path).resolve()), {k: v.detach() for k, v in state.items()})
        self._plan = None
        self._plan_for(self.held[0], self.held[1])
        return len(state)

    def _plan_for(self, path: str, state: dict) -> dict:
        if self._plan is None or self._plan[0] != path:
            pc = self.cfg.publish
            self._plan = (path, make_plan(state, 0, path, int(pc.bucket_mb * 2**20), pc.timeout_s))
        return self._plan[1]

    def holds(self) -> str | None:
        return self.held[0] if self.held else None

    def _state(self, path: str) -> dict:
        resolved = str(Path(resolve_model_path(path)).resolve())
        if self.held is not None and self.held[0] == resolved:
            return self.held[1]
        model, _ = load_model(resolved, "cpu", self._checkpoint_dtype(resolved))
        self.disk_reads += 1
        self.held = (resolved, model.state_dict())
        return self.held[1]

    @staticmethod
    def _checkpoint_dtype(path: str) -> torch.dtype:
        cfg = json.loads((Path(path) / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return getattr(torch, str(name).removeprefix("torch."), torch.float32)

    async def publish(self, version: int, path: str, subscribers: list, on_bucket: Callable[[int], None] | None = None) -> dict:
        """Broadcast the weights of ``path`` as ``version`` to ``subscribers`` ([(label, handle, kind)]).
        Returns what each subscriber did; a failed broadcast is reported, never raised."""
        pc = self.cfg.publish
        t0 = time.perf_counter()
        state = self._state(path)
        plan = {**self._plan_for(self.held[0], state), "version": int(version), "path": path}
        world = len(subscribers) + 1
        store = open_store(get_node_ip_address(), world, pc.timeout_s)
        plan.update(host=get_node_ip_address(), port=store.port, world=world, group=f"caspo-v{version}-{uuid.uuid4().hex[:8]}")
        refs = [_receive_call(handle, kind, plan, rank) for rank, (_, handle, kind) in enumerate(subscribers, 1)]
        sent: dict | None = None
        error = None
        try:
            sent = await asyncio.to_thread(send_weights, state, plan, store, on_bucket)
        except TransportError as e:
            error = str(e)
            log.warning("%s", e)
        got = await asyncio.gather(*refs, return_exceptions=True)
        del store
        out = {}
        for (label, _, _), r in zip(subscribers, got):
            ok = not isinstance(r, BaseException) and error is None
            out[label] = {"ok": ok, **({"version": r["version"], "seconds": r["seconds"], "wire_s": r.get("wire_s")} if not isinstance(r, BaseException) else {"error": _last_line(r)})}
        return {
            "version": version,
            "checksum": plan["checksum"],
            "bytes": plan["bytes"],
            "buckets": len(plan["buckets"]),
            "send_seconds": sent["seconds"] if sent else None,
            "seconds": time.perf_counter() - t0,
            "error": error,
            "subscribers": out,
        }

    def stats(self) -> dict:
        return {"disk_reads": self.disk_reads, "holds": self.holds()}


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


def _receive_call(handle, kind: str, plan: dict, rank: int):
    if kind == "serve":  # a Serve replica: its CaT instance, reached in its process (caspo/serve/deployment.py)
        return handle.__ray_call__.remote(receive_published, plan, rank)
    return handle.receive_policy.remote(plan, rank)


_SOURCES: dict[str, object] = {}  # this process's sources, by Ray job and mesh namespace


def policy_source(cfg: Config):
    """This process's PolicySource for the mesh (created on first use; it lives as long as this process).
    It is not a named actor: a source found by name could belong to a controller that was just killed,
    and Ray takes that one down with its owner while the next controller trains into it."""
    ctx = ray.get_runtime_context()  # a new ray.init in this process is a new job: its own source
    key = f"{ctx.get_node_id()}/{ctx.get_job_id()}/{cfg.mesh.namespace}"
    if key not in _SOURCES:
        _SOURCES[key] = ray.remote(num_cpus=0, max_concurrency=8)(PolicySource).remote(cfg.to_dict())
    return _SOURCES[key]


def critic_is_policy(cfg: Config) -> bool:
    return cfg.critic.kind in ("llm", "judge") and cfg.critic.model == cfg.model.policy


TARGETS = ("all", "mesh", "serve")  # everyone; the mesh's model services; Serve's replicas


async def subscribers(cfg: Config, targets: str = "all") -> list:
    """Every process that serves the policy now: [(label, actor handle, kind)]. ``targets`` "mesh": the
    generator replicas, the scorer (and the critic when it is the policy); "serve": Serve's replicas."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    ns = cfg.mesh.namespace
    out = []
    if targets == "serve":
        return _serve_replicas(cfg)
    try:
        gen = ray.get_actor(ACTOR_NAMES["generator"], namespace=ns)
        for i, h in enumerate(await gen.replica_handles.remote()):
            out.append((f"generator/{i}", h, "actor"))
    except ValueError:
        pass
    names = ["scorer"] + (["critic"] if critic_is_policy(cfg) else [])
    for name in names:
        try:
            out.append((name, ray.get_actor(ACTOR_NAMES[name], namespace=ns), "actor"))
        except ValueError:
            pass
    return out if targets == "mesh" else out + _serve_replicas(cfg)


def _serve_replicas(cfg: Config) -> list:
    out = []
    prefix = f"SERVE_REPLICA::{cfg.serve.app_name}#{SERVE_DEPLOYMENT}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix):
            try:
                out.append((f"serve/{a['name'][len(prefix):]}", ray.get_actor(a["name"], namespace=SERVE_NAMESPACE), "serve"))
            except ValueError:  # gone since it was listed
                pass
    return out


async def publish_policy(client: MeshClient, cfg: Config, version: int, path: str, policy_file, source=None, on_bucket=None, targets: str = "all") -> dict:
    """Make the checkpoint at ``path`` policy ``version`` everywhere (``targets``: see ``subscribers``; the
    loop publishes a round's policy to the mesh, and to Serve only when the promotion gate passes), over
    the transport when ``publish.transport`` is collective and Ray is reachable, else through the file
    (``policy_file``, which Serve's replicas watch, when given). Returns
    ``{"transport", "versions": {service: version}, "broadcast": PolicySource.publish's report or None,
    "fallback": [labels that loaded the file instead]}``."""
    if cfg.publish.transport == "disk" or not ray.is_initialized():
        if cfg.publish.transport != "disk":
            log.warning("publish.transport is collective but this process is not connected to Ray: publishing through the file")
        if targets == "serve":  # Serve's replicas watch the policy file
            if policy_file is not None:
                write_policy_file(policy_file, version, path)
            return {"transport": "disk", "versions": {}, "broadcast": None, "fallback": []}
        versions = await client.publish(version, path, policy_file)
        return {"transport": "disk", "versions": versions, "broadcast": None, "fallback": []}
    path = str(Path(path).resolve()) if path != "tiny" else path
    subs = await subscribers(cfg, targets)
    if not subs:  # nobody to send to (e.g. no Serve app on this Ray): nothing is packed or sent
        if policy_file is not None:
            write_policy_file(policy_file, version, path)
        return {"transport": "collective", "versions": {}, "broadcast": None, "fallback": []}
    source = source or policy_source(cfg)
    report = await source.publish.remote(version, path, subs, on_bucket)
    if policy_file is not None:  # the record: what a replica that missed this broadcast loads
        write_policy_file(policy_file, version, path)
    failed = [label for label, r in report["subscribers"].items() if not r["ok"]]
    services = {label.split("/")[0] for label in failed} & {"generator", "scorer"}
    if failed:
        log.warning("the broadcast of v%d missed %s: they load %s", version, ", ".join(failed), path)
    versions = {service: await client.reload(service, version, path) for service in sorted(services)}
    try:
        gen = ray.get_actor(ACTOR_NAMES["generator"], namespace=cfg.mesh.namespace)
        versions["generator"] = await gen.refresh_versions.remote()
    except ValueError:
        pass
    if "scorer" not in versions and "scorer" in report["subscribers"]:
        versions["scorer"] = report["subscribers"]["scorer"].get("version")
    return {"transport": "collective", "versions": versions, "broadcast": report, "fallback": failed}
