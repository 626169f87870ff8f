"""The Serve config file validates against Ray's schema and its import path builds the real application."""

import subprocess
import sys
from pathlib import Path

import yaml

from caspo.serve.deployment import DEPLOYMENT, GRPC_SERVICER, app_builder
from caspo.serve.params import parse_params

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_file_builds_the_cat_application():
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    assert schema.grpc_options.port == 9000 and schema.http_options.port == 8000
    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]
    assert callable(import_attr(GRPC_SERVICER))
    (app_cfg,) = schema.applications
    builder = import_attr(app_cfg.import_path)
    app = builder({**app_cfg.args, "config": str(ROOT / app_cfg.args["config"])})
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT
    assert deployment._deployment_config.max_ongoing_requests == 32
    assert deployment._deployment_config.autoscaling_config.max_replicas >= 1
    cfg = deployment.init_args[0]
    assert cfg["serve"]["host"] == "0.0.0.0" and cfg["model"]["policy"] == "tiny"


def test_app_builder_applies_overrides():
    app = app_builder({"set": ["serve.max_replicas=3", "serve.num_cpus=2"]})
    d = app._bound_deployment
    assert d._deployment_config.autoscaling_config.max_replicas == 3
    assert d.ray_actor_options["num_cpus"] == 2


def test_parse_params_defaults_and_greedy_normalisation():
    from caspo.config import ServeConfig

    sv = ServeConfig()
    p = parse_params(sv, "  1+2  ")
    assert p.question == "1+2" and p.search.method == "cat" and p.search.k == sv.k and p.search.tau == sv.tau
    g = parse_params(sv, "1+2", method="greedy", k=7, temperature=1.3)
    assert g.search.k == 1 and g.search.temperature == 0.0


def test_what_serves_proxies_load_stays_light():
    """The proxy unpickles the errors a replica raises, which imports the module that defines them: a
    model stack imported that way grew the proxy by over 100 MiB."""
    code = (
        "import pickle, sys; from caspo.serve import proxy; "
        "[pickle.loads(pickle.dumps(e)) for e in (proxy.ParamError('k', 'is bad'), proxy.Unauthenticated('no token'))]; "
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
