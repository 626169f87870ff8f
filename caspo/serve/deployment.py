"""CaT inference on Ray Serve: the ``CaT`` deployment, reached over Serve's gRPC proxy and over HTTP.

    caspo serve                                   # Ray Serve on a local Ray (or the running mesh's)
    serve run caspo.serve.deployment:app_builder config=configs/tiny-cpu.yaml   # or a Serve config file

A replica holds one ``CaTService`` (service.py): a model backend behind a ``ModelWorker``. Every
request's search runs as an asyncio task on the replica and asks the worker for its branch proposals, and the worker merges the proposals
of all concurrent requests into one batched model call (``serve.batch_wait_ms``), so ten clients cost
about one client's model calls per step. The search itself is ``caspo.core.search``, the same code the
evaluation and the benchmarks run.

* gRPC (``serve.grpc_port``, default 9000): ``caspo.v1.CaT/Solve`` and ``/SolveStream``
  (``protos/caspo/v1/cat.proto``) are this class's methods of those names; Serve's proxy parses
  requests with proxy.py. The stream sends each step as soon as every live branch shares it,
  then the answer. Reflection is on, so ``grpcurl`` needs no proto files.
* HTTP (``serve.http_port``, default 8000): the routes of http_app.py. Both call the same service.

Bad input gets gRPC ``INVALID_ARGUMENT`` or HTTP 422 naming the field and the limit; the replica
keeps serving. A gRPC message over ``services.server.SERVE_MAX_MESSAGE_BYTES`` is refused by the proxy
(RESOURCE_EXHAUSTED) when the process that started Ray called ``services.server.limit_proxy_messages``
first (``caspo serve``/``caspo up`` do; Ray's own default is 2 GiB). With ``$CASPO_AUTH_TOKEN`` set in
the replicas' environment every call but ``GET /healthz`` needs ``authorization: Bearer <token>``
(gRPC UNAUTHENTICATED / HTTP 401 without). A request past ``serve.request_timeout_s`` (or its gRPC
deadline) is cancelled by Serve, and its search stops at its next step.

Hot reload: each replica watches ``serve.policy_file`` (``runs/NAME/policy.json``, written when
``caspo loop`` publishes a policy) and loads the version it names in a thread while it keeps
answering; model calls already running finish on the weights they started with. A publish over the
tensor transport (caspo/mesh/publisher.py) reaches the replica's worker directly
(``caspo.models.worker.receive_published``) and switches it once all of the new version has arrived;
the watcher then finds the file naming the version it already serves. Every response carries the
``policy_version`` that wrote its last step (a search that spans a reload may have taken
its earlier steps from the previous version).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
from ray import serve

from caspo import telemetry
from caspo.config import Config, config_from_dict, load_config, service_resources
from caspo.core.search import CommittedStep
from caspo.errors import BadRequest
from caspo.protos.v1 import cat_pb2
from caspo.serve.encoders import response_proto, step_proto
from caspo.serve.http_app import api
from caspo.serve.params import SolveParams
from caspo.serve.request_errors import Unauthenticated
from caspo.serve.service import CaTService
from caspo.services.security import UNAUTHENTICATED_MESSAGE, authorized
from caspo.services.server import status_name

GRPC_SERVICER = "caspo.serve.proxy.add_CaTServicer_to_server"  # parse errors -> INVALID_ARGUMENT
DEPLOYMENT = "CaT"


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class CaTServer:
    """One replica: its ``CaTService`` (``self.service``), which the HTTP routes (http_app.py) reach
    through Serve's replica context and the gRPC methods below call."""

    def __init__(self, cfg_dict: dict):
        self.service = CaTService(config_from_dict(cfg_dict))

    # ---- gRPC (method names are the RPC names of caspo.v1.CaT) -------------------------------
    def _grpc_params(self, request, grpc_context) -> SolveParams:
        if not authorized(dict(grpc_context.invocation_metadata()).get("authorization")):
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details(UNAUTHENTICATED_MESSAGE)
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        try:
            return self.service.grpc_params(request)
        except BadRequest as e:
            # Serve answers with the code set on the context when the method then raises
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            raise

    async def Solve(self, request, grpc_context):  # noqa: N802 - the RPC's name
        t0, status = time.perf_counter(), "INTERNAL"
        try:
            params = self._grpc_params(request, grpc_context)
            res, steps, version, seconds = await self.service.solve(params)
            status = "OK"
            return response_proto(res, steps, params, version, seconds)
        except (BadRequest, Unauthenticated):
            status = status_name(grpc_context)
            raise
        finally:
            telemetry.grpc_request(DEPLOYMENT, "Solve", time.perf_counter() - t0, status)

    async def SolveStream(self, request, grpc_context):  # noqa: N802 - the RPC's name
        t0, status = time.perf_counter(), "INTERNAL"
        try:
            params = self._grpc_params(request, grpc_context)
            async for ev in self.service.events(params):
                if isinstance(ev, CommittedStep):
                    yield cat_pb2.SolveEvent(step=step_proto(ev))
                else:
                    res, steps, version, seconds = ev
                    yield cat_pb2.SolveEvent(result=response_proto(res, steps, params, version, seconds))
            status = "OK"
        except (BadRequest, Unauthenticated):
            status = status_name(grpc_context)
            raise
        finally:
            telemetry.grpc_request(DEPLOYMENT, "SolveStream", time.perf_counter() - t0, status)

    def check_health(self) -> None:  # Serve calls this; a replica whose watcher died is restarted
        self.service.check()


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
