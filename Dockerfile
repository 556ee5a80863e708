# syntax=docker/dockerfile:1
#
# kubeinfer images. Three final targets from one build:
#
#   docker build --target operator -t kubeinfer/operator:dev .   # `kubeinfer operator` (kopf)
#   docker build --target runtime  -t kubeinfer/runtime:dev .    # `kubeinfer-runtime serve --role ...`
#   docker build --target compiler -t kubeinfer/compiler:dev .   # `kubeinfer-runtime compile`
#
# Stages: `builder` (compilers, pip, the dependency selector) is the common
# start of `operator-builder` and `runtime-builder`, each of which installs
# kubeinfer and its own share of the pinned dependencies into a virtual
# environment at /opt/kubeinfer: the operator's has no onnxruntime, numpy or
# web server, the runtime's no kopf or Kubernetes client (OPERATOR_DEPS and
# RUNTIME_DEPS below name each share; tests/unit/test_chart_images.py checks
# the split). `models` builds the
# example ONNX models with scikit-learn in a throwaway environment. The final
# stages start again from the bare base image and copy only those results in:
# no compiler, no pip cache, no scikit-learn, no source tree. The third target,
# `compiler`, is the runtime image plus g++ (TVM links each compiled model into
# a shared library with it): only the compile step runs it, never a server.
#
# The base is pinned by digest (the multi-architecture index of
# python:3.11.14-slim-bookworm), so a rebuild uses exactly the same OS and
# Python; Renovate/Dependabot can bump tag and digest together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# Each image's share of pyproject.toml's [project] dependencies, by
# distribution name (versions from pyproject.toml, pins from constraints.txt).
# Every dependency is in at least one list; a name pyproject.toml does not list
# fails the build. The operator (kopf, `kubeinfer operator` and the CLI) needs
# no model-serving library; the runtime (gateway, model servers, batch and
# queue workers, the compile step, the fleet server and edge package step) never talks
# to the Kubernetes API.
ARG OPERATOR_DEPS="kopf kubernetes typer rich pyyaml pydantic pydantic-settings aiohttp httpx redis prometheus-client promql-parser"
ARG RUNTIME_DEPS="fastapi uvicorn uvloop httptools orjson numpy onnxruntime minio prometheus-client pydantic pydantic-settings aiohttp httpx redis botocore jsonpath-ng google-crc32c rich cryptography hiredis"

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Compilers for any dependency without a wheel for this platform. Only the
# builder stages have them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: source edits do not reinstall them.
# constraints.txt pins every transitive version (uv pip compile output).
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
# Prints the requirement lines of pyproject.toml's [project] dependencies named
# on its command line (or of an extra, with --extra NAME), one per line.
COPY scripts/select-deps.py /usr/local/bin/select-deps
RUN chmod 0755 /usr/local/bin/select-deps

# ---------------------------------------------------------------------------
# The operator's venv: its share of the dependencies, then kubeinfer itself.
FROM builder AS operator-builder
ARG OPERATOR_DEPS
RUN python -m venv /opt/kubeinfer \
 && /opt/kubeinfer/bin/pip install --upgrade pip \
 && select-deps ${OPERATOR_DEPS} > /tmp/operator.txt \
 && /opt/kubeinfer/bin/pip install -c requirements/constraints.txt -r /tmp/operator.txt
COPY operator operator
COPY runtime runtime
# A regular (not editable) install: the final stages do not have /src. pip
# byte-compiles the packages here, so read-only root filesystems need no
# .pyc writes at run time. --no-deps: the share above is all it gets, and the
# checks below prove it is enough and carries no serving library.
RUN /opt/kubeinfer/bin/pip install --no-deps -c requirements/constraints.txt . \
 && /opt/kubeinfer/bin/kubeinfer --version \
 && /opt/kubeinfer/bin/python -c "import kubeinfer_operator.main, kubeinfer_operator.cli" \
 && ! /opt/kubeinfer/bin/python -c "import onnxruntime" 2>/dev/null \
 && ! /opt/kubeinfer/bin/python -c "import numpy" 2>/dev/null

# ---------------------------------------------------------------------------
# The runtime's venv: its share of the dependencies plus the `compile` extra
# (TVM, which also serves compiled artifacts, and MetaSchedule's cost model),
# then kubeinfer itself. No kopf, no Kubernetes client.
FROM builder AS runtime-builder
ARG RUNTIME_DEPS
RUN python -m venv /opt/kubeinfer \
 && /opt/kubeinfer/bin/pip install --upgrade pip \
 && select-deps ${RUNTIME_DEPS} > /tmp/runtime.txt \
 && select-deps --extra compile >> /tmp/runtime.txt \
 && /opt/kubeinfer/bin/pip install -c requirements/constraints.txt -r /tmp/runtime.txt
