# syntax=docker/dockerfile:1
#
# l2t-dist in a container: the `l2t-dist` command, Ray (to run head and worker nodes) and
# MLflow, with the dependency pins of pyproject.toml and the torch pins of the Makefile.
#
# CPU image (default; torch from the CPU wheel index, a few GB smaller than a CUDA build):
#   docker build -t l2t-dist:cpu .
# CUDA image: a CUDA base (Python is installed from the distribution when the base has none)
# and a CUDA torch index; run it with `docker run --gpus all ...`:
#   docker build -t l2t-dist:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# Running it (one machine, a Ray head node, worker nodes, submitting a job with
# MLFLOW_TRACKING_URI): README.md, section "Docker". tests/test_dockerfile.py checks this file
# and that recipe against the package.
#
# Security: a Ray cluster runs any code that reaches its ports unauthenticated, so the recipe
# runs every node and client with token authentication (RAY_AUTH_MODE=token, the token file
# mounted read-only and named by RAY_AUTH_TOKEN_PATH) and keeps the dashboard and job API on
# 127.0.0.1. Its ports (GCS 6379, dashboard/job API 8265, Ray client 10001, dashboard agent
# 52365, workers 10002-19999, MLflow 5000) must stay on a private network: this image EXPOSEs
# none, and none should be published with `-p PORT:PORT` (every interface). A shared MLflow
# server needs MLflow's basic-auth app (`mlflow[auth]`, not installed here; the README builds
# an image on top of this one for it) or an authenticating reverse proxy.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The Makefile's TORCH pins; the index decides the build (CPU, cu126, ...): PyPI's own Linux
# wheels are CUDA builds, so the CPU image takes them from the CPU index.
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# uid and gid of the user `l2t` (not named UID: bash reserves that name); pass
# --build-arg APP_UID=$(id -u) to write to bind-mounted folders owned by you (may be a uid
# the base already uses, such as 1000 of `ubuntu` on Ubuntu 24.04 bases: --non-unique).
ARG APP_UID=10001

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:*-slim has Python; nvidia/cuda and plain Ubuntu bases do not, so install it from the
# distribution there (their versions follow the base, so they are not pinned). A virtual
# environment keeps pip away from the system Python (PEP 668 on Ubuntu 24.04).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# torch first: the largest layer, rebuilt only when TORCH or TORCH_INDEX_URL change. The pins
# are in TORCH (unquoted on purpose: two requirements), which the linter cannot see.
# hadolint ignore=DL3013,SC2086
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" ${TORCH}

# The pinned dependencies of pyproject.toml (ray, mlflow, pyarrow, ...), installed from
# pyproject.toml alone with a stand-in package (and readme), so that a change of the code or
# the README reuses this layer.
WORKDIR /tmp/src
COPY pyproject.toml ./
RUN mkdir l2t_dist \
    && echo '__version__ = "0"' > l2t_dist/__init__.py \
    && touch README.md \
    && pip install --no-cache-dir . \
    && pip uninstall -y l2t-dist \
    && rm -rf l2t_dist build README.md

# The package itself (its dependencies are all in place now).
COPY README.md ./
COPY l2t_dist/ l2t_dist/
RUN pip install --no-cache-dir --no-deps . \
    && l2t-dist --version

# The working directory of the container: the ready jobs (their data paths are relative,
# `../shared/...`, so mount the data and checkpoints at /shared), the search spaces of
# `l2t-dist tune`, runs/ for the outputs.
WORKDIR /app
COPY jobs/ jobs/
COPY tune_spaces/ tune_spaces/
RUN rm -rf /tmp/src \
    && groupadd --non-unique --gid "${APP_UID}" l2t \
    && useradd --create-home --non-unique --uid "${APP_UID}" --gid "${APP_UID}" l2t \
    && mkdir -p /app/runs \
    && chown -R "${APP_UID}:${APP_UID}" /app
# Numeric, so that `runAsNonRoot` checks (Kubernetes) can verify it: user l2t.
USER ${APP_UID}:${APP_UID}

ENTRYPOINT ["l2t-dist"]
CMD ["--help"]
