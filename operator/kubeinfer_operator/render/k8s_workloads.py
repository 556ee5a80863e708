"""Kubernetes manifests of one Endpoint's children (Deployments, Services, ConfigMap): PURE.

Each function turns part of an ``EndpointPlan`` plus the operator's settings
into one manifest dict, ready for the API. ``render.k8s.render_endpoint`` puts
them together. Pods are locked down (non-root, read-only root filesystem, no
privilege escalation, no capabilities, RuntimeDefault seccomp); the only
writable path is an emptyDir at /tmp, where the model server caches models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render.async_plan import AsyncPlan
from kubeinfer_operator.render.k8s_placement import (
    apply_pod_template,
    complete_resources,
    effective_template,
)
from kubeinfer_operator.render.plan import VariantPlan
from kubeinfer_operator.render.plan_steps import BIND_TO_PORT_ENV, StepPlan
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import (
    GRACEFUL_SHUTDOWN_S,
    ROUTE_TABLE_FILENAME,
    AsyncWorkerSettings,
    GatewaySettings,
    Role,
    RouteTable,
)

#: Where the route-table ConfigMap is mounted in gateway pods (a directory
#: mount, not subPath: kubelet only refreshes whole-directory ConfigMap mounts).
ROUTES_MOUNT_DIR = "/etc/kubeinfer"
PORT_NAME = "http"
MODEL_SERVER_READY_PATH = "/v2/health/ready"
MODEL_SERVER_LIVE_PATH = "/v2/health/live"
GATEWAY_HEALTH_PATH = "/ping"
#: Pod-template annotation: hash of the runtime Secret values the pod reads as env.
ANNOTATION_SECRET_HASH = "kubeinfer.io/runtime-secret-hash"
#: Port name of the runtime containers' metrics-only listener (GET /metrics).
METRICS_PORT_NAME = "metrics"
#: Port name of the headless gateway-pods Service (see ``gateway_pods_service``).
GATEWAY_PODS_PORT_NAME = "scrape"
#: What ``_runtime_container`` renders into every runtime container besides its role's
#: settings (``model_server_deployment`` adds ``KUBEINFER_OUTBOUND_ALLOW`` to async
#: workers; ``secrets.runtime_env`` the Redis URL and scaler token).
RUNTIME_CONTAINER_ENV = frozenset({"KUBEINFER_PORT", "KUBEINFER_METRICS_PORT",
                                   "KUBEINFER_EXIT_ON_LOAD_FAILURE"})
#: Seconds a gateway or model server keeps serving after its pod is deleted, before it gets
#: SIGTERM (a preStop sleep). SIGTERM makes uvicorn close its listener at once, but the pod
#: stays in its Service's endpoints until kube-proxy (the gateway's Service) and cluster DNS
#: (the model servers' headless Service: CoreDNS's 5 s TTL, then the gateway's re-resolve)
#: catch up: without the delay, requests sent meanwhile are refused and lost in every
#: rolling update and scale-down.
PRESTOP_SLEEP_S = 8
#: Seconds left after a role's own shutdown bounds for the rest (closing pools, exiting).
SHUTDOWN_SLACK_S = 5
#: The grace period Kubernetes gives when none is rendered; never render less.
DEFAULT_GRACE_S = 30


@dataclass(frozen=True)
class Owner:
    """The Endpoint object that owns (and garbage-collects) the rendered children."""

    name: str
    namespace: str
    uid: str


def object_metadata(owner: Owner, name: str, component: str,
                    variant: str | None = None) -> dict[str, Any]:
    """Name, namespace, standard labels and the owner reference every child carries."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": meta.labels(owner.name, component, variant),
        "ownerReferences": [meta.owner_reference(owner.name, owner.uid)],
    }


def _pod_security(settings: OperatorSettings) -> dict[str, Any]:
    uid = settings.runtime_uid
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def escape_expansion(value: str) -> str:
    """``value`` as a container of kubeinfer's image must see it in an env value, a command
    or an argument.

    The kubelet expands ``$(NAME)`` there from the container's other variables, the
    ones filled from Secrets included (the object store's keys, the Redis URL, the
    scaler and fleet tokens): a model URI, a webhook URL or an output folder written
    ``.../$(AWS_SECRET_ACCESS_KEY)`` would carry that secret to a log, an object key or
    another host. ``$$`` is the kubelet's escape for ``$``, and any other ``$`` passes
    unchanged, so doubling every ``$`` hands the value over exactly as written.
    """
    return value.replace("$", "$$")


