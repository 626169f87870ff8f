"""Clients of the CaT Serve application: gRPC (streaming) and HTTP, as ``caspo solve`` uses them.

    for event in solve_grpc("127.0.0.1:9000", "12+7*3", method="cat", k=10):   # steps, then the result
        ...
    result = solve_http("http://127.0.0.1:8000", "12+7*3", k=10)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator

FIELDS = ("method", "k", "tau", "max_steps", "temperature", "scoring", "seed")


class SolveError(RuntimeError):
    """The server refused the request (bad input, unavailable); the message is the server's."""


def solve_grpc(address: str, question: str, timeout: float = 120.0, app: str = "caspo", **params) -> Iterator[dict]:
    """Yield ``{"step": {...}}`` for each committed step, then ``{"result": {...}}`` (SolveStream)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from caspo.protos.v1 import cat_pb2, cat_pb2_grpc

    req = cat_pb2.SolveRequest(question=question, **{k: v for k, v in params.items() if v is not None and k in FIELDS})
    with grpc.insecure_channel(address) as channel:
        stub = cat_pb2_grpc.CaTStub(channel)
        try:
            for ev in stub.SolveStream(req, timeout=timeout, metadata=(("application", app),)):
                kind = ev.WhichOneof("event")
                out = MessageToDict(getattr(ev, kind), preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                if "policy_version" in out:  # JSON mapping writes int64 as a string
                    out["policy_version"] = int(out["policy_version"])
                yield {kind: out}
        except grpc.RpcError as e:
            raise SolveError(f"{e.code().name}: {e.details()}") from e


def solve_http(url: str, question: str, timeout: float = 120.0, **params) -> dict:
    """POST /v1/solve and return the JSON answer."""
    body = {"question": question, **{k: v for k, v in params.items() if v is not None and k in FIELDS}}
    req = urllib.request.Request(url.rstrip("/") + "/v1/solve", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            detail = json.loads(raw).get("detail", raw)
            if isinstance(detail, list):
                detail = "; ".join(d.get("msg", str(d)) for d in detail)
        except (ValueError, AttributeError):
            detail = raw
        raise SolveError(f"HTTP {e.code}: {detail}") from e
    except urllib.error.URLError as e:
        raise SolveError(f"cannot reach {url}: {e.reason}") from e
