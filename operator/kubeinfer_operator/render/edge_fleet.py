"""The Kubernetes objects of one EdgeFleet: PURE.

* per version and target, a package ``batch/v1`` Job ``<fleet>-pkg-<hash>``
  running ``kubeinfer-runtime edge package`` (the ``compiler`` image when the
  target compiles, else the runtime image). Its report (``{uri, sha256, size,
  signature, publicKey, version, target}``) is the container's termination
  message. The signing key reaches it through ``secretKeyRef`` only. As a
  CompilationJob's: exit 42 (bad input) fails it at once, disruptions are not
  counted, the pod is locked down, the S3 Secret comes by reference;
* ``<fleet>-fleet-config``: a ConfigMap holding the ``FleetConfig`` JSON;
* ``<fleet>-fleet-server``: the fleet server Deployment (role ``fleet-server``,
  ``FleetServerSettings`` env: the config file mounted from the ConfigMap, the
  Redis URL, the bootstrap token from the user's Secret, and the status token
  from the namespace's runtime Secret, key ``edge-status-<fleet>``; a hash of the
  status token in the pod template rolls the pods when it changes), its ClusterIP
  Service and, at two replicas or more, a PodDisruptionBudget.

The operator never reads the user's Secrets (bootstrap token, signing key, Redis
URL): pods get them by reference, and the operator asks the fleet server for its
status with the status token it keeps in the runtime Secret (``render.k8s_secrets``).

Everything is owned by the EdgeFleet (deleting it deletes them) and labelled
``kubeinfer.io/edge-fleet``.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.api import edge_fleet as ef
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render.compile_jobs import (
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_MEMORY_REQUEST,
    pod_failure_policy,
)
from kubeinfer_operator.render.edge_plan import FleetPlan, PackageBuild
from kubeinfer_operator.render.k8s_placement import apply_pod_template, effective_template
from kubeinfer_operator.render.k8s_workloads import (
    ANNOTATION_SECRET_HASH,
    GATEWAY_HEALTH_PATH,
    PORT_NAME,
    _container_security,
    _env,
    _pod_security,
    _probe,
    _tmp_volume,
    default_resources,
    deployment,
    escape_expansion,
    runtime_pod_spec,
    service_url,
)
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import ENV_PREFIX, Role
from kubeinfer_runtime.contract.edge import FleetConfig, FleetServerSettings

#: kubeinfer's label on every object of an EdgeFleet (to list and watch them).
LABEL_EDGE_FLEET = "kubeinfer.io/edge-fleet"
#: On package Jobs and pods: the version and target they build.
LABEL_EDGE_VERSION = "kubeinfer.io/edge-version"
LABEL_EDGE_TARGET = "kubeinfer.io/edge-target"
COMPONENT_PACKAGER = "edge-packager"
COMPONENT_FLEET_SERVER = "fleet-server"
COMPONENT_FLEET_CONFIG = "fleet-config"
#: The package Job's container (its podFailurePolicy and the status reader name it).
PACKAGE_CONTAINER = "package"
#: The env var the package command reads the signing key from (base64 raw ed25519).
ENV_SIGNING_KEY = "KUBEINFER_EDGE_SIGNING_KEY"
ENV_REPORT_FILE = "KUBEINFER_REPORT_FILE"
TERMINATION_LOG = "/dev/termination-log"
#: Where the fleet config ConfigMap is mounted (a directory: kubelet refreshes it in place
#: and the fleet server re-reads the file when it changes).
CONFIG_MOUNT_DIR = "/etc/kubeinfer/fleet"
CONFIG_FILENAME = "fleet.json"
#: Bounds of a package Job: retries that may pass, time, and how long a finished Job stays
#: (its report is in the EdgeFleet's status as soon as it succeeds).
PACKAGE_BACKOFF_LIMIT = 2
PACKAGE_DEADLINE_S = 3600
PACKAGE_COMPILE_DEADLINE_S = 3 * 3600
PACKAGE_TTL_S = 3600
#: A package Job that only ships the model needs little.
PACKAGE_CPU_REQUEST = "250m"
PACKAGE_MEMORY_REQUEST = "256Mi"
PACKAGE_MEMORY_LIMIT = "1Gi"


def config_name(fleet: str) -> str:
    return f"{fleet}-fleet-config"


def server_name(fleet: str) -> str:
    return f"{fleet}-fleet-server"


def server_url(fleet: str, namespace: str, settings: OperatorSettings) -> str:
    """The fleet server's in-cluster base URL (its Service)."""
    return service_url(server_name(fleet), namespace, settings.runtime_port)