def _env(values: dict[str, str]) -> list[dict[str, str]]:
    """Literal env entries of a container running kubeinfer's image (see ``escape_expansion``)."""
    return [{"name": k, "value": escape_expansion(v)} for k, v in values.items()]


def _user_env(values: dict[str, str]) -> list[dict[str, str]]:
    """Env entries of a user's own image, as written: ``$(NAME)`` expands there as the
    user expects (no Secret of kubeinfer's is in that container to expand)."""
    return [{"name": k, "value": v} for k, v in values.items()]


def variant_resources(variant: VariantPlan, settings: OperatorSettings) -> dict[str, Any]:
    """The spec's resources, with what it leaves out filled in from the operator's
    defaults (cpu and memory requests, a memory limit; ``complete_resources``): a
    serverless variant's memory alone still gets a CPU request."""
    return default_resources(dict(variant.requests), dict(variant.limits), settings)


def default_resources(requests: dict[str, str], limits: dict[str, str],
                      settings: OperatorSettings) -> dict[str, Any]:
    """``requests``/``limits`` completed with the operator's default requests and limit."""
    return complete_resources(requests, limits, cpu=settings.default_cpu_request,
                              memory=settings.default_memory_request,
                              memory_limit=settings.default_memory_limit)


def termination_grace_s(role: Role) -> int:
    """terminationGracePeriodSeconds of a runtime role's pods: the kubelet SIGKILLs at its end,
    so it covers the preStop sleep plus everything the role does after SIGTERM within its
    own bounds. Whatever is still running at the SIGKILL is lost without being counted:
    in-flight requests, the gateway's buffered capture records (``capture_writer.close``
    counts what it could not write only if it gets to run), an async worker's release."""
    if role is Role.GATEWAY:
        capture_s = float(GatewaySettings.model_fields["capture_shutdown_timeout_s"].default)
        need: float = PRESTOP_SLEEP_S + GRACEFUL_SHUTDOWN_S + capture_s
    elif role is Role.MODEL_SERVER:
        need = PRESTOP_SLEEP_S + GRACEFUL_SHUTDOWN_S
    elif role is Role.ASYNC_WORKER:
        # No Service sends it requests (no preStop); its HTTP drain is /ping's, then the
        # queue's drain (``queue.worker``) and the release of what did not finish.
        need = float(AsyncWorkerSettings.model_fields["drain_timeout_s"].default)
    else:
        need = GRACEFUL_SHUTDOWN_S
    return max(DEFAULT_GRACE_S, math.ceil(need + SHUTDOWN_SLACK_S))


def prestop_sleep(seconds: int = PRESTOP_SLEEP_S) -> dict[str, Any]:
    """The lifecycle of a container that serves through a Service: keep serving ``seconds``
    (``PRESTOP_SLEEP_S``) after the pod is deleted, until no new request is routed to it.

    An exec of the image's ``sleep`` (kubeinfer's runtime image is Debian-based), not the
    ``sleep`` action: that needs Kubernetes 1.30, and the chart supports 1.29. Should the
    command be missing, the kubelet records a FailedPreStopHook event and sends SIGTERM at
    once: what happens without this hook."""
    return {"preStop": {"exec": {"command": ["sleep", str(seconds)]}}}


def runtime_pod_spec(settings: OperatorSettings, container: dict[str, Any],
                     volumes: list[dict[str, Any]], *, grace_s: int = DEFAULT_GRACE_S
                     ) -> dict[str, Any]:
    """The pod spec of a runtime container (model server, gateway, fleet server);
    ``grace_s``: its terminationGracePeriodSeconds (``termination_grace_s``)."""
    return {
        # The runtime never calls the Kubernetes API: no token in its pods.
        "automountServiceAccountToken": False,
        # Service env vars (FOO_SERVICE_HOST for every Service) are noise here.
        "enableServiceLinks": False,
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": grace_s,
        "containers": [container],
        "volumes": volumes,
    }


