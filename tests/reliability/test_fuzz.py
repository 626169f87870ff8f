"""Property-based fuzzing (hypothesis) of every gRPC method and HTTP endpoint, on the real mesh and the
real Serve app in one local Ray (2 CPUs), with the bearer token on as in the k8s overlays.

Requests are built from each method's protobuf descriptor: every field gets empty, huge, unicode,
NUL-containing and out-of-range values, lists of any length, nested messages; raw random bytes and
well-formed messages with non-UTF-8 bytes in a string field are sent too. The property: every call
ends in a clean status (OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED) within its deadline —
never INTERNAL/UNKNOWN (a crash), DEADLINE_EXCEEDED (a hang) or UNAVAILABLE (a dead service) — and
HTTP never answers 5xx. The services' resident memory stays within a bound over the whole run.

The service limits are set low here (a few prompts, k <= 4) so that a valid fuzzed request is cheap;
what is fuzzed is the checking, which is the same at any limit. Fast mode: 25 examples per method;
``--long``: 300.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caspo.netutil import free_port
from caspo.config import load_config
from caspo.protos.v1 import cat_pb2, critic_pb2, generator_pb2, mesh_pb2, pair_store_pb2, scorer_pb2
from tests.ray_actors import alive_actor_pids

pytestmark = [
    pytest.mark.skipif(
        not any(os.access(os.path.join(p, "redis-server"), os.X_OK) for p in os.environ["PATH"].split(":")),
        reason="redis-server is not installed",
    ),
    pytest.mark.timeout(3600),  # 300 examples of a method in long mode can take more than the default 600 s
]

TOKEN = "fuzz-token-1d9c"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
RSS_GROWTH_LIMIT = 300 * 2**20  # bytes per process over the whole fuzz run
CALL_DEADLINE_S = 90.0


def _examples(long_mode: bool) -> int:
    return 300 if long_mode else 25



def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """The mesh (its own Ray, Redis, registry, four services) and the CaT Serve app on that Ray."""
    import ray
    from ray import serve

    from caspo.serve.deployment import build_app, serve_options
    from caspo.mesh.runner import MeshRunner

    env = pytest.MonkeyPatch()
    env.setenv("CASPO_AUTH_TOKEN", TOKEN)  # inherited by every Ray worker started from here on
    root = tmp_path_factory.mktemp("fuzz")
    cfg = load_config(
        None,
        [
            f"mesh.run_dir={root}/mesh",
            "mesh.num_cpus=2",
            "mesh.namespace=caspo-fuzz",
            "generator.max_k=4",
            "generator.max_prompts=4",
            "generator.max_steps=3",
            "generator.max_prompt_chars=2000",
            "scorer.max_items=8",
            "critic.max_items=8",
            "model.max_step_tokens=16",
            f"serve.http_port={free_port()}",
            f"serve.grpc_port={free_port()}",
            f"serve.policy_file={root}/policy.json",
            "serve.max_k=3",
            "serve.k=2",
            "cat.k=2",
            "cat.max_steps=3",
            "serve.max_steps=3",
            "serve.max_max_steps=4",
            "serve.request_timeout_s=60",
        ],
    )
    runner = MeshRunner(cfg)
    try:
        runner.start(progress=False)
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        procs = {name: ray.get(actor.pid.remote()) for name, actor in runner.actors.items()}
        procs.update({f"replica{i}": p for i, p in enumerate(alive_actor_pids("ReplicaActor"))})
        procs.update({f"serve{i}": p for i, p in enumerate(alive_actor_pids("ServeReplica:caspo:CaT"))})
        procs.update({f"proxy{i}": p for i, p in enumerate(alive_actor_pids("ProxyActor"))})
        system = {"cfg": cfg, "runner": runner, "procs": procs, "rss": {}}
        _warm_up(system)  # memory is compared with the processes after they served their first calls
        system["rss"] = {name: _rss(pid) for name, pid in procs.items()}
        yield system
    finally:
        serve.shutdown()
        runner.stop()
        if ray.is_initialized():
            ray.shutdown()
        env.undo()


# ---- requests from descriptors -----------------------------------------------------------------------
TEXT = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.sampled_from(["12+7*3", "cat", "greedy", "sc", "bon", "entropy", "logprob", "incorrect", "correct_unsure", "trajectory", "trainer", "tiny", "/", ".", "0-0", "1700000000000-0", "#### 5", "a\x00b", "😀" * 3]),
    st.integers(100, 40_000).map(lambda n: "9" * n),  # past every text limit
)
INT64 = st.one_of(st.integers(-3, 40), st.integers(-(2**63), 2**63 - 1))
INT32 = st.one_of(st.integers(-3, 40), st.integers(-(2**31), 2**31 - 1))
FLOAT = st.one_of(st.floats(-3, 3, width=32), st.floats(width=32, allow_nan=True, allow_infinity=True))


def _field(fd, depth: int):
    if fd.type == F.TYPE_MESSAGE:
        one = message_strategy(fd.message_type, depth + 1) if depth < 3 else st.just(message_factory.GetMessageClass(fd.message_type)())
    elif fd.type == F.TYPE_STRING:
        one = TEXT
    elif fd.type == F.TYPE_BOOL:
        one = st.booleans()
    elif fd.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        one = INT64
    elif fd.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        one = INT32
    elif fd.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        one = FLOAT
    else:
        raise AssertionError(f"no strategy for field {fd.full_name} of type {fd.type}")
    if fd.is_repeated:
        return st.lists(one, max_size=6)
    return st.one_of(st.none(), one)  # None: leave the field unset


def message_strategy(desc, depth: int = 0):
    cls = message_factory.GetMessageClass(desc)
    return st.fixed_dictionaries({fd.name: _field(fd, depth) for fd in desc.fields}).map(
        lambda kw: cls(**{k: v for k, v in kw.items() if v is not None})
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bad_utf8(desc):
    """A well-formed message whose string field (top level) holds bytes that are not UTF-8."""
    strings = [fd for fd in desc.fields if fd.type == F.TYPE_STRING]
    if not strings:
        return st.nothing()
    return st.tuples(message_strategy(desc), st.sampled_from(strings), st.binary(min_size=1, max_size=8)).map(
        lambda t: t[0].SerializeToString() + _varint(t[1].number << 3 | 2) + _varint(len(b"\xff" + t[2])) + b"\xff" + t[2]
    )


def request_bytes(desc):
    return st.one_of(
        message_strategy(desc).map(lambda m: m.SerializeToString()),
        _bad_utf8(desc),
        st.binary(max_size=256),  # whatever this parses as, if it parses
    )


# ---- every gRPC method ---------------------------------------------------------------------------------
MESH_METHODS = [
    (svc_name, module.DESCRIPTOR.services_by_name[service].methods_by_name[m])
    for svc_name, module, service, methods in [
        ("generator", generator_pb2, "Generator", ("ProposeSteps", "Rollout", "Reload")),
        ("scorer", scorer_pb2, "ConfidenceScorer", ("Score", "Reload")),
        ("critic", critic_pb2, "Critic", ("Judge",)),
        ("pair_store", pair_store_pb2, "PairStore", ("Put", "Read", "Ack", "Stats")),
        ("registry", mesh_pb2, "Mesh", ("Health", "Registry")),
        ("generator", mesh_pb2, "Mesh", ("Health",)),
    ]
    for m in methods
]
SERVE_METHODS = [cat_pb2.DESCRIPTOR.services_by_name["CaT"].methods_by_name[m] for m in ("Solve", "SolveStream")]


def _address(system, svc: str) -> str:
    runner = system["runner"]
    return runner.registry_address if svc == "registry" else runner.addresses[svc]


def _call(address: str, method, payload: bytes, metadata=AUTH) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 2**20)]) as ch:
        try:
            if method.server_streaming:
                for _ in ch.unary_stream(path)(payload, timeout=CALL_DEADLINE_S, metadata=metadata):
                    pass
            else:
                ch.unary_unary(path)(payload, timeout=CALL_DEADLINE_S, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert e.code() in CLEAN, f"{path}: {e.code().name}: {e.details()}"
            return e.code()


def _warm_up(system) -> None:
    """One well-formed call to every method and endpoint, so first-call allocations are not counted."""
    from caspo.mesh.client import MeshClient

    import asyncio

    async def mesh_calls():
        client = MeshClient(system["runner"].registry_address)
        try:
            await client.propose(["Question: 12+7*3\nAnswer:\n"], 2, 0.7, [1])
            await client.score(["Question: 12+7*3\nAnswer:\n"], ["7*3=21"])
            await client.judge([("", "12+7*3", [], "7*3=21")])
            await client.stats()
        finally:
            await client.close()

    asyncio.run(mesh_calls())
    md = (("application", "caspo"), *AUTH)
    req = cat_pb2.SolveRequest(question="12+7*3", method="cat", k=2).SerializeToString()
    for method in SERVE_METHODS:
        assert _call(f"127.0.0.1:{system['cfg'].serve.grpc_port}", method, req, metadata=md) == grpc.StatusCode.OK
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    for method, path in ENDPOINTS:
        body = json.dumps({"question": "12+7*3", "model": "caspo-arith", "messages": [{"role": "user", "content": "12+7*3"}]}).encode()
        _http(system, method, path, body if method == "POST" else None, headers)


@pytest.mark.parametrize("svc,method", MESH_METHODS, ids=[f"{s}.{m.name}" for s, m in MESH_METHODS])
def test_mesh_method_answers_every_input_cleanly(system, svc, method, long_mode):
    address = _address(system, svc)

    @settings(max_examples=_examples(long_mode), deadline=None, derandomize=not long_mode, suppress_health_check=list(HealthCheck))
    @given(payload=request_bytes(method.input_type))
    def check(payload):
        _call(address, method, payload)

    check()
    # still serving: a well-formed call afterwards is answered
    assert _call(_address(system, "registry"), mesh_pb2.DESCRIPTOR.services_by_name["Mesh"].methods_by_name["Health"], b"") == grpc.StatusCode.OK


@pytest.mark.parametrize("method", SERVE_METHODS, ids=[m.name for m in SERVE_METHODS])
def test_serve_method_answers_every_input_cleanly(system, method, long_mode):
    address = f"127.0.0.1:{system['cfg'].serve.grpc_port}"

    @settings(max_examples=_examples(long_mode), deadline=None, derandomize=not long_mode, suppress_health_check=list(HealthCheck))
    @given(payload=request_bytes(method.input_type))
    def check(payload):
        _call(address, method, payload, metadata=(("application", "caspo"), *AUTH))

    check()
    ok = cat_pb2.SolveRequest(question="12+7*3", method="greedy").SerializeToString()
    assert _call(address, SERVE_METHODS[0], ok, metadata=(("application", "caspo"), *AUTH)) == grpc.StatusCode.OK


def test_oversized_messages_are_refused_and_the_services_keep_serving(system):
    health = mesh_pb2.DESCRIPTOR.services_by_name["Mesh"].methods_by_name["Health"]
    for svc, method in MESH_METHODS:
        big = pair_store_pb2.Pair(prompt="x" * (17 * 2**20)).SerializeToString()  # over the mesh's 16 MiB
        assert _call(_address(system, svc), method, big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    serve_addr = f"127.0.0.1:{system['cfg'].serve.grpc_port}"
    big = cat_pb2.SolveRequest(question="1+" * 2**20).SerializeToString()  # over Serve's 1 MiB
    md = (("application", "caspo"), *AUTH)
    assert _call(serve_addr, SERVE_METHODS[0], big, metadata=md) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for svc in ("generator", "scorer", "critic", "pair_store", "registry"):
        assert _call(_address(system, svc), health, b"") == grpc.StatusCode.OK


# ---- auth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)], ids=["none", "wrong", "no-scheme"])
def test_every_grpc_method_refuses_a_call_without_the_token(system, metadata):
    for svc, method in MESH_METHODS:
        path = f"/{method.containing_service.full_name}/{method.name}"
        with grpc.insecure_channel(_address(system, svc)) as ch, pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(path)(b"", timeout=10, metadata=metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
    serve_addr = f"127.0.0.1:{system['cfg'].serve.grpc_port}"
    req = cat_pb2.SolveRequest(question="12+7*3", method="greedy").SerializeToString()
    for method in SERVE_METHODS:
        with pytest.raises(AssertionError, match="UNAUTHENTICATED"):
            _call(serve_addr, method, req, metadata=(("application", "caspo"), *metadata))


# ---- HTTP ----------------------------------------------------------------------------------------------
ENDPOINTS = [("POST", "/v1/solve"), ("POST", "/v1/solve/stream"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/healthz")]
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
FIELDS = {
    "question": TEXT,
    "method": TEXT,
    "k": st.one_of(INT64, FLOAT, TEXT),
    "tau": st.one_of(FLOAT, INT64, TEXT),
    "max_steps": st.one_of(INT64, TEXT),
    "temperature": st.one_of(FLOAT, INT64),
    "scoring": TEXT,
    "seed": st.one_of(INT64, st.integers(-(2**70), 2**70)),
    "branching": st.one_of(TEXT, st.sampled_from(["always", "adaptive"])),
    "branch_threshold": st.one_of(FLOAT, INT64, TEXT),
    "with_tree": st.one_of(st.booleans(), INT64),
    "model": st.one_of(TEXT, st.just("caspo-arith")),
    "messages": st.lists(st.fixed_dictionaries({"role": st.one_of(st.just("user"), TEXT), "content": TEXT}), max_size=3),
    "n": INT64,
    "stream": st.booleans(),
}
BODY = st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None)).flatmap(
        lambda d: st.fixed_dictionaries({k: FIELDS[k] for k in d})
    ).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=256),
    st.just(b"\xff\xfe{\"question\": \"\xff\"}"),
)


def _http(system, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", system["cfg"].serve.http_port, timeout=CALL_DEADLINE_S)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method,path", ENDPOINTS, ids=[p for _, p in ENDPOINTS])
def test_http_endpoint_answers_every_input_without_5xx(system, method, path, long_mode):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}

    @settings(max_examples=_examples(long_mode), deadline=None, derandomize=not long_mode, suppress_health_check=list(HealthCheck))
    @given(body=BODY)
    def check(body):
        status, raw = _http(system, method, path, body if method == "POST" else None, headers)
        assert status < 500, (status, raw[:500])
        if status == 200 and path == "/v1/solve/stream":
            for line in raw.splitlines():  # every NDJSON line parses
                json.loads(line)
        elif status in (401, 404, 413, 422):
            json.loads(raw)  # errors are JSON too

    check()
    assert _http(system, "GET", "/healthz", None, {})[0] == 200


def test_http_auth_and_body_limit(system):
    solve = json.dumps({"question": "12+7*3", "method": "greedy"}).encode()
    for method, path in ENDPOINTS:
        body = solve if method == "POST" else None
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, raw = _http(system, method, path, body, {"Content-Type": "application/json", **headers})
            assert status == (200 if path == "/healthz" else 401), (path, headers, status)
            if status == 401:
                assert "bearer token" in json.loads(raw)["error"]["message"]
    ok = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    status, raw = _http(system, "POST", "/v1/solve", solve, ok)
    assert status == 200 and json.loads(raw)["has_answer"] is True
    big = json.dumps({"question": "1+" * (2**20)}).encode()
    status, raw = _http(system, "POST", "/v1/solve", big, ok)
    assert status == 413 and "limit of 1048576 bytes" in json.loads(raw)["error"]["message"]
    # chunked: no Content-Length, the body is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", system["cfg"].serve.http_port, timeout=CALL_DEADLINE_S)
    try:
        conn.request("POST", "/v1/solve", body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]), headers=ok, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()[:300]
    finally:
        conn.close()


def test_memory_stays_bounded_over_the_fuzz_run(system):
    """Runs last in this module: the resident memory of every service, replica and proxy process."""
    before = system["rss"]
    assert before, "no fuzz test ran before this one"
    growth = {name: _rss(pid) - before[name] for name, pid in system["procs"].items() if Path(f"/proc/{pid}").exists()}
    print("\nRSS growth over the fuzz run (MiB): " + ", ".join(f"{n} {g / 2**20:+.0f}" for n, g in sorted(growth.items())))
    assert set(growth) == set(before), "a process died during the fuzz run"
    assert all(g < RSS_GROWTH_LIMIT for g in growth.values()), growth
