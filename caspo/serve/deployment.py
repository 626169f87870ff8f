"""CaT inference on Ray Serve: one deployment, reached over Serve's gRPC proxy and over HTTP.

    caspo serve                                   # Ray Serve on a local Ray (or the running mesh's)
    serve run caspo.serve.deployment:app_builder config=configs/tiny-cpu.yaml   # or a Serve config file

The ``CaT`` deployment holds one model backend behind a ``ModelWorker``: every request's search runs
as an asyncio task on the replica and asks the worker for its branch proposals, and the worker merges
the proposals of all concurrent requests into one batched model call (``serve.batch_wait_ms``), so
ten clients cost about one client's model calls per step. The search itself is ``caspo.core.cat``,
the same code the evaluation and the benchmarks run.

* gRPC (``serve.grpc_port``, default 9000): ``caspo.v1.CaT/Solve`` and ``/SolveStream``
  (``protos/caspo/v1/cat.proto``); the stream sends each step as soon as every live branch shares it,
  then the answer. Reflection is on, so ``grpcurl`` needs no proto files.
* HTTP (``serve.http_port``, default 8000): ``POST /v1/solve``; OpenAI-compatible
  ``POST /v1/chat/completions`` (extension fields ``method``, ``k``, ``tau``, ``max_steps``,
  ``scoring``, ``seed``, ``with_tree``; the answer, its confidence and the policy version come back in
  ``caspo``) and ``GET /v1/models``; ``GET /healthz``.

Bad input gets gRPC ``INVALID_ARGUMENT`` or HTTP 422 naming the field and the limit; the replica
keeps serving. An HTTP body over ``MAX_BODY_BYTES`` gets 413 (counted as it arrives); a gRPC message
over ``services.server.SERVE_MAX_MESSAGE_BYTES`` is refused by the proxy (RESOURCE_EXHAUSTED) when the
process that started Ray called ``services.server.limit_proxy_messages`` first (``caspo serve``/``caspo up``
do; Ray's own default is 2 GiB). With ``$CASPO_AUTH_TOKEN`` set in the replicas' environment every
call but ``GET /healthz`` needs ``authorization: Bearer <token>`` (gRPC UNAUTHENTICATED / HTTP 401
without). A request past ``serve.request_timeout_s`` (or its gRPC deadline) is cancelled by Serve,
and its search stops at its next step.

Hot reload: each replica watches ``serve.policy_file`` (``runs/NAME/policy.json``, written by
``caspo loop`` when it publishes a policy) and loads the version it names in a thread while it keeps
answering; model calls already running finish on the weights they started with. Every response
carries the ``policy_version`` that wrote its last step (a search that spans a reload may have taken
its earlier steps from the previous version).
"""

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from ray import serve

from caspo.config import Config, ServeConfig, config_from_dict, load_config
from caspo.core.cat import METHODS, CommittedStep, Search, SearchConfig, SearchResult, stream_search
from caspo.core.confidence import SCORINGS
from caspo.models.base import prefix_text
from caspo.errors import BadRequest
from caspo.models.factory import make_backend
from caspo.models.worker import ModelWorker
from caspo.serve.grpc_proxy import UndecodableRequest
from caspo.services.security import UNAUTHENTICATED_MESSAGE, authorized
from caspo.tasks import get_task

log = logging.getLogger(__name__)

GRPC_SERVICER = "caspo.serve.grpc_proxy.add_CaTServicer_to_server"  # parse errors -> INVALID_ARGUMENT
DEPLOYMENT = "CaT"
MAX_BODY_BYTES = 1 << 20  # HTTP request bodies (a question is at most serve.max_question_chars)
PUBLIC_PATHS = frozenset({"/healthz"})  # reachable without the token (probes)


class Unauthenticated(PermissionError):
    """The call carried no or the wrong bearer token (gRPC UNAUTHENTICATED)."""

    def __reduce__(self):  # Ray pickles exceptions between the replica and the proxy
        return (Unauthenticated, self.args)


