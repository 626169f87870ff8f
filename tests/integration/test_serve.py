"""CaT on a real Ray Serve (local Ray, 2 CPUs) with the tiny model: gRPC, HTTP, OpenAI, bad input, reload."""

import concurrent.futures as cf
import json
import shutil
import time
import urllib.request

import grpc
import pytest

from caspo.netutil import free_port
from caspo.config import load_config
from caspo.core.search import SearchConfig, search
from caspo.models.base import PromptedProposer
from caspo.models.hf import HFBackend, resolve_model_path
from caspo.protos.v1 import cat_pb2, cat_pb2_grpc
from caspo.serve.cat_client import SolveError, solve_grpc, solve_http
from caspo.serve.params import params_from_grpc
from caspo.tasks import get_task
from tests.prom import fast_metrics_export

QUESTION = "12+7*3-5"



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from caspo.serve.deployment import build_app, serve_options

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config(
        None,
        [
            f"serve.http_port={free_port()}",
            f"serve.grpc_port={free_port()}",
            f"serve.policy_file={root}/policy.json",
            "serve.watch_interval_s=0.2",
            "serve.request_timeout_s=60",
        ],
    )
    metrics_port = free_port()
    with fast_metrics_export():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _metrics_export_port=metrics_port)
    try:
        serve.start(**serve_options(cfg))
        serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
        yield cfg, root, metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def _http(cfg):
    return f"http://127.0.0.1:{cfg.serve.http_port}"


def _grpc(cfg):
    return f"127.0.0.1:{cfg.serve.grpc_port}"


def _stub(cfg):
    channel = grpc.insecure_channel(_grpc(cfg))
    return channel, cat_pb2_grpc.CaTStub(channel)


def _post(url, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _local_search(cfg: SearchConfig, with_tree: bool = False):
    task = get_task("arith")
    return search(QUESTION, PromptedProposer(HFBackend(resolve_model_path("tiny")), task.prompt), cfg, with_tree=with_tree)


def test_grpc_solve_equals_the_core_search_for_the_same_seed(served):
    cfg, _, _ = served
    channel, stub = _stub(cfg)
    with channel:
        resp = stub.Solve(cat_pb2.SolveRequest(question=QUESTION, method="cat", k=4, tau=0.3, seed=7, with_tree=True, branching="always", scoring="entropy"), timeout=60)
    local = _local_search(SearchConfig(method="cat", k=4, tau=0.3, seed=7, temperature=0.7), with_tree=True)  # Algorithm 2
    assert resp.has_answer == (local.answer is not None)
    assert resp.answer == (local.answer or "")
    assert tuple(s.text for s in resp.steps) == local.steps
    assert resp.confidence == pytest.approx(local.confidence, rel=1e-4)
    assert resp.steps_proposed == local.steps_proposed and resp.policy_version == 0
    assert [(n.step, n.status) for n in resp.tree] == [(n["step"], n["status"]) for n in local.tree]


def test_a_cat_request_without_search_fields_runs_the_recommended_cat(served):
    from caspo.models.calibration_file import read_calibration

    cfg, _, _ = served
    with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
        cal_path = json.loads(resp.read())["calibration"]
    recommended = cfg.cat.search_config(read_calibration(cal_path) if cal_path else None, seed=7)
    channel, stub = _stub(cfg)
    with channel:
        resp = stub.Solve(cat_pb2.SolveRequest(question=QUESTION, seed=7, with_tree=True), timeout=60)
    local = _local_search(recommended, with_tree=True)
    assert recommended.branching == "adaptive" and resp.scoring == recommended.scoring
    assert tuple(s.text for s in resp.steps) == local.steps and resp.steps_proposed == local.steps_proposed
    assert [(n.step, n.status) for n in resp.tree] == [(n["step"], n["status"]) for n in local.tree]


def test_grpc_stream_sends_steps_then_the_answer(served):
    cfg, _, _ = served
    events = list(solve_grpc(_grpc(cfg), QUESTION, method="cat", k=4, tau=0.3, seed=7))
    *steps, last = events
    assert "result" in last and all("step" in e for e in steps)
    result = last["result"]
    assert [s["step"]["text"] for s in steps] == [s["text"] for s in result["steps"]]
    assert [s["step"]["index"] for s in steps] == list(range(len(steps)))
    greedy = list(solve_grpc(_grpc(cfg), QUESTION, method="greedy"))
    local = _local_search(SearchConfig(method="greedy"))
    assert greedy[-1]["result"]["answer"] == (local.answer or "")
    assert [e["step"]["text"] for e in greedy[:-1]] == list(local.steps)


def test_http_solve_and_stream_agree_with_grpc(served):
    cfg, _, _ = served
    body = {"question": QUESTION, "method": "cat", "k": 4, "tau": 0.3, "seed": 7}
    status, out = _post(_http(cfg) + "/v1/solve", body)
    assert status == 200
    grpc_result = list(solve_grpc(_grpc(cfg), QUESTION, method="cat", k=4, tau=0.3, seed=7))[-1]["result"]
    assert out["answer"] == grpc_result["answer"] and [s["text"] for s in out["steps"]] == [s["text"] for s in grpc_result["steps"]]
    assert out["policy_version"] == 0 and out["method"] == "cat" and out["k"] == 4
    req = urllib.request.Request(_http(cfg) + "/v1/solve/stream", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        lines = [json.loads(x) for x in resp.read().decode().splitlines() if x.strip()]
    assert "result" in lines[-1] and lines[-1]["result"]["answer"] == out["answer"]
    assert [x["step"]["text"] for x in lines[:-1]] == [s["text"] for s in out["steps"]]
    assert solve_http(_http(cfg), QUESTION, method="greedy")["answer"] == _local_search(SearchConfig(method="greedy")).answer


def test_openai_client_chat_completions_and_models(served):
    import openai

    cfg, _, _ = served
    client = openai.OpenAI(base_url=_http(cfg) + "/v1", api_key="unused")
    models = client.models.list()
    model_id = models.data[0].id
    assert model_id == "caspo-arith"
    comp = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"method": "greedy"},
    )
    local = _local_search(SearchConfig(method="greedy"))
    assert comp.choices[0].message.content == "\n".join(local.steps)
    extra = comp.model_extra["caspo"]
    assert extra["answer"] == local.answer and extra["policy_version"] == 0 and extra["method"] == "greedy"
    assert comp.usage.completion_tokens == local.tokens_generated
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": QUESTION}])
    with pytest.raises(openai.UnprocessableEntityError, match="k must be in"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}], extra_body={"k": 0})