def deployment(metadata: dict[str, Any], selector: dict[str, str],
               template_meta: dict[str, Any], pod_spec: dict[str, Any],
               pod_template: dict[str, Any] | None, replicas: int) -> dict[str, Any]:
    """A Deployment of ``pod_spec`` with ``pod_template`` (placement and identity, already
    merged with the chart's default) applied; ``metadata`` records which pod annotations
    are the user's, so a later render can remove the ones they drop."""
    template = apply_pod_template({"metadata": template_meta, "spec": pod_spec},
                                  pod_template or {}, selector)
    user_annotations = (pod_template or {}).get("annotations") or {}
    if user_annotations:
        metadata["annotations"] = {meta.ANNOTATION_POD_ANNOTATIONS: ",".join(
            sorted(user_annotations))}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            # Surge, never go below the wanted capacity while a variant rolls.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": template,
        },
    }


def _deployment(owner: Owner, name: str, component: str, variant: str | None,
                replicas: int, pod_annotations: dict[str, str],
                pod_spec: dict[str, Any],
                pod_template: dict[str, Any] | None = None) -> dict[str, Any]:
    """``pod_template``: placement and identity (``podTemplate``, already merged)."""
    template_meta: dict[str, Any] = {"labels": meta.labels(owner.name, component, variant)}
    if pod_annotations:
        template_meta["annotations"] = pod_annotations
    return deployment(object_metadata(owner, name, component, variant),
                      meta.pod_selector(owner.name, component, variant), template_meta,
                      pod_spec, pod_template, replicas)


def _service(owner: Owner, name: str, component: str, variant: str | None,
             settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(owner, name, component, variant),
        "spec": {
            "type": "ClusterIP",
            "selector": meta.pod_selector(owner.name, component, variant),
            "ports": [{"name": PORT_NAME, "port": settings.runtime_port,
                       "targetPort": PORT_NAME, "protocol": "TCP"},
                      {"name": METRICS_PORT_NAME, "port": settings.metrics_port,
                       "targetPort": METRICS_PORT_NAME, "protocol": "TCP"}],
        },
    }


