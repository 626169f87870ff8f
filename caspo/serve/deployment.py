"""CaT inference on Ray Serve: the ``CaT`` deployment, reached over Serve's gRPC proxy and over HTTP.

    caspo serve                                   # Ray Serve on a local Ray (or the running mesh's)
    serve run caspo.serve.deployment:app_builder config=configs/tiny-cpu.yaml   # or a Serve config file

A replica holds one model backend behind a ``ModelWorker``: every request's search runs as an asyncio
task on the replica and asks the worker for its branch proposals, and the worker merges the proposals
of all concurrent requests into one batched model call (``serve.batch_wait_ms``), so ten clients cost
about one client's model calls per step. The search itself is ``caspo.core.cat``, the same code the
evaluation and the benchmarks run.

* gRPC (``serve.grpc_port``, default 9000): ``caspo.v1.CaT/Solve`` and ``/SolveStream``
  (``protos/caspo/v1/cat.proto``) are this class's methods of those names; Serve's proxy parses
  requests with proxy.py. The stream sends each step as soon as every live branch shares it,
  then the answer. Reflection is on, so ``grpcurl`` needs no proto files.
* HTTP (``serve.http_port``, default 8000): the routes of http_app.py.

Bad input gets gRPC ``INVALID_ARGUMENT`` or HTTP 422 naming the field and the limit; the replica
keeps serving. A gRPC message over ``services.server.SERVE_MAX_MESSAGE_BYTES`` is refused by the proxy
(RESOURCE_EXHAUSTED) when the process that started Ray called ``services.server.limit_proxy_messages``
first (``caspo serve``/``caspo up`` do; Ray's own default is 2 GiB). With ``$CASPO_AUTH_TOKEN`` set in
the replicas' environment every call but ``GET /healthz`` needs ``authorization: Bearer <token>``
(gRPC UNAUTHENTICATED / HTTP 401 without). A request past ``serve.request_timeout_s`` (or its gRPC
deadline) is cancelled by Serve, and its search stops at its next step.

Hot reload: each replica watches ``serve.policy_file`` (``runs/NAME/policy.json``, written when
``caspo loop`` publishes a policy) and loads the version it names in a thread while it keeps
answering; model calls already running finish on the weights they started with. Every response
carries the ``policy_version`` that wrote its last step (a search that spans a reload may have taken
its earlier steps from the previous version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import grpc
import torch
from ray import serve

from caspo.config import Calibration, CalibrationError, Config, config_from_dict, load_config, read_calibration, service_resources
from caspo.core.cat import CommittedStep, Search, SearchResult, stream_search
from caspo.errors import BadRequest
from caspo.evaluation import calibration_path_for
from caspo.models.base import ModelLoadError, item_tokens, prefix_text
from caspo.models.factory import make_backend
from caspo.models.prompting import prompter_for_backend
from caspo.models.worker import ModelWorker
from caspo.policy_file import read_policy_file
from caspo.protos.v1 import cat_pb2
from caspo.serve.http_app import api
from caspo.serve.params import SolveParams, params_from_grpc
from caspo.serve.protocol import response_proto, step_proto
from caspo.serve.proxy import ParamError, Unauthenticated
from caspo.services.security import UNAUTHENTICATED_MESSAGE, authorized
from caspo.tasks import get_task

log = logging.getLogger(__name__)

GRPC_SERVICER = "caspo.serve.proxy.add_CaTServicer_to_server"  # parse errors -> INVALID_ARGUMENT
DEPLOYMENT = "CaT"


class _RequestProposer:
    """CaT's StepProposer over the replica's ModelWorker, for one request: it remembers which policy
    version wrote the request's latest proposals."""

    def __init__(self, worker, prompt, delimiter: str):
        self.worker, self.prompt, self.delimiter = worker, prompt, delimiter
        self.version = worker.version

    async def propose(self, prefixes, n: int, temperature: float):
        texts = [prefix_text(self.prompt, p.question, p.steps, self.delimiter) for p in prefixes]
        out, self.version = await self.worker.sample_steps_versioned(texts, n, temperature, [p.seed for p in prefixes])
        return out


