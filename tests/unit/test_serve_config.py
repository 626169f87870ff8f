"""The Serve config file validates against Ray's schema and its import path builds the real application."""

import subprocess
import sys
from pathlib import Path

import pytest
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
        "import pickle, sys; from caspo.serve import proxy, request_errors as r; "
        "[pickle.loads(pickle.dumps(e)) for e in (r.ParamError('k', 'is bad'), r.ModelNotFound('m', 'caspo-arith'), r.Unauthenticated('no token'))]; "
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_cat_request_takes_the_cat_section_and_the_calibration():
    from caspo.config import CatConfig, ServeConfig
    from caspo.models.calibration_file import Calibration

    sv, cat, cal = ServeConfig(), CatConfig(), Calibration(0.25, 1.5, "first_entropy")
    p = parse_params(sv, "1+2", cat=cat, calibration=cal).search
    assert (p.branching, p.scoring, p.prune_scoring, p.width, p.k) == ("adaptive", "logprob", "entropy", 1, cat.k)
    assert (p.tau, p.branch_threshold, p.uncertainty) == (0.25, 1.5, "first_entropy")
    own = parse_params(sv, "1+2", tau=0.1, branch_threshold=0.7, cat=cat, calibration=cal).search
    assert (own.tau, own.branch_threshold) == (0.1, 0.7)
    a2 = parse_params(sv, "1+2", branching="always", scoring="entropy", k=10, tau=0.5, cat=cat, calibration=cal).search
    assert (a2.branching, a2.width, a2.prune_scoring, a2.k) == ("always", None, None, 10)
    sc = parse_params(sv, "1+2", method="sc", cat=cat, calibration=cal).search
    assert (sc.k, sc.tau, sc.scoring) == (sv.k, sv.tau, sv.scoring)  # other methods keep serve.*


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"branching": "sometimes"}, "branching must be one of always, adaptive, got 'sometimes'"),
        ({"branch_threshold": -1}, "branch_threshold must be in [0.0, inf], got -1"),
        ({"branch_threshold": "high"}, "branch_threshold must be a number, got 'high'"),
        ({"scoring": "critic"}, "scoring must be one of entropy, logprob, product, crew, gmean, group, got 'critic'"),
    ],
)
def test_bad_cat_fields_name_field_and_limit(fields, message):
    from caspo.config import CatConfig, ServeConfig
    from caspo.serve.request_errors import ParamError

    with pytest.raises(ParamError) as e:
        parse_params(ServeConfig(), "1+2", cat=CatConfig(), **fields)
    assert str(e.value) == message
