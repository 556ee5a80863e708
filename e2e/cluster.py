"""The e2e tests' side of the cluster: kubectl, port-forwards, bounded waits, diagnostics.

Every call here is bounded by a timeout, and every failure says what the
cluster said: ``diagnosed`` attaches the Endpoint's status, the objects and
events of its namespace and the relevant logs to any exception raised in its
block, so a red CI run can be understood after the cluster is gone.

Object names, labels and ports are the operator's (``render/k8s_meta.py``,
``render/k8s_workloads.py``) and the chart's (``templates/_helpers.tpl``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TOOLS = ("docker", "kind", "helm", "kubectl")
RELEASE = os.environ.get("KUBEINFER_E2E_RELEASE", "kubeinfer")
RELEASE_NAMESPACE = os.environ.get("KUBEINFER_E2E_RELEASE_NAMESPACE", "kubeinfer-system")
#: The chart's object-name prefix ("kubeinfer.fullname" in templates/_helpers.tpl).
FULLNAME = RELEASE if "kubeinfer" in RELEASE else f"{RELEASE}-kubeinfer"
READY_TIMEOUT_S = 300
GC_TIMEOUT_S = 120
#: The chart's statusIntervalSeconds (run.sh keeps the default): how often the
#: operator re-reads each Endpoint and its scaler decides replicas.
STATUS_INTERVAL_S = 10
#: Set by run.sh when it deployed Redis and SeaweedFS (e2e/manifests/) and told
#: the chart about them; unset, the async test skips and no Secret is made.
DEPS_NAMESPACE = os.environ.get("KUBEINFER_E2E_DEPS_NAMESPACE") or None
S3_SECRET = os.environ.get("KUBEINFER_E2E_S3_SECRET") or None
#: The object store's Service and port (e2e/manifests/async-deps.yaml).
S3_SERVICE = "seaweedfs"
S3_PORT = 8333

# The operator's labels (render/k8s_meta.py).
LABEL_ENDPOINT = "kubeinfer.io/endpoint"
LABEL_VARIANT = "kubeinfer.io/variant"
LABEL_COMPONENT = "app.kubernetes.io/component"

T = TypeVar("T")


def skip_reason() -> str | None:
    if os.environ.get("KUBEINFER_E2E") != "1":
        return ("e2e tests need a kind cluster with the chart installed: run e2e/run.sh "
                "(it sets KUBEINFER_E2E=1); see e2e/README.md")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"KUBEINFER_E2E=1 but {', '.join(missing)} not on PATH: see e2e/README.md"
    return None


#: ``pytestmark`` of every e2e module: no cluster, no test (with the reason).
requires_cluster = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


# -- kubectl -------------------------------------------------------------------------------


def kubectl(*args: str, timeout: float = 60, check: bool = True) -> str:
    """Run kubectl; on failure raise with its stderr (the useful part)."""
    try:
        proc = subprocess.run(["kubectl", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        if not check:
            return ""
        raise AssertionError(f"kubectl {' '.join(args)} did not finish in {timeout:g}s") from exc
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def kubectl_json(*args: str, timeout: float = 60) -> Any:
    return json.loads(kubectl(*args, "-o", "json", timeout=timeout))


def wait_for(check: Callable[[], T | None], timeout: float, what: str,
             interval: float = 2.0) -> T:
    """Call ``check`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout:g}s waiting for {what} "
                                 f"(last check: {last!r})")
        time.sleep(interval)


# -- callers' credentials ------------------------------------------------------------------


_caller_keys: dict[str, tuple[str, str]] = {}


def caller_keys(namespace: str) -> tuple[str, str]:
    """The default SigV4 key pair of ``namespace``'s Endpoints (runtime.auth.defaultMode
    SigV4; derived per namespace by the operator): what NOTES.txt tells users to read,
    read the same way, from the namespace's runtime Secret."""
    if namespace not in _caller_keys:
        import base64

        secret = kubectl_json("-n", namespace, "get", "secret/kubeinfer-runtime")
        data = secret["data"]
        _caller_keys[namespace] = (base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode(),
                                   base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode())
    return _caller_keys[namespace]


# -- the object store of async endpoints (e2e/manifests/async-deps.yaml) -------------------


def object_store_credentials() -> tuple[str, str]:
    """The object store's access key pair, read from its ConfigMap (e2e/manifests/).

    One source of truth: the identity SeaweedFS was started with.
    """
    assert DEPS_NAMESPACE is not None
    raw = kubectl("-n", DEPS_NAMESPACE, "get", "configmap/seaweedfs-s3", "-o",
                  "jsonpath={.data.s3\\.json}")
    creds = json.loads(raw)["identities"][0]["credentials"][0]
    return str(creds["accessKey"]), str(creds["secretKey"])


def create_s3_secret(namespace: str) -> None:
    """The Secret the chart's ``runtime.s3.secretName`` makes every model server mount."""
    assert S3_SECRET is not None and DEPS_NAMESPACE is not None
    key, secret = object_store_credentials()
    kubectl("-n", namespace, "create", "secret", "generic", S3_SECRET,
            f"--from-literal=AWS_ACCESS_KEY_ID={key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
            f"--from-literal=AWS_ENDPOINT_URL=http://{S3_SERVICE}.{DEPS_NAMESPACE}.svc:{S3_PORT}",
            "--from-literal=AWS_REGION=us-east-1")


# -- manifests -----------------------------------------------------------------------------


def load_example(file_name: str) -> dict[str, Any]:
    """The (single) Endpoint document of ``examples/<file_name>``."""
    docs = [d for d in yaml.safe_load_all((EXAMPLES / file_name).read_text())
            if isinstance(d, dict) and d.get("kind") == "Endpoint"]
    assert len(docs) == 1, f"examples/{file_name}: expected one Endpoint, found {len(docs)}"
    return docs[0]


def write_manifest(doc: dict[str, Any], directory: Path) -> Path:
    """``doc`` as a file to ``kubectl apply``, checked against the API model first.

    A test's adjusted copy of an example (shorter timeouts, an s3:// path) must
    still be a valid Endpoint: checking here names the bad field at once
    instead of a 422 from the API server or a status condition later.
    """
    from kubeinfer_operator.api.endpoint import Endpoint

    Endpoint.model_validate(doc)
    path = directory / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- port-forward --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def port_forward(namespace: str, service: str, port: int) -> Iterator[int]:
    """``kubectl port-forward`` a Service to a free local port while the block runs."""
    local = free_port()
    proc = subprocess.Popen(
        ["kubectl", "-n", namespace, "port-forward", f"service/{service}", f"{local}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"kubectl port-forward to service/{service} exited: {out}")
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"kubectl port-forward to service/{service} did not open") from None
                time.sleep(0.2)
        yield local
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Endpoints and their children ----------------------------------------------------------


def resource(name: str) -> str:
    # Never a bare "endpoints": that is the core Endpoints kind.
    return f"endpoints.kubeinfer.io/{name}"


def apply_and_wait_ready(namespace: str, manifest: Path, name: str) -> dict[str, Any]:
    """``kubectl apply`` then wait for Ready; the Endpoint object as it is then."""
    kubectl("-n", namespace, "apply", "-f", str(manifest))
    kubectl("-n", namespace, "wait", "--for=condition=Ready", resource(name),
            f"--timeout={READY_TIMEOUT_S}s", timeout=READY_TIMEOUT_S + 30)
    obj: dict[str, Any] = kubectl_json("-n", namespace, "get", resource(name))
    status = obj.get("status", {})
    assert status.get("observedGeneration") == obj["metadata"]["generation"], status
    assert status.get("url"), f"{resource(name)}: status.url is not set: {status}"
    return obj


def gateway_of(obj: dict[str, Any]) -> tuple[str, int]:
    """The gateway Service name and port named by the Endpoint's ``status.url``."""
    url = obj["status"]["url"]
    parsed = urlparse(url)
    assert parsed.hostname, f"status.url {url!r} has no host"
    return parsed.hostname.split(".")[0], parsed.port or 80


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c.get("type") == type_), None)


def get_endpoint(namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubectl_json("-n", namespace, "get", resource(name))
    return obj


def deployment_replicas(namespace: str, deployment: str) -> int:
    """``spec.replicas`` of a Deployment: what the operator (its scaler) asked for."""
    obj = kubectl_json("-n", namespace, "get", f"deployment/{deployment}")
    return int(obj["spec"].get("replicas", 1))


def variant_pods(namespace: str, endpoint: str, variant: str,
                 ready_only: bool = False) -> list[str]:
    """Pods of one variant (terminating ones included unless ``ready_only``)."""
    selector = (f"{LABEL_ENDPOINT}={endpoint},{LABEL_VARIANT}={variant},"
                f"{LABEL_COMPONENT}=model-server")
    pods = kubectl_json("-n", namespace, "get", "pods", "-l", selector)["items"]
    out = []
    for pod in pods:
        ready = not pod["metadata"].get("deletionTimestamp") and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (pod.get("status") or {}).get("conditions", []))
        if ready or not ready_only:
            out.append(str(pod["metadata"]["name"]))
    return out


def endpoint_events(namespace: str, name: str, reason: str | None = None) -> list[str]:
    """Messages of the Events about Endpoint ``name`` (``reason`` only, when given).

    Read as JSON and filtered here; both Event shapes are understood (core/v1
    ``involvedObject``/``message`` and events.k8s.io ``regarding``/``note``).
    """
    out = []
    for event in kubectl_json("-n", namespace, "get", "events")["items"]:
        about = event.get("involvedObject") or event.get("regarding") or {}
        if about.get("kind") != "Endpoint" or about.get("name") != name:
            continue
        if reason is not None and event.get("reason") != reason:
            continue
        out.append(str(event.get("message") or event.get("note") or ""))
    return out


def owned_children(namespace: str, uid: str) -> list[str]:
    """Deployments, Services and ConfigMaps in ``namespace`` owned by object ``uid``."""
    items = kubectl_json("-n", namespace, "get", "deployments,services,configmaps")["items"]
    return [f"{o['kind']}/{o['metadata']['name']}" for o in items
            if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences", []))]


def delete_endpoint(namespace: str, name: str, uid: str) -> None:
    """Delete the Endpoint and wait until the garbage collector took all its children."""
    assert owned_children(namespace, uid), f"{resource(name)}: no child has its ownerReference"
    kubectl("-n", namespace, "delete", resource(name), "--wait", f"--timeout={GC_TIMEOUT_S}s",
            timeout=GC_TIMEOUT_S + 30)
    wait_for(lambda: not owned_children(namespace, uid), GC_TIMEOUT_S,
             f"the children of {resource(name)} to be garbage-collected")


# -- diagnostics ---------------------------------------------------------------------------


def _section(title: str, *args: str, limit: int = 6000) -> str:
    try:
        proc = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=30)
        out = (proc.stdout.strip() or proc.stderr.strip()) or "(nothing)"
    except subprocess.TimeoutExpired:
        out = "(kubectl did not answer within 30s)"
    if len(out) > limit:
        out = "...\n" + out[-limit:]
    return f"--- {title} (kubectl {' '.join(args)})\n{out}"


def diagnostics(namespace: str, name: str) -> str:
    """What the cluster says about Endpoint ``name``: status, objects, events, logs."""
    selector = f"{LABEL_ENDPOINT}={name}"
    return "\n".join([
        f"=== diagnostics of {resource(name)} in namespace {namespace}",
        _section("Endpoint status", "-n", namespace, "get", resource(name), "-o",
                 "jsonpath={.status}"),
        _section("objects", "-n", namespace, "get", "deployments,services,configmaps,pods",
                 "-o", "wide"),
        _section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
        _section("gateway log", "-n", namespace, "logs", f"deployment/{name}-gateway",
                 "--tail=80"),
        _section("model-server logs", "-n", namespace, "logs", "-l",
                 f"{selector},{LABEL_COMPONENT}=model-server", "--all-containers",
                 "--prefix", "--tail=40"),
        _section("operator log", "-n", RELEASE_NAMESPACE, "logs",
                 f"deployment/{FULLNAME}-operator", "--tail=80"),
    ])


@contextmanager
def diagnosed(namespace: str, name: str) -> Iterator[None]:
    """Report ``diagnostics`` with any failure leaving the block.

    Attached as a note to exceptions (pytest prints notes under the error);
    printed for pytest's own outcomes (``pytest.fail``, pytest-timeout), which
    are BaseExceptions whose notes pytest does not show, but whose captured
    output it does.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        report = diagnostics(namespace, name)
        if isinstance(exc, Exception):
            exc.add_note(report)
        else:
            print(report)
        raise