def test_openai_client_streams_a_cat_answer(served):
    import openai

    cfg, _, _ = served
    client = openai.OpenAI(base_url=_http(cfg) + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="caspo-arith",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        extra_body={"method": "cat", "k": 4, "tau": 0.3, "seed": 7},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks[1:]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and last.choices[0].finish_reason == "stop"
    # a chunk per committed step, the same steps as the unary gRPC answer for the same seed
    grpc_result = list(solve_grpc(_grpc(cfg), QUESTION, method="cat", k=4, tau=0.3, seed=7))[-1]["result"]
    assert [c.choices[0].delta.content for c in body] == [s["text"] if i == 0 else "\n" + s["text"] for i, s in enumerate(grpc_result["steps"])]
    extra = last.model_extra["caspo"]
    assert extra["answer"] == grpc_result["answer"] and extra["policy_version"] == 0
    assert [s["text"] for s in extra["steps"]] == [s["text"] for s in grpc_result["steps"]]
    assert [s["confidence"] for s in extra["steps"]] == pytest.approx([s["confidence"] for s in grpc_result["steps"]], rel=1e-5)  # gRPC: float32
    assert last.usage.completion_tokens == extra["tokens_generated"]
    # the deltas add up to the non-streamed message
    whole = client.chat.completions.create(model="caspo-arith", messages=[{"role": "user", "content": QUESTION}], extra_body={"method": "cat", "k": 4, "tau": 0.3, "seed": 7})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    # on the wire: server-sent events ending with [DONE]
    body = {"model": "caspo-arith", "messages": [{"role": "user", "content": QUESTION}], "stream": True, "method": "greedy"}
    req = urllib.request.Request(_http(cfg) + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][len("data: "):])["caspo"]["method"] == "greedy"


