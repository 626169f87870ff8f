"""CaT over HTTP: the FastAPI app Serve's ingress runs on every replica — its routes, the guard
middleware (bearer token, body size) and the error bodies.

Routes reach their replica (``caspo.serve.deployment.CaTServer``) through Serve's replica context,
parse the body into parameters (params.py), run the search on the replica and encode the answer
(protocol.py):

* ``POST /v1/solve`` — JSON in, the fields of ``SolveResponse`` out; ``POST /v1/solve/stream`` — NDJSON,
  a ``{"step": ...}`` line per committed step, then ``{"result": ...}``;
* ``POST /v1/chat/completions`` — OpenAI-compatible; the question is the last user message; with
  ``stream: true``, server-sent ``chat.completion.chunk`` events, one per committed step;
* ``GET /v1/models``; ``GET /healthz`` (no token needed: probes).

Bad input gets 422 naming the field (FastAPI's ``detail`` plus the OpenAI-style ``error`` object); a
body over ``MAX_BODY_BYTES`` gets 413, counted as it arrives.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from caspo.core.cat import CommittedStep
from caspo.serve.params import params_from_body
from caspo.serve.proxy import ParamError
from caspo.serve.protocol import ChatBody, SolveBody, chat_chunk, chat_completion, models_list, result_json, step_json
from caspo.services.security import UNAUTHENTICATED_MESSAGE, authorized

# A transport size like the gRPC message limits (services/server.py): a question is at most
# serve.max_question_chars, so 1 MiB is far more than any good request.
MAX_BODY_BYTES = 1 << 20
PUBLIC_PATHS = frozenset({"/healthz"})  # reachable without the token (probes)

api = FastAPI(title="caspo CaT", description="CaT inference (confidence-aware tree search) over HTTP")


def replica():
    """The CaT replica serving this request (a FastAPI dependency)."""
    return serve.get_replica_context().servable_object


# ---- errors ----------------------------------------------------------------------------------------
def error_body(detail: list[dict]) -> dict:
    """FastAPI's ``detail`` list, plus the OpenAI-style ``error`` object OpenAI clients read."""
    first = detail[0]
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return {"detail": detail, "error": {"message": "; ".join(d["msg"] for d in detail), "type": "invalid_request_error", "param": param, "code": None}}


def unprocessable(field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=422, content=error_body([{"loc": ["body", field], "msg": message, "type": "value_error"}]))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    # FastAPI's 422, with each message naming its field (pydantic's messages alone do not)
    detail = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())]
        field = ".".join(x for x in loc if x != "body") or "body"
        detail.append({"loc": loc, "msg": f"{field}: {e.get('msg')}", "type": e.get("type")})
    return JSONResponse(status_code=422, content=error_body(detail))


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
        too_large = JSONResponse(status_code=413, content=error_body([{"loc": ["body"], "msg": f"body: the request body is over the limit of {limit} bytes", "type": "too_large"}]))
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


# ---- routes ----------------------------------------------------------------------------------------
@api.post("/v1/solve")
async def solve(body: SolveBody, cat=Depends(replica)):
    try:
        params = params_from_body(cat.cfg.serve, body.question, body, cat.question_of, **cat.search_defaults())
    except ParamError as e:
        return unprocessable(e.field, str(e))
    res, steps, version, seconds = await cat.solve(params)
    return result_json(res, steps, params, version, seconds)


@api.post("/v1/solve/stream")
async def solve_stream(body: SolveBody, cat=Depends(replica)):
    """NDJSON: one {"step": ...} line per committed step, then {"result": ...}."""
    try:
        params = params_from_body(cat.cfg.serve, body.question, body, cat.question_of, **cat.search_defaults())
    except ParamError as e:
        return unprocessable(e.field, str(e))

    async def lines():
        async for ev in cat.events(params):
            if isinstance(ev, CommittedStep):
                yield json.dumps({"step": step_json(ev)}) + "\n"
            else:
                res, steps, version, seconds = ev
                yield json.dumps({"result": result_json(res, steps, params, version, seconds)}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, cat=Depends(replica)):
    if body.model != cat.model_id:
        return JSONResponse(status_code=404, content={"error": {"message": f"model {body.model!r} is not served here; GET /v1/models lists {cat.model_id!r}", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
    if body.n != 1:
        return unprocessable("n", f"must be 1 (one answer per request; use method sc or k for more samples), got {body.n}")
    users = [m.content for m in body.messages if m.role == "user"]
    if not users:
        return unprocessable("messages", "must contain a message with role 'user' (the question)")
    try:
        params = params_from_body(cat.cfg.serve, users[-1], body, cat.question_of, **cat.search_defaults())
    except ParamError as e:
        if e.field == "question":  # the question is the last user message here
            return unprocessable("messages", str(e).replace("question", "the last user message", 1))
        return unprocessable(e.field, str(e))
    delimiter = cat.prompter.delimiter
    if body.stream:
        return StreamingResponse(_chat_events(cat, params, delimiter), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    res, steps, version, seconds = await cat.solve(params)
    return chat_completion(cat.model_id, res, result_json(res, steps, params, version, seconds), cat.prompt_tokens(params.question), delimiter)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _chat_events(cat, params, delimiter: str):
    """Server-sent events of a streamed chat completion: a first chunk with the role, one chunk per
    committed step (its text, after the step delimiter from the second on), then the last chunk with
    ``finish_reason`` and the ``caspo`` answer object (and usage), then ``data: [DONE]``. The deltas add
    up to the non-streamed message."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    yield _sse(chat_chunk(cid, created, cat.model_id, {"role": "assistant", "content": ""}))
    async for ev in cat.events(params):
        if isinstance(ev, CommittedStep):
            text = ev.text if ev.index == 0 else delimiter + ev.text
            yield _sse(chat_chunk(cid, created, cat.model_id, {"content": text}))
            continue
        res, steps, version, seconds = ev
        tail = "" if res.answer is not None else (delimiter if steps else "") + f"({res.reason})"
        prompt_tokens = cat.prompt_tokens(params.question)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": res.tokens_generated, "total_tokens": prompt_tokens + res.tokens_generated}
        answer = result_json(res, steps, params, version, seconds)
        yield _sse(chat_chunk(cid, created, cat.model_id, {"content": tail} if tail else {}, "stop", caspo=answer, usage=usage))
    yield "data: [DONE]\n\n"


@api.get("/v1/models")
async def models(cat=Depends(replica)):
    return models_list(cat.model_id, cat.worker.version)


@api.get("/healthz")
async def healthz(cat=Depends(replica)):
    return cat.health()
