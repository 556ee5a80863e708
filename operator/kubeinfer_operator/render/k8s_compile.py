"""A variant's compile step on Kubernetes: an init container of its model-server pod. PURE.

``model: {uri: x.onnx, compile: {target: native}}`` compiles the model for the
CPU of the node the pod runs on, so the compiler runs in that pod, before the
model server: a Job could land on another node with another CPU, and an
artifact built for one CPU is refused on another. The init container
(``kubeinfer-runtime compile``) writes the artifact into an emptyDir the model
server then mounts read-only and serves with ``format: compiled``. With
``compile.cacheUri`` the compiler first looks the artifact up by content (model,
CPU, versions, options) in the object store, so replicas and restarts on the
same kind of node download the first one's artifact instead of compiling; when
nothing beats onnxruntime fp32 the artifact is the ONNX model itself. The
compiler's report is the init container's termination message, which the
operator reads into the variant's status (``reconcile.compile_status``).
"""

from __future__ import annotations

import copy
from typing import Any

from kubeinfer_operator.render.compile_jobs import (
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_MEMORY_REQUEST,
)
from kubeinfer_operator.render.compile_plan import compile_env
from kubeinfer_operator.render.k8s_workloads import _container_security, _env
from kubeinfer_operator.render.plan import VariantPlan
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.compile import ARTIFACT_DIR

#: The init container's name (the status reader looks for it).
COMPILE_CONTAINER = "compile"
COMPILED_VOLUME = "compiled"
COMPILED_DIR = "/var/run/kubeinfer/compiled"
#: What the model server serves: the artifact folder the compiler published.
ARTIFACT_URI = f"file://{COMPILED_DIR}/{ARTIFACT_DIR}"


def compile_container(variant: VariantPlan, settings: OperatorSettings,
                      tmp_mount: dict[str, Any]) -> dict[str, Any]:
    """The init container compiling ``variant``'s model into the pod's ``compiled`` volume."""
    assert variant.compile is not None
    values = {**variant.compile.settings(), "output_uri": f"file://{COMPILED_DIR}"}
    if variant.compile.cache_uri is not None:
        values["artifact_cache_uri"] = variant.compile.cache_uri
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    threads = int(values.get("threads", 1))
    container: dict[str, Any] = {
        "name": COMPILE_CONTAINER,
        "image": settings.compiler_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["compile"],
        "env": _env(compile_env(values)),
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount, {"name": COMPILED_VOLUME, "mountPath": COMPILED_DIR}],
        # The report is the termination message; a crash before it leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": str(threads), "memory": DEFAULT_MEMORY_REQUEST},
                      "limits": {"memory": DEFAULT_MEMORY_LIMIT}},
    }
    if settings.s3_secret_name:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    return container


def with_compile_step(deployment: dict[str, Any], variant: VariantPlan,
                      settings: OperatorSettings) -> dict[str, Any]:
    """``deployment`` (the variant's model servers) compiling its model first."""
    if variant.compile is None:
        return deployment
    out = copy.deepcopy(deployment)
    pod = out["spec"]["template"]["spec"]
    server = pod["containers"][0]
    tmp_mount = next(m for m in server["volumeMounts"] if m["name"] == "tmp")
    pod["initContainers"] = [compile_container(variant, settings, tmp_mount),
                             *pod.get("initContainers", [])]
    pod["volumes"] = [*pod["volumes"], {"name": COMPILED_VOLUME, "emptyDir": {}}]
    server["volumeMounts"] = [*server["volumeMounts"],
                              {"name": COMPILED_VOLUME, "mountPath": COMPILED_DIR,
                               "readOnly": True}]
    overrides = {"KUBEINFER_MODEL_URI": ARTIFACT_URI, "KUBEINFER_MODEL_FORMAT": "compiled"}
    server["env"] = [{**e, "value": overrides[e["name"]]} if e["name"] in overrides else e
                     for e in server["env"]]
    return out