GRPC_BAD = [
    (dict(question=""), "question is empty"),
    (dict(question="   "), "question is empty"),
    (dict(question="1+" * 1001), "the limit is 2000"),
    (dict(question=QUESTION, k=0), "k must be in [1, 32]"),
    (dict(question=QUESTION, k=33), "k must be in [1, 32]"),
    (dict(question=QUESTION, tau=1.5), "tau must be in [0.0, 1.0]"),
    (dict(question=QUESTION, tau=float("nan")), "tau must be a number"),
    (dict(question=QUESTION, max_steps=0), "max_steps must be in [1, 32]"),
    (dict(question=QUESTION, max_steps=100), "max_steps must be in [1, 32]"),
    (dict(question=QUESTION, temperature=-1.0), "temperature must be in [0.0, 2.0]"),
    (dict(question=QUESTION, method="beam"), "method must be one of greedy, sc, bon, cat"),
    (dict(question=QUESTION, scoring="vibes"), "scoring must be one of"),
    (dict(question=QUESTION, method="sc", k=4, temperature=0.0), "temperature must be > 0"),
    (dict(question=QUESTION, branching="sometimes"), "branching must be one of always, adaptive"),
    (dict(question=QUESTION, branch_threshold=-1.0), "branch_threshold must be in [0.0, inf]"),
    (dict(question=QUESTION, scoring="critic"), "scoring must be one of entropy, logprob, product, crew, gmean, group"),
]