def selector(fleet: str) -> dict[str, str]:
    """Labels every object of one EdgeFleet carries."""
    return {LABEL_EDGE_FLEET: fleet, meta.LABEL_MANAGED_BY: meta.MANAGED_BY}


def labels(fleet: str, component: str) -> dict[str, str]:
    return {meta.LABEL_NAME: meta.APP_NAME, meta.LABEL_INSTANCE: fleet,
            meta.LABEL_COMPONENT: component, meta.LABEL_PART_OF: meta.APP_NAME,
            **selector(fleet)}


def pod_selector(fleet: str, component: str) -> dict[str, str]:
    """The fleet server's Deployment/Service selector (immutable: stable labels only)."""
    return {LABEL_EDGE_FLEET: fleet, meta.LABEL_COMPONENT: component}


def owner_reference(fleet: str, uid: str) -> dict[str, Any]:
    return {**meta.owner_reference(fleet, uid), "apiVersion": ef.API_VERSION, "kind": ef.KIND}


def runtime_secret_owner(fleet: str, uid: str) -> dict[str, Any]:
    """The EdgeFleet as one more owner of the namespace's runtime Secret (not its
    controller: the Secret is shared and goes away with the last of its owners)."""
    return {**owner_reference(fleet, uid), "controller": False, "blockOwnerDeletion": False}


def status_token_hash(token: str) -> str:
    """What the fleet server's pod template carries of its status token (it rolls the pods
    when the token changes: env is read only at start)."""
    return meta.content_hash({"edge-status-token": token})


def _metadata(plan: FleetPlan, uid: str, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": plan.namespace, "labels": labels(plan.name, component),
            "ownerReferences": [owner_reference(plan.name, uid)]}


def _secret_env(name: str, ref: ef.SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


# -- package Jobs -------------------------------------------------------------------------------


def _package_resources(build: PackageBuild) -> dict[str, Any]:
    if build.compile_target is not None:  # TVM's compiler wants what a CompilationJob gets
        return {"requests": {"cpu": "1", "memory": DEFAULT_MEMORY_REQUEST},
                "limits": {"memory": DEFAULT_MEMORY_LIMIT}}
    return {"requests": {"cpu": PACKAGE_CPU_REQUEST, "memory": PACKAGE_MEMORY_REQUEST},
            "limits": {"memory": PACKAGE_MEMORY_LIMIT}}


def package_job(plan: FleetPlan, build: PackageBuild, *, uid: str,
                settings: OperatorSettings) -> dict[str, Any]:
    """The Job building ``build.target``'s package of ``plan.version``."""
    tmp_volume, tmp_mount = _tmp_volume()
    container: dict[str, Any] = {
        "name": PACKAGE_CONTAINER,
        "image": settings.compiler_image if build.compile_target else settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": [escape_expansion(a) for a in build.args],
        "env": [*_env({ENV_REPORT_FILE: TERMINATION_LOG}),
                _secret_env(ENV_SIGNING_KEY, plan.spec.signing.keySecret)],
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount],
        # The report is the termination message; a crash before it leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": _package_resources(build),
    }
    if settings.s3_secret_name:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    pod_labels = {**labels(plan.name, COMPONENT_PACKAGER), LABEL_EDGE_VERSION: plan.version,
                  LABEL_EDGE_TARGET: build.target}
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [tmp_volume],
    }
    metadata = _metadata(plan, uid, build.job_name, COMPONENT_PACKAGER)
    metadata["labels"] = pod_labels
    metadata["annotations"] = {ANNOTATION_RUN_HASH: build.run_hash}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": PACKAGE_BACKOFF_LIMIT,
            "activeDeadlineSeconds": (PACKAGE_COMPILE_DEADLINE_S if build.compile_target
                                      else PACKAGE_DEADLINE_S),
            "ttlSecondsAfterFinished": PACKAGE_TTL_S,
            "podFailurePolicy": pod_failure_policy(PACKAGE_CONTAINER),
            # The chart's default placement (a package Job has no podTemplate of its own).
            "template": apply_pod_template({"metadata": {"labels": pod_labels}, "spec": pod},
                                           effective_template(settings.default_pod_template,
                                                              None), pod_labels),
        },
    }


# -- the fleet server ---------------------------------------------------------------------------


def fleet_configmap(plan: FleetPlan, config: FleetConfig, *, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, uid, config_name(plan.name), COMPONENT_FLEET_CONFIG),
        "data": {CONFIG_FILENAME: config.model_dump_json(indent=None)},
    }