def _tmp_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def _runtime_container(role: Role, settings: OperatorSettings, env: dict[str, str],
                       mounts: list[dict[str, Any]],
                       secret_env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``env``: literal values (never secrets); ``secret_env``: entries read from Secrets."""
    secret_env = secret_env or []
    # A Secret's entry is the operator's: no literal of the same name beside it (Kubernetes
    # would take whichever comes last).
    from_secrets = {e["name"] for e in secret_env}
    literal = {k: v for k, v in env.items() if k not in from_secrets}
    return {
        "name": role.value,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["serve", "--role", role.value],
        "ports": [{"name": PORT_NAME, "containerPort": settings.runtime_port,
                   "protocol": "TCP"},
                  {"name": METRICS_PORT_NAME, "containerPort": settings.metrics_port,
                   "protocol": "TCP"}],
        "env": _env({**literal, "KUBEINFER_PORT": str(settings.runtime_port),
                     "KUBEINFER_METRICS_PORT": str(settings.metrics_port)})
               + secret_env,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }


def model_server_deployment(owner: Owner, variant: VariantPlan,
                            settings: OperatorSettings,
                            async_plan: AsyncPlan | None = None) -> dict[str, Any]:
    """The variant's Deployment: model servers, or async workers for ``type: Async``."""
    tmp_volume, tmp_mount = _tmp_volume()
    env = variant.server_env(owner.name)
    if async_plan is not None:
        # The Redis URL (its password) comes from the runtime Secret, not a literal.
        env.update(async_plan.worker_env(None))
        # Webhooks obey the operator's allow-list, empty included: always rendered, last,
        # so no other source of the name can widen it.
        env["KUBEINFER_OUTBOUND_ALLOW"] = settings.outbound_allow
    else:
        # A model that fails to load ends the container (exit 3, the reason in its last
        # state): the kubelet retries it with back-off, and the scaler answers a
        # serverless variant's held requests at once (reconcile.start_failure).
        env["KUBEINFER_EXIT_ON_LOAD_FAILURE"] = "true"
    role = Role.ASYNC_WORKER if async_plan else Role.MODEL_SERVER
    container = _runtime_container(role, settings, env, [tmp_mount],
                                   secrets.runtime_env(settings, redis=async_plan is not None,
                                                       scaler=False))
    container["readinessProbe"] = _probe(MODEL_SERVER_READY_PATH, period=5, failures=3)
    container["livenessProbe"] = _probe(MODEL_SERVER_LIVE_PATH, period=10, failures=3)
    container["resources"] = variant_resources(variant, settings)
    if settings.s3_secret_name:
        # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_ENDPOINT_URL) from the
        # Secret: the runtime's settings read these standard names.
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    if async_plan is None:
        container["lifecycle"] = prestop_sleep()
    pod_spec = runtime_pod_spec(settings, container, [tmp_volume],
                                grace_s=termination_grace_s(role))
    # Multi-container image steps: extra containers in the same pod, each on its
    # own port; the runtime container reaches them on 127.0.0.1.
    pod_spec["containers"] += [_image_step_container(s, tmp_mount, settings)
                               for s in variant.steps if s.kind == "image"]
    annotations = {meta.ANNOTATION_SERVER_HASH: variant.server_hash}
    if async_plan is not None and settings.redis_url:
        annotations[ANNOTATION_SECRET_HASH] = secrets.env_hash(owner.namespace, settings,
                                                               redis=True, scaler=False)
    return _deployment(
        owner, meta.variant_object_name(owner.name, variant.name), meta.COMPONENT_MODEL_SERVER,
        variant.name, variant.replicas,
        # Only what must restart a model server changes the pod template.
        annotations,
        pod_spec,
        effective_template(settings.default_pod_template, variant.pod_template),
    )


def image_step_probes(port_name: str) -> dict[str, dict[str, Any]]:
    """Probes of a SageMaker-contract image: ``GET /ping`` (the contract's health check).

    Its startup probe gives the image 10 minutes to load its model before the
    liveness probe may restart it.
    """
    ping = {"httpGet": {"path": "/ping", "port": port_name}, "timeoutSeconds": 2}
    return {
        "startupProbe": {**ping, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**ping, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**ping, "periodSeconds": 10, "failureThreshold": 6},
    }


def _image_step_container(step: StepPlan, tmp_mount: dict[str, Any],
                          settings: OperatorSettings) -> dict[str, Any]:
    """A user image speaking the SageMaker container contract on ``step.port``."""
    assert step.image is not None and step.port is not None
    port_name = f"step-{step.port}"
    security = _container_security()
    # Third-party serving images commonly write outside /tmp.
    security["readOnlyRootFilesystem"] = False
    return {
        "name": f"step-{step.name}",
        "image": step.image,
        "ports": [{"name": port_name, "containerPort": step.port, "protocol": "TCP"}],
        # SageMaker tells each container of a multi-container endpoint its port so.
        "env": _user_env({**dict(step.env), BIND_TO_PORT_ENV: str(step.port)}),
        **image_step_probes(port_name),
        # The runtime container sends requests here through its preStop sleep and then
        # while it drains them: the step gets SIGTERM only after both (an image without
        # ``sleep`` gets it at once, as without the hook), within the pod's grace period.
        "lifecycle": prestop_sleep(PRESTOP_SLEEP_S + GRACEFUL_SHUTDOWN_S),
        "resources": default_resources(dict(step.requests), dict(step.limits), settings),
        "securityContext": security,
        "volumeMounts": [tmp_mount],
    }


def model_server_service(owner: Owner, variant: VariantPlan,
                         settings: OperatorSettings) -> dict[str, Any]:
    service = _service(owner, meta.variant_object_name(owner.name, variant.name),
                       meta.COMPONENT_MODEL_SERVER, variant.name, settings)
    # Headless: cluster DNS answers with the ready pods' addresses, so the
    # gateway balances, health-checks and pins multi-model targets per pod
    # (route discovery "dns") instead of kube-proxy choosing for it.
    service["spec"]["clusterIP"] = "None"
    return service


def gateway_deployment(owner: Owner, settings: OperatorSettings,
                       auth: secrets.ResolvedAuth | None = None,
                       pod_template: dict[str, Any] | None = None,
                       s3: bool = False) -> dict[str, Any]:
    """``pod_template``: the Endpoint's ``spec.gateway.podTemplate`` as written; ``s3``: the
    gateway writes to the object store (data capture to s3://), with the model servers'
    S3 credentials."""
    tmp_volume, tmp_mount = _tmp_volume()
    routes_volume = {"name": "routes",
                     "configMap": {"name": meta.routes_name(owner.name)}}
    routes_mount = {"name": "routes", "mountPath": ROUTES_MOUNT_DIR, "readOnly": True}
    env = {"KUBEINFER_ROUTE_TABLE_PATH": f"{ROUTES_MOUNT_DIR}/{ROUTE_TABLE_FILENAME}"}
    if settings.scaler_url:
        # Serverless activator: where held requests ask for a replica (the operator),
        # with the namespace's scaler token (from the runtime Secret).
        env["KUBEINFER_SCALER_URL"] = settings.scaler_url
        env["KUBEINFER_NAMESPACE"] = owner.namespace
    volumes = [tmp_volume, routes_volume]
    mounts = [tmp_mount, routes_mount]
    credentials = secrets.auth_volume(auth, settings) if auth is not None else None
    if credentials is not None:
        volumes.append(credentials[0])
        mounts.append(credentials[1])
    # Async endpoints' queue: the Redis URL from the runtime Secret.
    container = _runtime_container(Role.GATEWAY, settings, env, mounts,
                                   secrets.runtime_env(settings, redis=True, scaler=True))
    container["readinessProbe"] = _probe(GATEWAY_HEALTH_PATH, period=5, failures=3)
    container["livenessProbe"] = _probe(GATEWAY_HEALTH_PATH, period=10, failures=3)
    container["lifecycle"] = prestop_sleep()
    if s3 and settings.s3_secret_name:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    container["resources"] = {
        "requests": {"cpu": settings.gateway_cpu_request,
                     "memory": settings.gateway_memory_request},
        "limits": {"memory": settings.gateway_memory_limit},
    }
    # No hash of the route table here: weight and readiness changes rewrite the
    # ConfigMap only, and the gateway reloads it without a restart. A new Redis URL
    # or scaler token (read as env) does need one.
    annotations = {}
    if settings.redis_url or settings.scaler_url:
        annotations[ANNOTATION_SECRET_HASH] = secrets.env_hash(owner.namespace, settings,
                                                               redis=True, scaler=True)
    return _deployment(owner, meta.gateway_name(owner.name), meta.COMPONENT_GATEWAY, None,
                       settings.gateway_replicas, annotations,
                       runtime_pod_spec(settings, container, volumes,
                                        grace_s=termination_grace_s(Role.GATEWAY)),
                       effective_template(settings.default_pod_template, pod_template))


def gateway_service(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    return _service(owner, meta.gateway_name(owner.name), meta.COMPONENT_GATEWAY, None,
                    settings)


def gateway_pods_service(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    """Headless Service over the gateway pods: its DNS name resolves to every ready pod.

    The operator's scaler scrapes each gateway pod's ``/metrics`` (the gateway
    Service would hand each scrape to one pod of several, so counts would be a
    fraction that flips between pods), but it finds the pods from the API, not
    through this Service: the Service is in the tenant's namespace, where an
    editor could repoint it (``k8s.pods``). It stays for people and tools that
    want every gateway pod by one name. Its one port is named ``scrape``, not
    ``metrics``, so a ServiceMonitor selecting port ``metrics`` (the chart's)
    does not scrape the gateway pods a second time through it.
    """
    service = _service(owner, meta.gateway_pods_name(owner.name), meta.COMPONENT_GATEWAY, None,
                       settings)
    service["spec"]["clusterIP"] = "None"
    service["spec"]["ports"] = [{"name": GATEWAY_PODS_PORT_NAME, "port": settings.metrics_port,
                                 "targetPort": METRICS_PORT_NAME, "protocol": "TCP"}]
    return service


def routes_configmap(owner: Owner, table: RouteTable) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_metadata(owner, meta.routes_name(owner.name), meta.COMPONENT_ROUTES),
        "data": {ROUTE_TABLE_FILENAME: table.to_json()},
    }


def service_url(name: str, namespace: str, port: int) -> str:
    """In-cluster base URL of a Service (resolvable from any namespace)."""
    return f"http://{name}.{namespace}.svc:{port}"