@pytest.mark.parametrize("fields,message", GRPC_BAD)
def test_grpc_bad_input_is_invalid_argument_naming_the_field(served, fields, message):
    cfg, _, _ = served
    channel, stub = _stub(cfg)
    with channel:
        for call in (stub.Solve, lambda r, timeout: list(stub.SolveStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as err:
                call(cat_pb2.SolveRequest(**fields), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()


HTTP_BAD = [
    ({"question": ""}, "question"),
    ({"question": "1+" * 1001}, "question"),
    ({"question": QUESTION, "k": 0}, "k"),
    ({"question": QUESTION, "tau": -0.1}, "tau"),
    ({"question": QUESTION, "max_steps": 33}, "max_steps"),
    ({"question": QUESTION, "method": "beam"}, "method"),
    ({"question": QUESTION, "branching": "sometimes"}, "branching"),
    ({"question": QUESTION, "branch_threshold": -0.5}, "branch_threshold"),
    ({"question": QUESTION, "k": "4"}, "k"),  # wrong JSON types
    ({"question": 5}, "question"),
    ({"question": QUESTION, "with_tree": "yes"}, "with_tree"),
    ({"question": QUESTION, "tau": None, "bogus": 1}, "bogus"),
    ({}, "question"),
]


@pytest.mark.parametrize("body,field", HTTP_BAD)
def test_http_bad_input_is_422_naming_the_field(served, body, field):
    cfg, _, _ = served
    status, out = _post(_http(cfg) + "/v1/solve", body)
    assert status == 422
    assert any(field in " ".join(map(str, d["loc"])) and field in d["msg"] for d in out["detail"]), out


def test_a_question_over_the_context_length_is_refused_naming_the_limit():
    """A replica's check (CaTService.question_of) refuses a question whose prompt and one step
    (model.max_step_tokens 32) do not fit model.max_model_len: ParamError on the field question, which gRPC
    answers INVALID_ARGUMENT and HTTP 422 (the tests above)."""
    from caspo.models.factory import make_backend
    from caspo.models.prompting import prompter_for_backend
    from caspo.models.worker import ModelWorker
    from caspo.serve.service import check_context
    from caspo.serve.request_errors import ParamError

    cfg = load_config(None, ["model.max_model_len=45"])
    worker = ModelWorker(make_backend(cfg))
    assert worker.max_model_len == 45 and ModelWorker(HFBackend("tiny")).max_model_len == 512  # the override, else config.json's
    task = get_task("arith")
    question_of = lambda q: check_context(task.question(q), worker, prompter_for_backend(worker.backend, task))  # noqa: E731
    assert question_of("1+2") == "1+2"  # "<bos>Q:1+2\n": 7 tokens + 32 fit
    with pytest.raises(ParamError, match=r"question needs 46 tokens with room for one step .* context length \(model.max_model_len\) is 45"):
        question_of("12+7*3-4*5")
    with pytest.raises(ParamError, match="model.max_model_len"):
        params_from_grpc(cfg.serve, cat_pb2.SolveRequest(question="12+7*3-4*5"), question_of)


def test_http_malformed_json_and_the_service_keeps_serving(served):
    cfg, _, _ = served
    status, out = _post(_http(cfg) + "/v1/solve", None, raw=b'{"question": ')
    assert status == 422
    status, out = _post(_http(cfg) + "/v1/chat/completions", {"model": "caspo-arith", "messages": [], "method": "greedy"})
    assert status == 422 and "messages" in json.dumps(out)
    status, out = _post(_http(cfg) + "/v1/chat/completions", {"model": "caspo-arith", "messages": [{"role": "user", "content": QUESTION}], "stream": True, "k": 0})
    assert status == 422 and "k must be in" in json.dumps(out)  # a bad streamed request is refused before any event
    with pytest.raises(SolveError, match="INVALID_ARGUMENT"):
        list(solve_grpc(_grpc(cfg), ""))
    assert solve_http(_http(cfg), QUESTION, method="greedy")["has_answer"]


def test_deadline_cancels_and_the_service_keeps_serving(served):
    cfg, _, _ = served
    channel, stub = _stub(cfg)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Solve(cat_pb2.SolveRequest(question="9*8-55+13*3", method="cat", k=32, tau=0.0, max_steps=32), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the cancelled search stops asking the model: nothing waits, and no more model calls happen.
        # Uncancelled, this search runs ~10 s (3,264 proposals), so quiet within 6 s means it stopped.
        deadline, health = time.time() + 6, {}
        while time.time() < deadline:
            health = _health(cfg)
            if health["proposals_waiting"] == 0:
                break
            time.sleep(0.1)
        assert health["proposals_waiting"] == 0
        calls = health["model_calls"]
        time.sleep(2.0)
        assert _health(cfg)["model_calls"] == calls
        assert stub.Solve(cat_pb2.SolveRequest(question=QUESTION, method="greedy"), timeout=60).has_answer


def _health(cfg) -> dict:
    with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
        return json.loads(resp.read())


def test_health_and_hot_reload_during_traffic(served):
    cfg, root, _ = served
    with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["policy_version"] == 0
    v1 = root / "v1"
    shutil.copytree(resolve_model_path("tiny"), v1)

    def ask(i):
        events = list(solve_grpc(_grpc(cfg), QUESTION, method="cat", k=4, tau=0.3, seed=i))
        return events[-1]["result"]["policy_version"]

    versions = []
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        (root / "policy.json").write_text(json.dumps({"version": 1, "path": str(v1)}))
        deadline = time.time() + 60
        while time.time() < deadline:
            futures.append(pool.submit(ask, len(futures)))
            time.sleep(0.2)
            done = [f.result() for f in futures if f.done()]  # .result() raises if a request failed
            if sum(v == 1 for v in done) >= 3:
                break
        versions = [f.result() for f in futures]  # every request succeeded
    assert set(versions) <= {0, 1} and versions.count(1) >= 3
    with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
        assert json.loads(resp.read())["policy_version"] == 1


def test_server_reflection_lists_the_cat_service(served):
    """What grpcurl relies on to call the service without proto files."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cfg, _, _ = served
    with grpc.insecure_channel(_grpc(cfg)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="caspo.v1.CaT"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=30))
    assert "caspo.v1.CaT" in {s.name for s in listed.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto  # the descriptors grpcurl decodes with


def test_a_policy_that_fails_to_load_leaves_the_service_on_its_weights(served):
    cfg, root, _ = served
    with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
        before = json.loads(resp.read())["policy_version"]
    (root / "policy.json").write_text(json.dumps({"version": 7, "path": str(root / "no-such-model")}))
    deadline, health = time.time() + 60, {}
    while time.time() < deadline:
        with urllib.request.urlopen(_http(cfg) + "/healthz", timeout=30) as resp:
            health = json.loads(resp.read())
        if health["reload_error"]:
            break
        time.sleep(0.2)
    assert "v7" in health["reload_error"] and "no-such-model" in health["reload_error"]
    assert health["policy_version"] == before
    events = list(solve_grpc(_grpc(cfg), QUESTION, method="greedy"))
    assert events[-1]["result"]["policy_version"] == before and events[-1]["result"]["has_answer"]


def test_promote_and_rollback_switch_serve_under_traffic_with_no_failed_request(served):
    """`caspo promote RUN VERSION` and `caspo rollback RUN` rewrite the policy file the replicas watch:
    the switch goes through the same hot reload, concurrent requests all succeed, /healthz says why."""
    from caspo.cli.main import main

    cfg, root, _ = served
    base = resolve_model_path("tiny")
    for v in ("v1", "v2"):
        shutil.copytree(base, root / "policies" / v)
    state = {"done": {"1": {"train": {}}, "2": {"train": {}}}, "policies": {"0": base, "1": str(root / "policies" / "v1"), "2": str(root / "policies" / "v2")}}
    (root / "state.json").write_text(json.dumps(state))

    def ask(i):
        events = list(solve_grpc(_grpc(cfg), QUESTION, method="cat", k=2, tau=0.3, seed=i))
        return events[-1]["result"]["policy_version"]

    def until_served(pool, futures, version):
        deadline = time.time() + 60
        while time.time() < deadline and _health(cfg)["policy_version"] != version:
            futures.append(pool.submit(ask, len(futures)))  # traffic while the replica reloads
            time.sleep(0.2)
        on_it = [pool.submit(ask, len(futures) + i) for i in range(2)]  # and requests on the new version
        assert [f.result() for f in on_it] == [version, version]
        futures.extend(on_it)

    futures = []
    with cf.ThreadPoolExecutor(6) as pool:
        futures += [pool.submit(ask, i) for i in range(4)]
        assert main(["promote", str(root), "1"]) == 0
        until_served(pool, futures, 1)
        assert main(["promote", str(root), "v2"]) == 0
        until_served(pool, futures, 2)
        assert main(["rollback", str(root)]) == 0
        until_served(pool, futures, 1)
        versions = [f.result() for f in futures]  # .result() raises if any request failed
    assert {1, 2} <= set(versions)
    health = _health(cfg)
    assert health["policy_version"] == 1 and health["reload_error"] is None
    assert health["promotion"]["decision"]["by"] == "rollback"
    assert health["promotion"]["decision"]["reason"] == "rolled back by hand from v2 to v1"
    # refused in one line, nothing changed: a version that does not exist
    assert main(["promote", str(root), "9"]) == 2
    assert _health(cfg)["promotion"]["published_version"] == 1


def test_serve_exports_its_metrics_on_rays_endpoint(served):
    """The replica's gRPC method counts and latency, its micro-batcher, the policy version it holds and
    CaT's tokens and pruned branches, scraped from Ray's real metrics endpoint."""
    from caspo.telemetry import TOKENS
    from tests.prom import find, wait_for

    cfg, _, port = served
    stub_channel, stub = _stub(cfg)
    with stub_channel:
        results = [stub.Solve(cat_pb2.SolveRequest(question=QUESTION, method="cat", k=2, tau=0.9, seed=i), timeout=60) for i in range(3)]
        with pytest.raises(grpc.RpcError):
            stub.Solve(cat_pb2.SolveRequest(question=QUESTION, method="cat", k=10_000), timeout=60)
    version = _health(cfg)["policy_version"]
    wanted = {
        "requests": ("ray_caspo_grpc_requests_total", {"service": "CaT", "method": "Solve"}, lambda v: v and max(v) >= 4),
        "errors": ("ray_caspo_grpc_errors_total", {"service": "CaT", "method": "Solve", "code": "INVALID_ARGUMENT"}, lambda v: v and max(v) >= 1),
        "latency": ("ray_caspo_grpc_latency_seconds_count", {"service": "CaT", "method": "Solve"}, lambda v: v and max(v) >= 4),
        "batches": ("ray_caspo_worker_batch_size_count", {"worker": "serve", "kind": "sample"}, lambda v: v and max(v) >= 1),
        "queue": ("ray_caspo_worker_queue_depth", {"worker": "serve"}, lambda v: bool(v)),
        "version": ("ray_caspo_policy_version", {"service": "serve"}, lambda v: version in v),
        "tokens": ("ray_caspo_cat_tokens_per_answer_count", {"service": "serve"}, lambda v: v and max(v) >= 3),
        "pruned": ("ray_caspo_cat_branches_pruned_total", {"service": "serve"}, lambda v: v and max(v) >= sum(r.branches_pruned for r in results)),
    }
    samples, missing = wait_for(port, wanted)
    assert not missing, missing
    # bucket counts are exact (Ray approximates a histogram's sum from bucket midpoints): every answer of ours
    # lies at or below the first bound that holds the longest of them
    bound = min(b for b in TOKENS if b >= max(r.tokens_generated for r in results))
    assert max(find(samples, "ray_caspo_cat_tokens_per_answer_bucket", service="serve", le=float(bound))) >= len(results)