COPY operator operator
COPY runtime runtime
RUN /opt/kubeinfer/bin/pip install --no-deps -c requirements/constraints.txt . \
 && /opt/kubeinfer/bin/python -c "import kubeinfer_runtime.__main__, kubeinfer_runtime.server, kubeinfer_runtime.gateway" \
 && /opt/kubeinfer/bin/python -c "import tvm, tvm_ffi, kubeinfer_runtime.compile.main" \
 && ! /opt/kubeinfer/bin/python -c "import kopf" 2>/dev/null \
 && ! /opt/kubeinfer/bin/python -c "import kubernetes" 2>/dev/null

# ---------------------------------------------------------------------------
# From the bare base, not from builder: source edits do not rebuild the models.
FROM ${PYTHON_IMAGE} AS models
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The example models (examples/build_models.py), built, never downloaded. The
# model-building libraries (scikit-learn, skl2onnx, onnx) stay in this stage.
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
RUN python -m venv /opt/models \
 && /opt/models/bin/pip install -c requirements/constraints.txt numpy onnx scikit-learn skl2onnx
COPY examples/build_models.py examples/build_multimodel_models.py examples/
# Examples name models relatively (file://models/iris.onnx). The runtime
# resolves that against KUBEINFER_MODEL_BASE_DIR=/srv/kubeinfer, i.e.
# /srv/kubeinfer/models/iris.onnx (also reachable as
# file:///srv/kubeinfer/models/iris.onnx). Three numbered multi-model models
# (examples/build_multimodel_models.py) join them as tenant-<i>/model.onnx, so
# the multi-model example (prefix file://models/) also serves nested names.
RUN /opt/models/bin/python examples/build_models.py /out/models \
 && /opt/models/bin/python examples/build_multimodel_models.py /out/models --count 3 \
 && chmod -R a+rX /out/models
# The example pipeline handlers (codeUri: file://handlers → /srv/kubeinfer/handlers),
# readable by the runtime's non-root user whatever the checkout's umask.
COPY examples/handlers /out/handlers
RUN chmod -R a+rX /out/handlers

# ---------------------------------------------------------------------------
# What both final images share: the bare base, the non-root user, the venv.
FROM ${PYTHON_IMAGE} AS base
# uid/gid 65532 (the "nonroot" convention of distroless images); the Helm
# chart's securityContext runs as this uid.
RUN groupadd --system --gid 65532 kubeinfer \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin kubeinfer
ENV PATH=/opt/kubeinfer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /

# ---------------------------------------------------------------------------
FROM base AS operator
COPY --from=operator-builder /opt/kubeinfer /opt/kubeinfer
LABEL org.opencontainers.image.title="kubeinfer operator" \
      org.opencontainers.image.description="Turns kubeinfer.io Endpoints into Deployments, Services and route tables" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
# kopf's liveness endpoint (/healthz), see charts/kubeinfer/templates/deployment.yaml.
EXPOSE 8080
ENTRYPOINT ["kubeinfer"]
CMD ["operator"]

# ---------------------------------------------------------------------------
FROM base AS runtime
COPY --from=runtime-builder /opt/kubeinfer /opt/kubeinfer
LABEL org.opencontainers.image.title="kubeinfer runtime" \
      org.opencontainers.image.description="kubeinfer data plane: SageMaker-compatible gateway and ONNX model server" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=models /out/models /srv/kubeinfer/models
COPY --from=models /out/handlers /srv/kubeinfer/handlers
ENV KUBEINFER_MODEL_BASE_DIR=/srv/kubeinfer
USER 65532:65532
EXPOSE 8080
# The operator passes the role: `serve --role model-server` or `serve --role gateway`.
ENTRYPOINT ["kubeinfer-runtime"]
CMD ["serve", "--role", "model-server"]

# ---------------------------------------------------------------------------
# The compile step (CompilationJobs, `model.compile` init containers): the
# runtime image plus g++, which TVM's export_library runs to link each compiled
# model into a shared library. Kept out of the serving image. Cross targets
# (aarch64, armv7) also need cross compilers and qemu-user: compile those with
# `kubeinfer compile` on a machine set up by `scripts/setup test`.
FROM runtime AS compiler
LABEL org.opencontainers.image.title="kubeinfer compiler" \
      org.opencontainers.image.description="kubeinfer compile step: ONNX to TVM or onnxruntime artifacts, measured against onnxruntime" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 0:0
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
USER 65532:65532
ENTRYPOINT ["kubeinfer-runtime"]
CMD ["compile"]
