"""PURE: the copy-paste examples ``kubeinfer up`` prints once an endpoint is ready.

The sample payload is built from the model's V2 metadata (input shape), so the
printed commands work as they are for single-input tabular models such as the
iris example; other models get a placeholder to replace.
"""

from __future__ import annotations

import json
from typing import Any

PLACEHOLDER = '{"instances": [...]}'


def sample_body(metadata: dict[str, Any] | None) -> str | None:
    """A JSON request for a model with one 2-D numeric input [N, k], else None."""
    if not metadata:
        return None
    inputs = metadata.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        return None
    spec = inputs[0]
    shape = spec.get("shape")
    datatype = str(spec.get("datatype", ""))
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int)
            and 0 < shape[1] <= 64):
        return None
    if datatype.startswith(("FP", "BF")):
        row: list[float | int] = [1.0] * shape[1]
    elif datatype.startswith(("INT", "UINT")):
        row = [1] * shape[1]
    else:
        return None
    return json.dumps({"instances": [row]})


def usage_text(name: str, url: str, body: str | None) -> str:
    """curl, ``kubeinfer invoke`` and boto3 examples for endpoint ``name`` at ``url``."""
    payload = body or PLACEHOLDER
    return f"""\
Invoke it (SageMaker Runtime API):
  kubeinfer invoke {name} --body '{payload}'
  curl -s -X POST {url}/endpoints/{name}/invocations \\
       -H 'Content-Type: application/json' -d '{payload}'
  python3 - <<'PY'
import boto3
rt = boto3.client("sagemaker-runtime", endpoint_url="{url}", region_name="us-east-1",
                  aws_access_key_id="local", aws_secret_access_key="local")
r = rt.invoke_endpoint(EndpointName="{name}", ContentType="application/json",
                       Body={payload!r})
print(r["InvokedProductionVariant"], r["Body"].read().decode())
PY"""


def async_usage_text(name: str, url: str) -> str:
    """curl and boto3 examples for an async endpoint (``type: Async``)."""
    return f"""\
Invoke it asynchronously (InvokeEndpointAsync): upload the input, then name it:
  echo '{PLACEHOLDER}' > /tmp/input.json
  curl -si -X POST {url}/endpoints/{name}/async-invocations \\
       -H 'X-Amzn-SageMaker-InputLocation: file:///tmp/input.json'
  python3 - <<'PY'
import boto3
rt = boto3.client("sagemaker-runtime", endpoint_url="{url}", region_name="us-east-1",
                  aws_access_key_id="local", aws_secret_access_key="local")
r = rt.invoke_endpoint_async(EndpointName="{name}", InputLocation="s3://bucket/input.json")
print(r["InferenceId"], r["OutputLocation"])
PY"""
