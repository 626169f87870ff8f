"""Clients of the CaT Serve application: gRPC (streaming) and HTTP, as ``caspo solve`` uses them.

    for event in solve_grpc("127.0.0.1:9000", "12+7*3", method="cat", k=10):   # steps, then the result
        ...
    result = solve_http("http://127.0.0.1:8000", "12+7*3", k=10)

Both send ``authorization: Bearer $CASPO_AUTH_TOKEN`` when that variable is set, and both retry (up
to ``retries`` times) a request that failed because no replica could take it or its replica died
under it (:func:`replica_lost`): a request is a seeded search, so asking again is safe. A stream is
retried only before its first event arrived. Serve's gRPC proxy speaks plaintext; put TLS in front
of it (an ingress) when the network is not trusted.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Iterator

import grpc
from google.protobuf.json_format import MessageToDict

from caspo.protos.v1 import cat_pb2, cat_pb2_grpc
from caspo.services.security import auth_metadata

FIELDS = ("method", "k", "tau", "max_steps", "temperature", "scoring", "seed", "branching", "branch_threshold")


RETRY_WAIT_S = 0.2
# Ray Serve's message when the replica running a request died (it answers gRPC INTERNAL / HTTP 500)
_REPLICA_DIED = "The actor died"


class SolveError(RuntimeError):
    """The server refused the request (bad input, unavailable); the message is the server's."""


def replica_lost(status: str, details: str) -> bool:
    """Whether a failed request may be sent again: no replica could take it (UNAVAILABLE / 503), or
    the replica running it died (Serve reports that as INTERNAL / 500 with Ray's actor-died message)."""
    if status in ("UNAVAILABLE", "503"):
        return True
    return status in ("INTERNAL", "500") and _REPLICA_DIED in (details or "")


def solve_grpc(address: str, question: str, timeout: float = 120.0, app: str = "caspo", retries: int = 2, **params) -> Iterator[dict]:
    """Yield ``{"step": {...}}`` for each committed step, then ``{"result": {...}}`` (SolveStream)."""
    req = cat_pb2.SolveRequest(question=question, **{k: v for k, v in params.items() if v is not None and k in FIELDS})
    with grpc.insecure_channel(address) as channel:
        stub = cat_pb2_grpc.CaTStub(channel)
        for attempt in range(retries + 1):
            sent = False
            try:
                for ev in stub.SolveStream(req, timeout=timeout, metadata=(("application", app), *auth_metadata())):
                    kind = ev.WhichOneof("event")
                    out = MessageToDict(getattr(ev, kind), preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                    if "policy_version" in out:  # JSON mapping writes int64 as a string
                        out["policy_version"] = int(out["policy_version"])
                    sent = True
                    yield {kind: out}
                return
            except grpc.RpcError as e:
                if sent or attempt == retries or not replica_lost(e.code().name, e.details()):
                    raise SolveError(f"{e.code().name}: {e.details()}") from e
                time.sleep(RETRY_WAIT_S)


def solve_http(url: str, question: str, timeout: float = 120.0, retries: int = 2, **params) -> dict:
    """POST /v1/solve and return the JSON answer."""
    body = {"question": question, **{k: v for k, v in params.items() if v is not None and k in FIELDS}}
    req = urllib.request.Request(url.rstrip("/") + "/v1/solve", data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **dict(auth_metadata())})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            if attempt < retries and replica_lost(str(e.code), raw):
                time.sleep(RETRY_WAIT_S)
                continue
            _raise_http(e, raw)
        except urllib.error.URLError as e:
            raise SolveError(f"cannot reach {url}: {e.reason}") from e


def _raise_http(e, raw: str):
    try:
        detail = json.loads(raw).get("detail", raw)
        if isinstance(detail, list):
            detail = "; ".join(d.get("msg", str(d)) for d in detail)
    except (ValueError, AttributeError):
        detail = raw
    raise SolveError(f"HTTP {e.code}: {detail}") from e