def _settings_env(name: str) -> str:
    """``KUBEINFER_<NAME>`` of a FleetServerSettings field (KeyError: no such field)."""
    if name not in FleetServerSettings.model_fields:
        raise KeyError(name)
    return ENV_PREFIX + name.upper()


def server_env(plan: FleetPlan, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The fleet server's env: literals, then what it reads from Secrets."""
    spec = plan.spec
    literal = {
        _settings_env("fleet_config_file"): f"{CONFIG_MOUNT_DIR}/{CONFIG_FILENAME}",
        _settings_env("port"): str(settings.runtime_port),
    }
    if spec.redis.url is not None:
        literal[_settings_env("redis_url")] = spec.redis.url
    out: list[dict[str, Any]] = _env(literal)
    if spec.redis.urlSecret is not None:
        out.append(_secret_env(_settings_env("redis_url"), spec.redis.urlSecret))
    out.append(_secret_env(_settings_env("bootstrap_token"),
                           spec.registration.bootstrapTokenSecret))
    # Optional: without the key the fleet server still starts (only the bootstrap token
    # reads its status then); the operator writes it before the Deployment.
    out.append(secrets.secret_env(_settings_env("status_token"), settings.runtime_secret_name,
                                  secrets.edge_status_key(plan.name)))
    return out


def fleet_server_deployment(plan: FleetPlan, *, uid: str, settings: OperatorSettings,
                            status_token: str | None = None) -> dict[str, Any]:
    spec = plan.spec
    tmp_volume, tmp_mount = _tmp_volume()
    config_volume = {"name": "fleet-config", "configMap": {"name": config_name(plan.name)}}
    config_mount = {"name": "fleet-config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True}
    container: dict[str, Any] = {
        "name": Role.FLEET_SERVER.value,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["serve", "--role", Role.FLEET_SERVER.value],
        "ports": [{"name": PORT_NAME, "containerPort": settings.runtime_port,
                   "protocol": "TCP"}],
        "env": server_env(plan, settings),
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount, config_mount],
        "readinessProbe": _probe(GATEWAY_HEALTH_PATH, period=5, failures=3),
        "livenessProbe": _probe(GATEWAY_HEALTH_PATH, period=10, failures=3),
        "resources": default_resources(dict(spec.server.resources.requests),
                                       dict(spec.server.resources.limits), settings),
    }
    if settings.s3_secret_name:
        # The fleet server reads packages (and writes captures) in the object store.
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    pod_spec = runtime_pod_spec(settings, container, [tmp_volume, config_volume])
    own_template = (spec.server.podTemplate.written()
                    if spec.server.podTemplate is not None else None)
    template_meta: dict[str, Any] = {"labels": labels(plan.name, COMPONENT_FLEET_SERVER)}
    if status_token is not None:
        template_meta["annotations"] = {ANNOTATION_SECRET_HASH: status_token_hash(status_token)}
    return deployment(_metadata(plan, uid, server_name(plan.name), COMPONENT_FLEET_SERVER),
                      pod_selector(plan.name, COMPONENT_FLEET_SERVER), template_meta, pod_spec,
                      effective_template(settings.default_pod_template, own_template),
                      spec.server.replicas)


def fleet_server_service(plan: FleetPlan, *, uid: str,
                         settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, uid, server_name(plan.name), COMPONENT_FLEET_SERVER),
        "spec": {
            "type": "ClusterIP",
            "selector": pod_selector(plan.name, COMPONENT_FLEET_SERVER),
            "ports": [{"name": PORT_NAME, "port": settings.runtime_port,
                       "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def fleet_server_pdb(plan: FleetPlan, *, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(plan, uid, server_name(plan.name), COMPONENT_FLEET_SERVER),
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": pod_selector(plan.name, COMPONENT_FLEET_SERVER)}},
    }


def fleet_server_objects(plan: FleetPlan, config: FleetConfig, *, uid: str,
                         settings: OperatorSettings,
                         status_token: str | None = None) -> list[dict[str, Any]]:
    """ConfigMap, Deployment, Service and (two replicas or more) PodDisruptionBudget, each
    stamped with its applied hash (the operator patches only what changed).
    ``status_token``: the fleet's status token as the runtime Secret holds it (only its
    hash goes into the Deployment)."""
    out = [fleet_configmap(plan, config, uid=uid),
           fleet_server_deployment(plan, uid=uid, settings=settings,
                                   status_token=status_token),
           fleet_server_service(plan, uid=uid, settings=settings)]
    if plan.spec.server.replicas >= 2:
        out.append(fleet_server_pdb(plan, uid=uid))
    return [meta.with_applied_hash(m) for m in out]