def check_context(question: str, worker: ModelWorker, prompter) -> str:
    """``question``, or ParamError on the field question naming the limit when its prompt and one step
    (model.max_step_tokens) do not fit the model's context length."""
    limit = worker.max_model_len
    if limit:
        need = item_tokens(worker.backend, prompter(question))
        if need > limit:
            raise ParamError("question", f"needs {need} tokens with room for one step (model.max_step_tokens); the model's context length (model.max_model_len) is {limit}")
    return question


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class CaTServer:
    """One replica: a model, its micro-batching worker, and the policy watcher."""

    def __init__(self, cfg_dict: dict):
        self.cfg: Config = config_from_dict(cfg_dict)
        sv = self.cfg.serve
        torch.set_num_threads(max(1, int(sv.num_cpus)))
        path, version = self.cfg.model.policy, 0
        published = self._published()
        if published is not None:
            version, path = published
        self.worker = ModelWorker(make_backend(self.cfg, path, version), batch_wait_ms=sv.batch_wait_ms)
        self.task = get_task(self.cfg.task.name, self.cfg.task.data, self.cfg.task)
        self.prompter = prompter_for_backend(self.worker.backend, self.task)  # model.prompt_format, step_delimiter
        self.calibration = self._calibration(path, strict=True)
        self.model_id = f"caspo-{self.cfg.task.name}"
        self._watcher: asyncio.Task | None = None
        self.reload_error: str | None = None
        self._failed: tuple[int, str] | None = None  # a publication that failed to load: not retried
        try:
            self._start_watcher()
        except RuntimeError:  # no running loop here; the first request starts it
            pass

    # ---- policy ------------------------------------------------------------------------------
    def _published(self) -> tuple[int, str] | None:
        pf = self.cfg.serve.policy_file
        return read_policy_file(pf) if pf else None

    def _start_watcher(self) -> None:
        if self.cfg.serve.policy_file and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.watch_interval_s)
            published = self._published()
            if published is None or published[0] == self.worker.version or published == self._failed:
                continue
            version, path = published
            log.info("policy v%d published at %s: reloading", version, path)
            try:
                await self.worker.reload(path, version)
                self.reload_error = None
                self.calibration = self._calibration(path, strict=False)
            except Exception as e:  # noqa: BLE001 - keep serving the weights we have
                self._failed = published
                self.reload_error = f"reloading v{version} from {path} failed: {e}"
                log.error(self.reload_error)

    def _calibration(self, policy_path: str, strict: bool) -> Calibration | None:
        """cat.calibration (must exist), else the calibration next to the served policy when there is one.
        A malformed file stops a starting replica (``strict``) with its one-line message; after a reload it
        is reported as the reload error and cat requests use the cat section alone."""
        try:
            named = self.cfg.cat.calibration
            if named:
                return read_calibration(named)
            found = calibration_path_for(policy_path)
            return read_calibration(found) if found.is_file() else None
        except (CalibrationError, ModelLoadError) as e:
            if strict:
                raise
            self.reload_error = str(e)
            log.error(self.reload_error)
            return None

    def question_of(self, text: str) -> str:
        """The task's question from what a person typed, refused (ParamError: HTTP 422 / gRPC
        INVALID_ARGUMENT, naming the limit) when its prompt and one step do not fit the model's context."""
        return check_context(self.task.question(text), self.worker, self.prompter)

    def search_defaults(self) -> dict:
        """What a request's unset fields fall back on beyond serve.*: the cat section and the calibration."""
        return {"cat": self.cfg.cat, "calibration": self.calibration}

    # ---- the search --------------------------------------------------------------------------
    def _proposer(self) -> _RequestProposer:
        self._start_watcher()
        return _RequestProposer(self.worker, self.prompter, self.worker.delimiter)

    async def events(self, params: SolveParams):
        """Committed steps as the search makes them, then (result, steps, version, seconds)."""
        t0 = time.perf_counter()
        proposer = self._proposer()
        steps: list[CommittedStep] = []
        async for ev in stream_search(Search(params.question, params.search), proposer, with_tree=params.with_tree):
            if isinstance(ev, CommittedStep):
                steps.append(ev)
                yield ev
            else:
                yield ev, steps, proposer.version, time.perf_counter() - t0

    async def solve(self, params: SolveParams) -> tuple[SearchResult, list[CommittedStep], int, float]:
        final = None
        async for ev in self.events(params):
            if not isinstance(ev, CommittedStep):
                final = ev
        return final

    # ---- what the HTTP routes (http_app.py) ask of the replica --------------------------------
    def prompt_tokens(self, question: str) -> int:
        backend = self.worker.backend
        return len(backend.tokenizer(self.prompter(question))["input_ids"]) if hasattr(backend, "tokenizer") else 0

    def health(self) -> dict:
        self._start_watcher()
        return {
            "status": "ok",
            "policy_version": self.worker.version,
            "policy_path": self.worker.path,
            "reload_error": self.reload_error,
            "calibration": self.calibration.path if self.calibration else None,
            "model_calls": self.worker.backend_calls,  # batched model calls so far
            "proposals_waiting": self.worker.in_flight,  # searches waiting on a model call right now
        }

    # ---- gRPC (method names are the RPC names of caspo.v1.CaT) -------------------------------
    def _grpc_params(self, request, grpc_context) -> SolveParams:
        if not authorized(dict(grpc_context.invocation_metadata()).get("authorization")):
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details(UNAUTHENTICATED_MESSAGE)
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        try:
            return params_from_grpc(self.cfg.serve, request, self.question_of, **self.search_defaults())
        except BadRequest as e:
            # Serve answers with the code set on the context when the method then raises
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            raise

    async def Solve(self, request, grpc_context):  # noqa: N802 - the RPC's name
        params = self._grpc_params(request, grpc_context)
        res, steps, version, seconds = await self.solve(params)
        return response_proto(res, steps, params, version, seconds)

    async def SolveStream(self, request, grpc_context):  # noqa: N802 - the RPC's name
        params = self._grpc_params(request, grpc_context)
        async for ev in self.events(params):
            if isinstance(ev, CommittedStep):
                yield cat_pb2.SolveEvent(step=step_proto(ev))
            else:
                res, steps, version, seconds = ev
                yield cat_pb2.SolveEvent(result=response_proto(res, steps, params, version, seconds))

    def check_health(self) -> None:  # Serve calls this; a replica whose watcher died is restarted
        if self._watcher is not None and self._watcher.done() and not self._watcher.cancelled() and self._watcher.exception():
            raise RuntimeError(f"policy watcher died: {self._watcher.exception()}")