# ---- one request's parameters, checked the same way for gRPC and HTTP -----------------------------
class ParamError(BadRequest):
    """A request field out of its limits; ``field`` names it (HTTP 422 ``loc``, gRPC details)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # Ray pickles exceptions between the replica and the proxy
        return (ParamError, (self.field, self.message))


@dataclass(frozen=True)
class SolveParams:
    question: str
    search: SearchConfig
    with_tree: bool = False


def _number(field: str, value, lo, hi, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ParamError(field, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ParamError(field, "must be a number, got nan")
    if not lo <= value <= hi:
        raise ParamError(field, f"must be in [{lo}, {hi}], got {value}")
    return value


def parse_params(
    sv: ServeConfig,
    question: Any,
    method: Any = None,
    k: Any = None,
    tau: Any = None,
    max_steps: Any = None,
    temperature: Any = None,
    scoring: Any = None,
    seed: Any = None,
    with_tree: bool = False,
) -> SolveParams:
    """Fill defaults from ``serve.*`` and check every field against its limit (``ParamError``)."""
    if not isinstance(question, str):
        raise ParamError("question", f"must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ParamError("question", "is empty")
    if len(question) > sv.max_question_chars:
        raise ParamError("question", f"is {len(question)} characters; the limit is {sv.max_question_chars}")
    if "\x00" in question:
        raise ParamError("question", "contains a NUL character")
    method = sv.method if method is None else method
    if method not in METHODS:
        raise ParamError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    scoring = sv.scoring if scoring is None else scoring
    if scoring not in SCORINGS:
        raise ParamError("scoring", f"must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    k = _number("k", sv.k if k is None else k, 1, sv.max_k, integer=True)
    tau = float(_number("tau", sv.tau if tau is None else tau, 0.0, 1.0, integer=False))
    max_steps = _number("max_steps", sv.max_steps if max_steps is None else max_steps, 1, sv.max_max_steps, integer=True)
    temperature = float(_number("temperature", sv.temperature if temperature is None else temperature, 0.0, sv.max_temperature, integer=False))
    if seed is not None:
        seed = _number("seed", seed, -(2**63), 2**63 - 1, integer=True)
    if method == "greedy":
        k, temperature = 1, 0.0
    elif k > 1 and temperature == 0:  # SearchConfig's rule, answered with the field's name
        raise ParamError("temperature", f"must be > 0 for method {method} with k > 1 (the k samples would be identical)")
    cfg = SearchConfig(method=method, k=k, tau=tau, max_steps=max_steps, scoring=scoring, temperature=temperature, seed=seed)
    return SolveParams(question.strip(), cfg, bool(with_tree))


# ---- the search over a replica's model -------------------------------------------------------------
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


def result_dict(res: SearchResult, steps: list[CommittedStep], params: SolveParams, version: int, seconds: float) -> dict:
    """The JSON answer (``/v1/solve``, and ``caspo`` in chat completions); field names match cat.proto."""
    steps = [dict(s.__dict__) for s in steps]
    out = {
        "answer": res.answer,
        "has_answer": res.answer is not None,
        "reason": res.reason,
        "confidence": res.confidence,
        "entropy_confidence": res.entropy_confidence,
        "steps": steps,
        "policy_version": version,
        "method": res.method,
        "scoring": res.scoring,
        "k": params.search.k,
        "tau": params.search.tau,
        "steps_proposed": res.steps_proposed,
        "tokens_generated": res.tokens_generated,
        "branches_pruned": res.branches_pruned,
        "seconds": seconds,
    }
    if params.with_tree:
        out["tree"] = res.tree
    return out


def _step_proto(pb, s: CommittedStep):
    return pb.SolvedStep(index=s.index, text=s.text, confidence=s.confidence, cumulative=s.cumulative, mean_entropy=s.mean_entropy)


def _response_proto(pb, res: SearchResult, steps: list[CommittedStep], params: SolveParams, version: int, seconds: float):
    tree = [
        pb.TreeNode(id=i + 1, parent=n["parent"], step=n["step"], depth=n["depth"], c=n["c"], cumulative=n["C"], status=n["status"])
        for i, n in enumerate(res.tree)
    ]
    return pb.SolveResponse(
        answer=res.answer or "",
        has_answer=res.answer is not None,
        reason=res.reason,
        confidence=res.confidence,
        entropy_confidence=res.entropy_confidence,
        steps=[_step_proto(pb, s) for s in steps],
        policy_version=version,
        method=res.method,
        scoring=res.scoring,
        k=params.search.k,
        tau=params.search.tau,
        steps_proposed=res.steps_proposed,
        tokens_generated=res.tokens_generated,
        branches_pruned=res.branches_pruned,
        tree=tree,
        seconds=seconds,
    )


# ---- HTTP bodies -----------------------------------------------------------------------------------
class _Extensions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: StrictStr | None = None
    k: StrictInt | None = None
    tau: StrictFloat | StrictInt | None = None
    max_steps: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    scoring: StrictStr | None = None
    seed: StrictInt | None = None
    with_tree: StrictBool = False


class SolveBody(_Extensions):
    question: StrictStr


class ChatMessage(BaseModel):
    role: StrictStr
    content: StrictStr


class ChatBody(_Extensions):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (top_p, user, ...)

    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    n: StrictInt = 1
    stream: StrictBool = False
    max_tokens: StrictInt | None = None  # accepted and ignored: a step budget is max_steps


def _error_body(detail: list[dict]) -> dict:
    """FastAPI's ``detail`` list, plus the OpenAI-style ``error`` object OpenAI clients read."""
    first = detail[0]
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return {"detail": detail, "error": {"message": "; ".join(d["msg"] for d in detail), "type": "invalid_request_error", "param": param, "code": None}}


