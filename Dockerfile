# syntax=docker/dockerfile:1
# caspo-mesh images. Two targets:
#   docker build --target cpu -t caspo-mesh/caspo:cpu .   # torch CPU build, the built-in tiny reasoner
#   docker build --target gpu -t caspo-mesh/caspo:gpu .   # CUDA base, the `gpu` extra (vLLM)
# Both run as the non-root user caspo (uid 1000, USER given numerically), have the `caspo` entry point and serve CaT by default
# (`caspo serve`); in Kubernetes, KubeRay replaces the command with `ray start` (see k8s/).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build: a wheel; the gRPC code is generated from protos/ by the build (setup.py build_py) ----
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY caspo caspo
RUN python -m build --wheel --outdir /dist . \
    && python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('/dist/*.whl')[0]).namelist(); sys.exit(0 if 'caspo/protos/v1/cat_pb2.py' in names else 'generated protos missing from the wheel')"

# ---- cpu ----
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# redis-server: `caspo up` / `caspo loop` on one container start their own (k8s uses the StatefulSet)
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 caspo
COPY --from=build /dist/ /tmp/dist/
COPY requirements/cpu.txt /tmp/requirements-cpu.txt
# every dependency at the version of the CPU lock (requirements/cpu.txt, `make lock`), torch's CPU build first
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir -c /tmp/requirements-cpu.txt /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/requirements-cpu.txt
# /home/caspo/ is the home of the image's own user (useradd above), not a path of any machine
WORKDIR /home/caspo/app
COPY --chown=1000:1000 configs configs
USER 1000:1000
EXPOSE 8000 9000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["caspo"]
CMD ["serve", "--set", "serve.host=0.0.0.0"]

# ---- gpu ----
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 caspo
COPY --from=build /dist/ /tmp/dist/
COPY requirements/gpu.txt /tmp/requirements-gpu.txt
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# the gpu extra brings vLLM and the CUDA build of torch that vLLM pins (the wheel is this build's own), every
# package at the version of the GPU lock (requirements/gpu.txt, resolved for this base's Python 3.12)
# hadolint ignore=DL3013
RUN wheel="$(ls /tmp/dist/*.whl)" \
    && pip install --no-cache-dir -c /tmp/requirements-gpu.txt "${wheel}[gpu]" \
    && rm -rf /tmp/dist /tmp/requirements-gpu.txt
# /home/caspo/ is the home of the image's own user (useradd above), not a path of any machine
WORKDIR /home/caspo/app
COPY --chown=1000:1000 configs configs
USER 1000:1000
EXPOSE 8000 9000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["caspo"]
CMD ["serve", "--set", "serve.host=0.0.0.0"]
