#!/usr/bin/env bash
# End-to-end test on a throwaway kind cluster (needs docker, kind, helm, kubectl).
#
#   e2e/run.sh [pytest args]
#
# 1. creates a kind cluster (its own kubeconfig file: your current context is
#    never touched),
# 2. builds the operator, runtime and compiler images (Dockerfile targets) and loads them
#    into the cluster,
# 3. deploys what async Endpoints need (e2e/manifests/async-deps.yaml: Redis
#    and a SeaweedFS S3 server) unless KUBEINFER_E2E_ASYNC=0,
# 4. installs charts/kubeinfer with those images (and that Redis and S3),
# 5. runs e2e/: every examples/*.yaml Endpoint is applied, waited for (Ready),
#    invoked through a port-forward with boto3, and deleted,
# 6. deletes the cluster, also on failure or Ctrl-C (trap).
#
# Environment:
#   KUBEINFER_E2E_CLUSTER  kind cluster name (default kubeinfer-e2e)
#   KUBEINFER_E2E_KEEP=1   keep the cluster afterwards (for debugging; delete it
#                          with `kind delete cluster --name kubeinfer-e2e`)
#   KUBEINFER_E2E_ASYNC=0  no Redis / object store: the async test skips
#   KIND_NODE_IMAGE        node image (default: Kubernetes 1.33.1, pinned digest)
#   PYTHON                 Python with kubeinfer[test] installed (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KUBEINFER_E2E_CLUSTER:-kubeinfer-e2e}"
KEEP="${KUBEINFER_E2E_KEEP:-0}"
# kind v0.29.0's image for Kubernetes 1.33.1 (the version the chart is validated against).
NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1@sha256:050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f}"
PYTHON="${PYTHON:-.venv/bin/python}"
# A fixed non-"latest" tag: with imagePullPolicy Never, kubelet uses the image
# kind loaded and never tries a registry.
TAG="e2e"
OPERATOR_IMAGE="kubeinfer/operator:${TAG}"
RUNTIME_IMAGE="kubeinfer/runtime:${TAG}"
COMPILER_IMAGE="kubeinfer/compiler:${TAG}"
RELEASE="kubeinfer"
RELEASE_NS="kubeinfer-system"
ASYNC="${KUBEINFER_E2E_ASYNC:-1}"
# Must match e2e/manifests/async-deps.yaml.
DEPS_NS="kubeinfer-e2e-deps"
REDIS_URL="redis://redis.${DEPS_NS}.svc:6379/0"
# The Secret every model server mounts (runtime.s3.secretName); the tests create
# it in each test namespace (e2e/cluster.py create_s3_secret).
S3_SECRET="kubeinfer-e2e-s3"

log() { printf '\n==> %s\n' "$*"; }

for tool in docker kind helm kubectl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "e2e/run.sh: '$tool' is not on PATH: install it (see e2e/README.md)" >&2
    exit 2
  fi
done
if [ ! -x "$PYTHON" ]; then
  echo "e2e/run.sh: $PYTHON not found: run scripts/setup test first, or set PYTHON" >&2
  exit 2
fi

cleanup() {
  rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && kubectl cluster-info --request-timeout=5s >/dev/null 2>&1; then
    # What a failed run needs to be debugged, before the cluster is gone.
    log "diagnostics (exit code $rc)"
    kubectl get endpoints.kubeinfer.io,deployments,services,configmaps,pods -A -o wide || true
    kubectl -n "$RELEASE_NS" logs deployment/"$RELEASE"-operator --tail=200 || true
    kubectl get events -A --sort-by=.lastTimestamp | tail -50 || true
    if [ "$ASYNC" = "1" ]; then
      kubectl -n "$DEPS_NS" logs deployment/redis --tail=30 || true
      kubectl -n "$DEPS_NS" logs deployment/seaweedfs --tail=50 || true
    fi
  fi
  if [ "$KEEP" = "1" ]; then
    log "keeping cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)"
  else
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# Never adopt (and then delete) a cluster this script did not create.
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "e2e/run.sh: a kind cluster named $CLUSTER already exists: delete it" \
       "(kind delete cluster --name $CLUSTER) or set KUBEINFER_E2E_CLUSTER" >&2
  exit 2
fi

WORK="$(mktemp -d)"
export KUBECONFIG="${WORK}/kubeconfig"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "creating kind cluster $CLUSTER ($NODE_IMAGE)"
kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --kubeconfig "$KUBECONFIG" --wait 180s

log "building images"
docker build --target operator -t "$OPERATOR_IMAGE" .
docker build --target runtime -t "$RUNTIME_IMAGE" .
docker build --target compiler -t "$COMPILER_IMAGE" .

log "loading images into kind"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE" "$COMPILER_IMAGE"

async_values=()
if [ "$ASYNC" = "1" ]; then
  log "deploying Redis and the S3 server for async endpoints (e2e/manifests)"
  kubectl apply -f e2e/manifests/async-deps.yaml
  kubectl -n "$DEPS_NS" wait --for=condition=Available deployment --all --timeout=300s
  async_values=(--set runtime.redis.url="$REDIS_URL" --set runtime.s3.secretName="$S3_SECRET")
  export KUBEINFER_E2E_DEPS_NAMESPACE="$DEPS_NS" KUBEINFER_E2E_S3_SECRET="$S3_SECRET"
fi

log "installing the chart"
helm install "$RELEASE" charts/kubeinfer \
  --namespace "$RELEASE_NS" --create-namespace \
  --set operator.image.repository=kubeinfer/operator \
  --set operator.image.tag="$TAG" \
  --set operator.image.pullPolicy=Never \
  --set runtime.image.repository=kubeinfer/runtime \
  --set runtime.image.tag="$TAG" \
  --set runtime.image.pullPolicy=Never \
  --set runtime.compilerImage.repository=kubeinfer/compiler \
  --set runtime.compilerImage.tag="$TAG" \
  ${async_values[@]+"${async_values[@]}"} \
  --wait --timeout 5m

log "running e2e/"
KUBEINFER_E2E=1 \
KUBEINFER_E2E_RELEASE="$RELEASE" \
KUBEINFER_E2E_RELEASE_NAMESPACE="$RELEASE_NS" \
  "$PYTHON" -m pytest e2e -v -p no:cacheprovider "$@"