def _unprocessable(field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=422, content=_error_body([{"loc": ["body", field], "msg": message, "type": "value_error"}]))


api = FastAPI(title="caspo CaT", description="CaT inference (confidence-aware tree search) over HTTP")


class GuardMiddleware:
    """ASGI middleware in front of every route: the bearer token (when ``$CASPO_AUTH_TOKEN`` is set) and
    the body size limit. The body is read here first, counting as it arrives, so a chunked upload
    without a Content-Length cannot grow past the limit either; the app then reads it from memory."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if scope.get("path") not in PUBLIC_PATHS and not authorized(headers.get("authorization")):
            body = {"error": {"message": UNAUTHENTICATED_MESSAGE, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
            return await JSONResponse(status_code=401, content=body, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = self.max_body_bytes
        too_large = JSONResponse(status_code=413, content=_error_body([{"loc": ["body"], "msg": f"body: the request body is over the limit of {limit} bytes", "type": "too_large"}]))
        if headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")) > limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered():
            return replay.pop() if replay else await receive()

        await self.app(scope, buffered, send)


api.add_middleware(GuardMiddleware)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # FastAPI's 422, with each message naming its field (pydantic's messages alone do not)
    detail = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())]
        field = ".".join(x for x in loc if x != "body") or "body"
        detail.append({"loc": loc, "msg": f"{field}: {e.get('msg')}", "type": e.get("type")})
    return JSONResponse(status_code=422, content=_error_body(detail))


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class CaTServer:
    """One replica: a model, its micro-batching worker, and the policy watcher."""

    def __init__(self, cfg_dict: dict):
        import torch

        self.cfg: Config = config_from_dict(cfg_dict)
        sv = self.cfg.serve
        torch.set_num_threads(max(1, int(sv.num_cpus)))
        path, version = self.cfg.model.policy, 0
        published = self._published()
        if published is not None:
            version, path = published
        self.worker = ModelWorker(make_backend(self.cfg, path, version), batch_wait_ms=sv.batch_wait_ms)
        self.task = get_task(self.cfg.task.name, self.cfg.task.data)
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
        if not pf:
            return None
        try:
            info = json.loads(Path(pf).read_text())
            return int(info["version"]), str(info["path"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: %s", pf, e)
            return None

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
            except Exception as e:  # noqa: BLE001 - keep serving the weights we have
                self._failed = published
                self.reload_error = f"reloading v{version} from {path} failed: {e}"
                log.error(self.reload_error)

    # ---- the search --------------------------------------------------------------------------
    def _proposer(self) -> _RequestProposer:
        self._start_watcher()
        return _RequestProposer(self.worker, self.task.prompt, self.worker.delimiter)

    async def _events(self, params: SolveParams):
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
        async for ev in self._events(params):
            if not isinstance(ev, CommittedStep):
                final = ev
        return final

    # ---- gRPC (method names are the RPC names of caspo.v1.CaT) -------------------------------
    def _grpc_params(self, request, grpc_context) -> SolveParams:
        import grpc

        def opt(name):
            return getattr(request, name) if request.HasField(name) else None

        if not authorized(dict(grpc_context.invocation_metadata()).get("authorization")):
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details(UNAUTHENTICATED_MESSAGE)
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        try:
            if isinstance(request, UndecodableRequest):
                raise ParamError("request", f"does not parse as caspo.v1.SolveRequest: {request.error}")
            return parse_params(
                self.cfg.serve,
                request.question,
                method=opt("method"),
                k=opt("k"),
                tau=opt("tau"),
                max_steps=opt("max_steps"),
                temperature=opt("temperature"),
                scoring=opt("scoring"),
                seed=opt("seed"),
                with_tree=request.with_tree,
            )
        except BadRequest as e:
            # Serve answers with the code set on the context when the method then raises
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            raise

    async def Solve(self, request, grpc_context):  # noqa: N802 - the RPC's name
        from caspo.protos.v1 import cat_pb2

        params = self._grpc_params(request, grpc_context)
        res, steps, version, seconds = await self.solve(params)
        return _response_proto(cat_pb2, res, steps, params, version, seconds)

    async def SolveStream(self, request, grpc_context):  # noqa: N802 - the RPC's name
        from caspo.protos.v1 import cat_pb2

        params = self._grpc_params(request, grpc_context)
        async for ev in self._events(params):
            if isinstance(ev, CommittedStep):
                yield cat_pb2.SolveEvent(step=_step_proto(cat_pb2, ev))
            else:
                res, steps, version, seconds = ev
                yield cat_pb2.SolveEvent(result=_response_proto(cat_pb2, res, steps, params, version, seconds))

    # ---- HTTP --------------------------------------------------------------------------------
    def _http_params(self, question, body: _Extensions) -> SolveParams:
        return parse_params(
            self.cfg.serve,
            question,
            method=body.method,
            k=body.k,
            tau=body.tau,
            max_steps=body.max_steps,
            temperature=body.temperature,
            scoring=body.scoring,
            seed=body.seed,
            with_tree=body.with_tree,
        )

    @api.post("/v1/solve")
    async def http_solve(self, body: SolveBody):
        try:
            params = self._http_params(body.question, body)
        except ParamError as e:
            return _unprocessable(e.field, str(e))
        res, steps, version, seconds = await self.solve(params)
        return result_dict(res, steps, params, version, seconds)

    @api.post("/v1/solve/stream")
    async def http_solve_stream(self, body: SolveBody):
        """NDJSON: one {"step": ...} line per committed step, then {"result": ...}."""
        try:
            params = self._http_params(body.question, body)
        except ParamError as e:
            return _unprocessable(e.field, str(e))

        async def lines():
            async for ev in self._events(params):
                if isinstance(ev, CommittedStep):
                    yield json.dumps({"step": ev.__dict__}) + "\n"
                else:
                    res, steps, version, seconds = ev
                    yield json.dumps({"result": result_dict(res, steps, params, version, seconds)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody):
        if body.model != self.model_id:
            return JSONResponse(status_code=404, content={"error": {"message": f"model {body.model!r} is not served here; GET /v1/models lists {self.model_id!r}", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        if body.stream:
            return _unprocessable("stream", "must be false: stream steps with POST /v1/solve/stream or gRPC SolveStream")
        if body.n != 1:
            return _unprocessable("n", f"must be 1 (one answer per request; use method sc or k for more samples), got {body.n}")
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            return _unprocessable("messages", "must contain a message with role 'user' (the question)")
        try:
            params = self._http_params(users[-1], body)
        except ParamError as e:
            return _unprocessable("messages" if e.field == "question" else e.field, str(e).replace("question", "the last user message", 1) if e.field == "question" else str(e))
        res, steps, version, seconds = await self.solve(params)
        caspo = result_dict(res, steps, params, version, seconds)
        content = "\n".join(res.steps) if res.answer is not None else "\n".join([*res.steps, f"({res.reason})"])
        prompt_tokens = len(self.worker.backend.tokenizer(self.task.prompt(params.question))["input_ids"]) if hasattr(self.worker.backend, "tokenizer") else 0
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": res.tokens_generated, "total_tokens": prompt_tokens + res.tokens_generated},
            "caspo": caspo,
        }

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "caspo", "policy_version": self.worker.version}]}

    @api.get("/healthz")
    async def healthz(self):
        self._start_watcher()
        return {
            "status": "ok",
            "policy_version": self.worker.version,
            "policy_path": self.worker.path,
            "reload_error": self.reload_error,
            "model_calls": self.worker.backend_calls,  # batched model calls so far
            "proposals_waiting": self.worker.in_flight,  # searches waiting on a model call right now
        }

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
        ray_actor_options={"num_cpus": sv.num_cpus, "num_gpus": sv.num_gpus},
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
