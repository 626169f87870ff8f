"""CaT over HTTP: the FastAPI app Serve's ingress runs on every replica — its routes, the guard
middleware (bearer token, body size) and the error bodies.

Routes reach their replica's ``CaTService`` (service.py, the one the gRPC methods call too) through
Serve's replica context, have it parse the body and run the search, and encode the answer (encoders.py):

* ``POST /v1/solve`` — JSON in, the fields of ``SolveResponse`` out; ``POST /v1/solve/stream`` — NDJSON,
  a ``{"step": ...}`` line per committed step, then ``{"result": ...}``;
* ``POST /v1/chat/completions`` — OpenAI-compatible; the question is the last user message; with
  ``stream: true``, server-sent ``chat.completion.chunk`` events, one per committed step;
* ``GET /v1/models``; ``GET /healthz`` (no token needed: probes);
* ``GET /ui``: a page that draws a question's search tree as it grows (tree_page.py; its static files need
  no token, its calls to the API do).

Bad input gets 422 naming the field (FastAPI's ``detail`` plus the OpenAI-style ``error`` object); a
body over ``MAX_BODY_BYTES`` gets 413, counted as it arrives.
"""

from __future__ import annotations

import json

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from caspo.core.search import CommittedStep, TreeUpdate
from caspo.serve.encoders import result_json, search_json, step_json, tree_json
from caspo.serve.request_errors import ModelNotFound, ParamError
from caspo.serve.schemas import ChatBody, SolveBody, StreamBody
from caspo.serve.service import CaTService
from caspo.serve.tree_page import PAGE_PATHS, page
from caspo.services.security import UNAUTHENTICATED_MESSAGE, authorized

# A transport size like the gRPC message limits (services/server.py): a question is at most
# serve.max_question_chars, so 1 MiB is far more than any good request.
MAX_BODY_BYTES = 1 << 20
PUBLIC_PATHS = frozenset({"/healthz", *PAGE_PATHS})  # reachable without the token (probes; the page's static files)

api = FastAPI(title="caspo CaT", description="CaT inference (confidence-aware tree search) over HTTP")


def service() -> CaTService:
    """The CaT service of the replica serving this request (a FastAPI dependency)."""
    return serve.get_replica_context().servable_object.service


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
api.include_router(page)  # GET /ui: the CaT tree page (tree_page.py)


# ---- routes: each parses its body, asks the replica's CaTService and encodes the answer ---------------
def _unprocessable(e: ParamError) -> JSONResponse:
    return unprocessable(e.field, e.text)


@api.post("/v1/solve")
async def solve(body: SolveBody, cat: CaTService = Depends(service)):
    try:
        params = cat.solve_params(body.question, body)
    except ParamError as e:
        return _unprocessable(e)
    res, steps, version, seconds = await cat.solve(params)
    return result_json(res, steps, params, version, seconds)


@api.post("/v1/solve/stream")
async def solve_stream(body: StreamBody, cat: CaTService = Depends(service)):
    """NDJSON: one {"step": ...} line per committed step, then {"result": ...}. With ``tree_events``:
    first {"search": ...} (the search's resolved fields), and {"tree": [nodes]} after each model call
    that changed the tree (new or changed nodes; the page at /ui draws them)."""
    try:
        params = cat.solve_params(body.question, body)
    except ParamError as e:
        return _unprocessable(e)

    async def lines():
        if body.tree_events:
            yield json.dumps({"search": search_json(params.search)}) + "\n"
        async for ev in cat.events(params, tree_events=body.tree_events):
            if isinstance(ev, CommittedStep):
                yield json.dumps({"step": step_json(ev)}) + "\n"
            elif isinstance(ev, TreeUpdate):
                yield json.dumps({"tree": tree_json(ev)}) + "\n"
            else:
                res, steps, version, seconds = ev
                yield json.dumps({"result": result_json(res, steps, params, version, seconds)}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@api.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, cat: CaTService = Depends(service)):
    try:
        params = cat.chat_params(body)
    except ModelNotFound as e:
        return JSONResponse(status_code=404, content={"error": {"message": str(e), "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
    except ParamError as e:
        return _unprocessable(e)
    if body.stream:
        return StreamingResponse(_sse(cat.stream_chat(params)), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await cat.chat(params)


async def _sse(chunks):
    """Server-sent events: one ``data:`` event per chunk, then ``data: [DONE]``."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


@api.get("/v1/models")
async def models(cat: CaTService = Depends(service)):
    return cat.models()


@api.get("/healthz")
async def healthz(cat: CaTService = Depends(service)):
    return cat.health()
