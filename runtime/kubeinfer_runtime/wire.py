"""The contract's plain names: the env prefix, payload limits, SageMaker header names,
roles and model formats, importable without pydantic.

``kubeinfer_runtime.contract`` re-exports every one of them and stays the place the
operator and the runtime agree on. They live here because importing the contract
package builds its pydantic models: a model server's start (which every pod pays at
each scale-from-zero and rollout, issue 18) needs these names and the settings reader
of ``server_env``, and none of those models.
"""

from __future__ import annotations

from enum import StrEnum

ENV_PREFIX = "KUBEINFER_"

#: Name of the route-table file inside the ConfigMap / local state directory.
ROUTE_TABLE_FILENAME = "routes.json"

#: Exit code of a model server whose model failed to load when it is told to exit
#: (``exit_on_load_failure``, set by the operator on Kubernetes), so the operator tells
#: that failure from a crash in the container's last state (``contract.scale``).
LOAD_FAILED_EXIT_CODE = 3

#: Seconds an idle connection to a container speaking the SageMaker contract (a
#: pipeline's image step, a batch job's image) is kept for reuse: inside gunicorn's
#: default keep-alive (2 s), which many such images serve with, so a request never goes
#: out on a connection the container is closing (a dropped request, not an answer).
CONTAINER_KEEPALIVE_S = 1.0

#: Seconds a runtime server lets in-flight requests finish after SIGTERM (uvicorn's
#: graceful shutdown) before it cancels them (a cancelled request is answered a bare 500).
#: SageMaker's bound on a real-time invocation, which is the gateway's default
#: ``upstream_timeout_s``: a request a rollout or scale-down finds in flight is never cut
#: short. The drain ends as soon as the last one is answered. The operator sizes each
#: pod's terminationGracePeriodSeconds from it (plus a preStop delay and the role's own
#: shutdown work), so the kubelet's SIGKILL never cuts a drain short.
GRACEFUL_SHUTDOWN_S = 60

#: SageMaker's synchronous payload limit (InvokeEndpoint): 6 MB.
REALTIME_MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
#: SageMaker's serverless payload limit: 4 MB.
SERVERLESS_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

#: Header names of the SageMaker Runtime API (lower case, as ASGI gives them).
H_TARGET_VARIANT = "x-amzn-sagemaker-target-variant"
H_INVOKED_VARIANT = "x-amzn-invoked-production-variant"
H_CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
H_INFERENCE_ID = "x-amzn-sagemaker-inference-id"
H_TARGET_MODEL = "x-amzn-sagemaker-target-model"
H_TARGET_CONTAINER = "x-amzn-sagemaker-target-container-hostname"
H_ERROR_TYPE = "x-amzn-errortype"
#: InvokeEndpointAsync headers (botocore's sagemaker-runtime service model).
H_INPUT_LOCATION = "x-amzn-sagemaker-inputlocation"
H_ASYNC_CONTENT_TYPE = "x-amzn-sagemaker-content-type"
H_ASYNC_ACCEPT = "x-amzn-sagemaker-accept"
H_REQUEST_TTL = "x-amzn-sagemaker-requestttlseconds"
H_INVOCATION_TIMEOUT = "x-amzn-sagemaker-invocationtimeoutseconds"
H_OUTPUT_LOCATION = "x-amzn-sagemaker-outputlocation"
H_FAILURE_LOCATION = "x-amzn-sagemaker-failurelocation"
H_S3_OUTPUT_PATH_EXTENSION = "x-amzn-sagemaker-s3outputpathextension"
H_FILENAME = "x-amzn-sagemaker-filename"

#: Headers the gateway forwards from the client to the model server.
FORWARDED_REQUEST_HEADERS = (
    "content-type",
    "accept",
    H_CUSTOM_ATTRIBUTES,
    H_INFERENCE_ID,
    H_TARGET_MODEL,
    H_TARGET_CONTAINER,
)


class Role(StrEnum):
    """The roles one runtime image can play (``kubeinfer-runtime serve --role``)."""

    MODEL_SERVER = "model-server"
    GATEWAY = "gateway"
    #: Asynchronous inference: reads the endpoint's Redis Stream, writes objects.
    ASYNC_WORKER = "async-worker"
    #: Edge fleets: the device API, durable state in Redis, the rollout in waves.
    FLEET_SERVER = "fleet-server"


class ModelFormat(StrEnum):
    ONNX = "onnx"
    #: An artifact of ``kubeinfer compile`` (a folder with ``manifest.json``, or its
    #: ``.tar.gz``): served by the TVM or the onnx backend its manifest names.
    COMPILED = "compiled"