# ---- the application -------------------------------------------------------------------------------
def build_app(cfg: Config):
    """The CaT application for ``cfg`` (``serve.run(build_app(cfg))``)."""
    sv = cfg.serve
    if sv.policy_file:  # replicas may start elsewhere
        sv = dataclasses.replace(sv, policy_file=str(Path(sv.policy_file).expanduser().resolve()))
        cfg = dataclasses.replace(cfg, serve=sv)
    return CaTServer.options(
        max_ongoing_requests=sv.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": sv.min_replicas,
            "max_replicas": sv.max_replicas,
            "target_ongoing_requests": sv.target_ongoing_requests,
        },
        # serve.num_cpus, and serve.num_gpus or the GPUs model.device asks for (caspo.config.service_resources)
        ray_actor_options=service_resources(cfg)["serve"].ray_options(),
    ).bind(cfg.to_dict())


def app_builder(args: dict):
    """For Serve config files / ``serve run``: ``args`` may hold ``config`` (a YAML path) and ``set``
    (a list of ``section.key=value`` overrides)."""
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    return build_app(load_config(args.get("config"), list(overrides)))


def serve_options(cfg: Config) -> dict:
    """``serve.start`` keyword arguments: HTTP and gRPC proxies with the request timeout."""
    sv = cfg.serve
    return {
        "http_options": {"host": sv.host, "port": sv.http_port, "request_timeout_s": sv.request_timeout_s},
        "grpc_options": {"port": sv.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], "request_timeout_s": sv.request_timeout_s},
    }
