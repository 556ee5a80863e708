"""The CRDs' CEL rules refuse what the operator refuses, naming the same field.

Every ``x-kubernetes-validations`` rule is taken from the GENERATED CRDs (not
from ``api.cel_rules``) and run with cel-python the way the API server runs it:
on each schema node the object has, with ``self`` typed by the schema (a
``type: number`` is a double even when written ``1``). Each case is a spec one
rule refuses (or, with ``None``, no rule refuses); the operator's own
validation (``validate_endpoint``, ``validate_transform_job``,
``validate_compilation_job``) must refuse the same spec naming the same field,
so the two cannot drift apart.

cel-python and Kubernetes differ in small ways, which the rules avoid (see
``api/cel_rules.py``): ``has(self.a.b)`` with ``a`` absent is false here and an
error there; int and double never compare here, while the API server gives a
``number`` field a double. The API server applies schema defaults before it
runs the rules; each case runs both with and without them and must agree.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubeinfer_operator.api import cel_rules
from kubeinfer_operator.api.crd import all_crds
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile import job_validate
from kubeinfer_operator.reconcile import validate as endpoint_validate
from kubeinfer_operator.reconcile.compile_validate import validate_compilation_job
from kubeinfer_operator.reconcile.recommend_validate import validate_recommendation_job
from kubeinfer_operator.reconcile.transform_validate import validate_transform_job
from kubeinfer_operator.render import k8s_meta

celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRDs' CEL rules")

CRDS = {crd["spec"]["names"]["kind"]: crd for crd in all_crds().values()}
ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _root(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# -- the API server's side, with cel-python ----------------------------------------------------


def _cel(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` as CEL sees it under ``schema``."""
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return celpy.celtypes.MapType({
            celpy.celtypes.StringType(k): _cel(v, props.get(k, extra if isinstance(extra, dict)
                                                            else {}))
            for k, v in value.items()})
    if isinstance(value, list):
        return celpy.celtypes.ListType([_cel(v, schema.get("items", {})) for v in value])
    if schema.get("type") == "number" and not isinstance(value, bool):
        return celpy.celtypes.DoubleType(float(value))
    return celpy.json_to_cel(value)


def _defaulted(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = _defaulted(out[key], sub)
        return out
    if isinstance(value, list) and "items" in schema:
        return [_defaulted(v, schema["items"]) for v in value]
    return value


def _nodes(value: Any, schema: dict[str, Any], path: str,
           at: str) -> Iterator[tuple[Any, dict[str, Any], str, str]]:
    """(value, schema, instance path, schema path) of every node the object has."""
    yield value, schema, path, at
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _nodes(value[key], sub, f"{path}.{key}".lstrip("."),
                                  f"{at}.{key}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _nodes(item, schema["items"], f"{path}[{i}]", f"{at}[]")


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = ENV.program(ENV.compile(rule))
    return _PROGRAMS[rule]


def _cel_refusals(kind: str, obj: dict[str, Any],
                  fired: set[tuple[str, str, str]] | None = None) -> list[str]:
    """What the API server would say of ``obj``: '<field>: <message>' per failed rule."""
    out = []
    for value, schema, path, at in _nodes(obj, _root(kind), "", ""):
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue  # transition rules: updates only
            result = _program(rule["rule"]).evaluate({"self": _cel(value, schema)})
            assert not isinstance(result, celpy.CELEvalError), (rule["rule"], path, result)
            if not bool(result):
                field = (path + rule.get("fieldPath", "")).lstrip(".")
                out.append(f"{field or '(root)'}: {rule['message']}")
                if fired is not None:
                    fired.add((kind, at, rule["rule"]))
    return out


# -- the operator's side -----------------------------------------------------------------------


def _validator(kind: str) -> Callable[[str, dict[str, Any]], object]:
    if kind == "Endpoint":
        return lambda name, spec: endpoint_validate.validate_endpoint(name, "ml", spec)
    if kind == "TransformJob":
        return lambda name, spec: validate_transform_job(name, "ml", spec)
    if kind == "RecommendationJob":
        return lambda name, spec: validate_recommendation_job(name, "ml", spec)
    return lambda name, spec: validate_compilation_job(name, "ml", spec)


def _operator_problems(kind: str, obj: dict[str, Any]) -> list[str]:
    try:
        _validator(kind)(obj["metadata"]["name"], copy.deepcopy(obj["spec"]))
    except SpecError as exc:
        problems: list[str] = exc.problems  # type: ignore[attr-defined]
        return problems
    return []


_PATH = re.compile(r"^[A-Za-z0-9_.\[\]*]+")
_RELATIVE = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*): ")


def field_of(problem: str) -> str:
    """The field a problem names, without list indexes: 'spec.variants[0].model: compile: …'
    → 'spec.variants.model.compile' (a leading 'name: ' relative to the path counts)."""
    problem = job_validate.clean_problem(problem)
    match = _PATH.match(problem)
    assert match, problem
    field = match.group(0).rstrip(".,")
    rest = problem[match.end():].removeprefix(":").strip()
    relative = _RELATIVE.match(rest)
    if relative and not field.endswith(relative.group(1)):
        field += "." + relative.group(1)
    return re.sub(r"\[[^\]]*\]", "", field)


def _property_names(schema: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(schema, dict):
        names |= set(schema.get("properties", {}))
        for value in schema.values():
            names |= _property_names(value)
    elif isinstance(schema, list):
        for value in schema:
            names |= _property_names(value)
    return names


FIELD_NAMES = set().union(*(_property_names(_root(kind)) for kind in CRDS))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z][A-Za-z0-9]*", text))


# -- the cases ---------------------------------------------------------------------------------


def endpoint(name: str = "iris", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"variants": [{"name": "a", "model": {"uri": "s3://m/a.onnx"}}]}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name}, "spec": base}


def variant(**fields: Any) -> dict[str, Any]:
    """An Endpoint with one variant 'a' (model s3://m/a.onnx unless ``fields`` say)."""
    v: dict[str, Any] = {"name": "a", "model": {"uri": "s3://m/a.onnx"}}
    v.update(fields)
    return endpoint(variants=[{k: x for k, x in v.items() if x is not None}])


def shadow(type: str | None = None, **fields: Any) -> dict[str, Any]:
    """An Endpoint with variant 'a' and one shadow variant 'b' (``fields`` over it)."""
    sv: dict[str, Any] = {"name": "b", "model": {"uri": "s3://m/b.onnx"}}
    sv.update(fields)
    async_spec = fields.pop("async", None)
    sv.pop("async", None)
    extra: dict[str, Any] = {"type": type} if type else {}
    if async_spec is not None:
        extra["async"] = async_spec
    return endpoint(shadowVariants=[{k: x for k, x in sv.items() if x is not None}], **extra)


def steps(*containers: dict[str, Any]) -> dict[str, Any]:
    return variant(model=None, containers=list(containers))


def scaled(**autoscaling: Any) -> dict[str, Any]:
    return variant(autoscaling={"maxReplicas": 4, **autoscaling})


def transform(name: str = "score", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/iris.onnx"},
                            "input": {"uri": "s3://data/in/", "contentType": "text/csv"},
                            "output": {"uri": "s3://data/out/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
            "metadata": {"name": name}, "spec": {k: v for k, v in base.items() if v is not None}}


def compilation(name: str = "mlp", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"}, "target": "native",
                            "output": {"uri": "s3://compiled/mlp/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
            "metadata": {"name": name}, "spec": base}


def recommendation(name: str = "mlp", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "RecommendationJob",
            "metadata": {"name": name}, "spec": {k: v for k, v in base.items() if v is not None}}


ASYNC: dict[str, Any] = {"outputPath": "s3://out/iris"}


def _async(config: dict[str, Any]) -> dict[str, Any]:
    return {"async": config}  # a Python keyword: passed as **_async(...)


CAPTURE: dict[str, Any] = {"destination": "s3://captures/iris", "samplingPercentage": 30}
CUSTOM = {"metric": "Custom", "query": "sum(rate(x[1m]))", "target": 10}
STEP = [{"lowerBound": 0, "change": 1}]
HANDLER = {"name": "pre", "handler": "pre:handle"}
MODEL_STEP = {"name": "m", "model": {"uri": "s3://m/a.onnx"}}
IMAGE_STEP = {"name": "img", "image": "example.com/model:1"}

#: (case id, object, the field the CEL rule and the operator name; None: both accept).
CANARY = {"trafficRouting": {"type": "Canary", "waitIntervalInSeconds": 5,
                             "canarySize": {"type": "CapacityPercent", "value": 10}}}


def guarded(config: dict[str, Any]) -> dict[str, Any]:
    obj = variant()
    obj["spec"]["deploymentConfig"] = config
    return obj


CASES: list[tuple[str, dict[str, Any], str | None]] = [
    # metadata.name (root)
    ("name-ok", endpoint("iris-2"), None),
    ("name-digit-first", endpoint("2iris"), "metadata.name"),
    ("name-too-long", endpoint("a" * 41), "metadata.name"),
    ("object-name-fits", endpoint("e" * 40, variants=[{"name": "v" * 22,
                                                        "model": {"uri": "s3://m/a.onnx"}}]),
     None),
    ("object-name-too-long", endpoint("e" * 40, variants=[{"name": "v" * 23,
                                                            "model": {"uri": "s3://m/a.onnx"}}]),
     "spec.variants.name"),
    # spec
    ("one-weight-above-0", endpoint(variants=[
        {"name": "a", "weight": 0, "model": {"uri": "s3://m/a.onnx"}},
        {"name": "b", "weight": 1, "model": {"uri": "s3://m/b.onnx"}}]), None),
    ("all-weights-0", endpoint(variants=[
        {"name": "a", "weight": 0, "model": {"uri": "s3://m/a.onnx"}},
        {"name": "b", "weight": 0.0, "model": {"uri": "s3://m/b.onnx"}}]),
     "spec.variants.weight"),
    ("async-endpoint", endpoint(type="Async", **_async(ASYNC)), None),
    ("async-on-realtime", endpoint(**_async(ASYNC)), "spec.async"),
    ("async-on-serverless", endpoint(type="Serverless", **_async(ASYNC)), "spec.async"),
    ("async-missing", endpoint(type="Async"), "spec.async"),
    ("async-two-variants", endpoint(type="Async", **_async(ASYNC), variants=[
        {"name": "a", "model": {"uri": "s3://m/a.onnx"}},
        {"name": "b", "model": {"uri": "s3://m/b.onnx"}}]), "spec.variants"),
    ("async-autoscaling", endpoint(type="Async", **_async(ASYNC), variants=[
        {"name": "a", "model": {"uri": "s3://m/a.onnx"}, "autoscaling": {"maxReplicas": 2}}]),
     "spec.variants.autoscaling"),
    ("async-pipeline", endpoint(type="Async", **_async(ASYNC), variants=[
        {"name": "a", "containers": [{"name": "m", "model": {"uri": "s3://m/a.onnx"}}]}]),
     "spec.variants"),
    ("async-multi-model", endpoint(type="Async", **_async(ASYNC), variants=[
        {"name": "a", "multiModel": {"prefix": "s3://m/models/"}}]), "spec.variants"),
    ("async-scaling-ok", endpoint(type="Async", **_async(
        {**ASYNC, "scaling": {"minReplicas": 2, "maxReplicas": 8}})), None),
    ("async-scaling-min-above-default-max", endpoint(type="Async", **_async(
        {**ASYNC, "scaling": {"minReplicas": 5}})), "spec.async.scaling"),
    ("serverless-endpoint", endpoint(type="Serverless", serverless={}), None),
    ("serverless-on-realtime", endpoint(serverless={}), "spec.serverless"),
    ("provisioned-within-max", endpoint(type="Serverless", serverless={
        "provisionedConcurrency": 5, "maxConcurrency": 5}), None),
    ("provisioned-above-default-max", endpoint(type="Serverless", serverless={
        "provisionedConcurrency": 30}), "spec.serverless"),
    ("sigv4-secret-regions", endpoint(auth={"mode": "SigV4", "secretName": "keys",
                                            "regions": ["eu-west-1"]}), None),
    ("no-auth-with-secret", endpoint(auth={"mode": "None", "secretName": "keys"}),
     "spec.auth"),
    ("no-auth-with-regions", endpoint(auth={"mode": "None", "regions": ["eu-west-1"]}),
     "spec.auth"),
    ("token-with-regions", endpoint(auth={"mode": "Token", "regions": ["eu-west-1"]}),
     "spec.auth"),
    ("capture-ok", endpoint(dataCapture={**CAPTURE, "captureOptions": ["Output"],
                                         "csvContentTypes": ["text/plain"]}), None),
    ("capture-serverless", endpoint(type="Serverless", dataCapture=CAPTURE), None),
    ("capture-on-async", endpoint(type="Async", **_async(ASYNC), dataCapture=CAPTURE),
     "spec.dataCapture"),
    ("capture-repeated-mode", endpoint(dataCapture={**CAPTURE,
                                                    "captureOptions": ["Input", "Input"]}),
     "spec.dataCapture"),
    ("capture-type-in-both", endpoint(dataCapture={**CAPTURE,
                                                   "jsonContentTypes": ["text/csv"]}),
     "spec.dataCapture"),
    ("capture-type-in-both-by-default", endpoint(dataCapture={
        **CAPTURE, "csvContentTypes": ["application/json"]}), "spec.dataCapture"),
    # shadow variants
    ("shadow-ok", shadow(samplingPercentage=25), None),
    ("shadow-serverless", shadow(type="Serverless"), None),
    ("shadow-on-async", shadow(type="Async", **_async(ASYNC)), "spec.shadowVariants"),
    ("shadow-named-as-variant", shadow(name="a"), "spec.shadowVariants"),
    ("shadow-no-model-source", shadow(model=None), "spec.shadowVariants"),
    ("shadow-inference-execution-with-model", shadow(inferenceExecution="Direct"),
     "spec.shadowVariants"),
    ("shadow-admission", shadow(admission={"maxInFlightPerReplica": 2}),
     "spec.shadowVariants"),
    ("shadow-autoscaling", shadow(autoscaling={"maxReplicas": 3}), None),
    ("shadow-autoscaling-to-zero", shadow(autoscaling={"minReplicas": 0, "maxReplicas": 3}),
     "spec.shadowVariants"),
    ("shadow-schedule-to-zero", shadow(autoscaling={"maxReplicas": 3, "scheduled": [
        {"cron": "* 0-6 * * *", "minReplicas": 0, "maxReplicas": 1}]}), "spec.shadowVariants"),
    ("shadow-autoscaling-min-above-max", shadow(autoscaling={"minReplicas": 5, "maxReplicas": 4}),
     "spec.shadowVariants.autoscaling"),
    ("shadow-custom-without-prometheus", shadow(autoscaling={
        "maxReplicas": 4, "targetTracking": [CUSTOM]}), "spec.shadowVariants.autoscaling"),
    ("shadow-custom-step-without-prometheus", shadow(autoscaling={
        "maxReplicas": 4, "stepScaling": [{"metric": "Custom", "query": "x", "steps": STEP}]}),
     "spec.shadowVariants.autoscaling"),
    ("shadow-query-without-custom", shadow(autoscaling={
        "maxReplicas": 4, "targetTracking": [{**CUSTOM, "metric": "CPUUtilization"}]}),
     "spec.shadowVariants.autoscaling.targetTracking"),
    ("shadow-custom-without-query", shadow(autoscaling={
        "maxReplicas": 4, "prometheusUrl": "http://prometheus:9090",
        "stepScaling": [{"metric": "Custom", "steps": STEP}]}),
     "spec.shadowVariants.autoscaling.stepScaling"),
    ("shadow-schedule-min-above-max", shadow(autoscaling={"maxReplicas": 4, "scheduled": [
        {"cron": "* 9-17 * * 1-5", "minReplicas": 3, "maxReplicas": 2}]}),
     "spec.shadowVariants.autoscaling.scheduled"),
    ("shadow-named-gateway", shadow(name="gateway"), "spec.shadowVariants.name"),
    ("shadow-operator-env", shadow(env=[{"name": "KUBEINFER_HOST"}]),
     "spec.shadowVariants.env.name"),
    # a variant
    ("no-model-source", variant(model=None), "spec.variants"),
    ("model-and-multi-model", variant(multiModel={"prefix": "s3://m/models/"}),
     "spec.variants"),
    ("serial-containers", steps(HANDLER, MODEL_STEP), None),
    ("inference-execution-with-model", variant(inferenceExecution="Direct"), "spec.variants"),
    ("duplicate-step-names", steps(HANDLER, {**MODEL_STEP, "name": "pre"}), "spec.variants"),
    ("variant-named-gateway", variant(name="gateway"), "spec.variants.name"),
    ("variant-named-gateway-pods", variant(name="gateway-pods"), "spec.variants.name"),
    ("variant-named-gateway-2", variant(name="gateway-2"), None),
    ("own-env", variant(env=[{"name": "LOG_LEVEL", "value": "debug"}]), None),
    ("operator-env", variant(env=[{"name": "LOG_LEVEL"}, {"name": "KUBEINFER_PORT"}]),
     "spec.variants.env.name"),
    ("compile-onnx", variant(model={"uri": "s3://m/a.onnx", "compile": {
        "target": "native", "batchSizes": [1, 8]}}), None),
    ("compile-compiled", variant(model={"uri": "s3://m/a.tar.gz", "format": "compiled",
                                        "compile": {}}), "spec.variants.model.compile"),
    ("compile-cross-target", variant(model={"uri": "s3://m/a.onnx",
                                            "compile": {"target": "aarch64"}}),
     "spec.variants.model.compile.target"),
    ("compile-repeated-size", variant(model={"uri": "s3://m/a.onnx",
                                             "compile": {"batchSizes": [1, 8, 1]}}),
     "spec.variants.model.compile.batchSizes"),
    # its steps
    ("step-without-kind", steps({"name": "pre"}), "spec.variants.containers"),
    ("step-handler-and-image", steps({**HANDLER, "image": "x:1"}), "spec.variants.containers"),
    ("handler-with-code", steps({**HANDLER, "codeUri": "file:///code"}), None),
    ("model-with-code", steps({**MODEL_STEP, "codeUri": "file:///code"}),
     "spec.variants.containers"),
    ("image-with-port-env-resources", steps({**IMAGE_STEP, "port": 9000,
                                             "env": [{"name": "A", "value": "1"}],
                                             "resources": {"requests": {"cpu": "1"}}}), None),
    ("handler-with-port", steps({**HANDLER, "port": 9000}), "spec.variants.containers"),
    ("handler-with-env", steps({**HANDLER, "env": [{"name": "A"}]}),
     "spec.variants.containers"),
    ("handler-with-empty-env", steps({**HANDLER, "env": []}), None),
    ("model-step-with-resources", steps({**MODEL_STEP, "resources": {}}),
     "spec.variants.containers"),
    ("step-model-compiles", steps({**MODEL_STEP, "model": {"uri": "s3://m/a.onnx",
                                                          "compile": {}}}),
     "spec.variants.containers.model.compile"),
    # auto scaling
    ("autoscaling-ok", scaled(minReplicas=0, targetTracking=[CUSTOM],
                              prometheusUrl="http://prometheus:9090"), None),
    ("autoscaling-min-above-max", scaled(minReplicas=5), "spec.variants.autoscaling"),
    ("autoscaling-default-min-above-max", variant(autoscaling={"maxReplicas": 1}), None),
    ("custom-without-prometheus", scaled(targetTracking=[CUSTOM]),
     "spec.variants.autoscaling"),
    ("custom-step-without-prometheus", scaled(
        stepScaling=[{"metric": "Custom", "query": "x", "steps": STEP}]),
     "spec.variants.autoscaling"),
    ("query-without-custom", scaled(targetTracking=[{**CUSTOM, "metric": "CPUUtilization"}]),
     "spec.variants.autoscaling.targetTracking"),
    ("custom-without-query", scaled(prometheusUrl="http://prometheus:9090",
                                    stepScaling=[{"metric": "Custom", "steps": STEP}]),
     "spec.variants.autoscaling.stepScaling"),
    ("schedule-ok", scaled(scheduled=[{"cron": "* 9-17 * * 1-5", "minReplicas": 2,
                                       "maxReplicas": 2}]), None),
    ("schedule-min-above-max", scaled(scheduled=[{"cron": "* 9-17 * * 1-5",
                                                  "minReplicas": 3, "maxReplicas": 2}]),
     "spec.variants.autoscaling.scheduled"),
    # deployment guardrails
    ("guardrails-ok", guarded({"blueGreen": CANARY, "autoRollback": {
        "alarms": [{"name": "e", "errorRate": 0.1}]}}), None),
    ("guardrails-both", guarded({"blueGreen": CANARY, "rolling": {
        "maximumBatchSize": {"type": "InstanceCount", "value": 1}}}), "spec.deploymentConfig"),
    ("guardrails-canary-without-size", guarded({"blueGreen": {"trafficRouting": {
        "type": "Canary"}}}), "spec.deploymentConfig.blueGreen.trafficRouting"),
    ("guardrails-alarm-two-kinds", guarded({"blueGreen": CANARY, "autoRollback": {
        "alarms": [{"name": "e", "errorRate": 0.1, "latencyP99Ms": 5}]}}),
     "spec.deploymentConfig.autoRollback.alarms"),
    ("guardrails-disagreement-ok", guarded({"blueGreen": CANARY, "autoRollback": {
        "alarms": [{"name": "d", "disagreement": 0.02, "mirrorSamplingPercentage": 50}]}}), None),
    ("guardrails-disagreement-and-error-rate", guarded({"blueGreen": CANARY, "autoRollback": {
        "alarms": [{"name": "e", "errorRate": 0.1, "disagreement": 0.05}]}}),
     "spec.deploymentConfig.autoRollback.alarms"),
    ("guardrails-mirror-sampling-without-disagreement", guarded({
        "blueGreen": CANARY, "autoRollback": {
            "alarms": [{"name": "e", "errorRate": 0.1, "mirrorSamplingPercentage": 5}]}}),
     "spec.deploymentConfig.autoRollback.alarms"),
    ("guardrails-promql-without-url", guarded({"blueGreen": CANARY, "autoRollback": {
        "alarms": [{"name": "e", "promQL": {"query": "x", "threshold": 1}}]}}),
     "spec.deploymentConfig.autoRollback"),
    ("guardrails-on-serverless", endpoint(type="Serverless", deploymentConfig={
        "blueGreen": CANARY}), "spec.deploymentConfig"),
    ("guardrails-on-async", endpoint(type="Async", **_async(ASYNC), deploymentConfig={
        "blueGreen": CANARY}), "spec.deploymentConfig"),
    ("guardrails-rolling-two-variants", endpoint(
        variants=[{"name": "a", "model": {"uri": "s3://m/a.onnx"}},
                  {"name": "b", "model": {"uri": "s3://m/b.onnx"}}],
        deploymentConfig={"rolling": {"maximumBatchSize": {"type": "InstanceCount",
                                                           "value": 1}}}),
     "spec.deploymentConfig.rolling"),
    ("guardrails-blue-green-two-variants", endpoint(
        variants=[{"name": "a", "model": {"uri": "s3://m/a.onnx"}},
                  {"name": "b", "model": {"uri": "s3://m/b.onnx"}}],
        deploymentConfig={"blueGreen": CANARY}), None),
    ("guardrails-autoscaled", {**scaled(), "spec": {**scaled()["spec"], "deploymentConfig": {
        "blueGreen": CANARY}}}, None),
    # TransformJob
    ("job-name-ok", transform("score-2"), None),
    ("job-name-uppercase", transform("Score"), "metadata.name"),
    ("job-no-model", transform(model=None), "spec.model"),
    ("job-model-and-endpoint", transform(endpointRef={"name": "iris"}), "spec.model"),
    ("job-endpoint-ref", transform(model=None, endpointRef={"name": "iris"}), None),
    ("job-steps", transform(model=None, containers=[HANDLER, MODEL_STEP]), None),
    ("job-duplicate-steps", transform(model=None, containers=[HANDLER, HANDLER]),
     "spec.containers"),
    ("job-step-without-kind", transform(model=None, containers=[{"name": "x"}]),
     "spec.containers"),
    ("job-step-model-with-code", transform(model=None, containers=[
        {**MODEL_STEP, "codeUri": "file:///code"}]), "spec.containers"),
    ("job-step-handler-port", transform(model=None, containers=[{**HANDLER, "port": 9000}]),
     "spec.containers"),
    ("job-step-handler-resources", transform(model=None, containers=[
        {**HANDLER, "resources": {}}]), "spec.containers"),
    ("job-step-compiles", transform(model=None, containers=[
        {**MODEL_STEP, "model": {"uri": "s3://m/a.onnx", "compile": {}}}]),
     "spec.containers.model.compile"),
    ("job-model-compiles", transform(model={"uri": "s3://m/a.onnx", "compile": {}}),
     "spec.model.compile"),
    ("job-filter-csv-with-charset", transform(
        input={"uri": "s3://data/in/", "contentType": " Text/CSV ; charset=utf-8"},
        dataProcessing={"inputFilter": "$[1:]"}), None),
    ("job-join-jsonlines", transform(
        input={"uri": "s3://data/in/", "contentType": "application/jsonlines"},
        dataProcessing={"joinSource": "Input"}), None),
    ("job-filter-json-parameter-on-a-new-line", transform(
        input={"uri": "s3://data/in/", "contentType": "application/json;\n charset=utf-8"},
        dataProcessing={"inputFilter": "$.features"}), None),
    ("job-filter-png", transform(input={"uri": "s3://data/in/", "contentType": "image/png"},
                                 dataProcessing={"outputFilter": "$[0]"}),
     "spec.input.contentType"),
    ("job-filter-csv-prefix", transform(input={"uri": "s3://data/in/",
                                               "contentType": "text/csvx"},
                                        dataProcessing={"inputFilter": "$[1:]"}),
     "spec.input.contentType"),
    ("job-join-no-content-type", transform(input={"uri": "s3://data/in/"},
                                           dataProcessing={"joinSource": "Input"}),
     "spec.input.contentType"),
    ("job-no-processing-png", transform(input={"uri": "s3://data/in/",
                                               "contentType": "image/png"},
                                        dataProcessing={"inputFilter": "$"}), None),
    ("job-whole-objects", transform(maxPayloadInMB=0), None),
    ("job-whole-objects-split", transform(maxPayloadInMB=0, input={
        "uri": "s3://data/in/", "contentType": "text/csv", "splitType": "Line"}),
     "spec.maxPayloadInMB"),
    ("job-split-with-payload", transform(maxPayloadInMB=6, input={
        "uri": "s3://data/in/", "contentType": "text/csv", "splitType": "Line"}), None),
    ("job-output-beside-input", transform(output={"uri": "s3://data/input-scores/"}), None),
    ("job-output-in-input", transform(output={"uri": "s3://data/in/scores"}),
     "spec.output.uri"),
    ("job-output-is-input", transform(input={"uri": "s3://data/in"},
                                      output={"uri": "s3://data/in/"}), "spec.output.uri"),
    ("job-output-in-bucket-input", transform(input={"uri": "s3://data"},
                                             output={"uri": "s3://data/out"}),
     "spec.output.uri"),
    ("job-manifest-beside-output", transform(input={"uri": "s3://data/in/manifest.json",
                                                    "dataType": "ManifestFile"},
                                             output={"uri": "s3://data/in/manifest.json/o"}),
     None),
    # CompilationJob
    ("compile-job-ok", compilation(batchSizes=[1, 64]), None),
    ("compile-job-name", compilation("mlp_v2"), "metadata.name"),
    ("compile-job-repeated-size", compilation(batchSizes=[64, 1, 64]), "spec.batchSizes"),
    # RecommendationJob
    ("recommend-job-ok", recommendation(candidates=[{"name": "a"}]), None),
    ("recommend-job-ref-ok", recommendation(model=None, endpointRef={"name": "mlp"}), None),
    ("recommend-job-name", recommendation("mlp_v2"), "metadata.name"),
    ("recommend-job-no-source", recommendation(model=None), "spec"),
    ("recommend-job-two-sources", recommendation(endpointRef={"name": "mlp"}), "spec"),
    ("recommend-job-list-and-grid", recommendation(candidates=[{"name": "a"}],
                                                   grid={"threads": [1, 2]}), "spec"),
]


@pytest.mark.parametrize(("obj", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cel_and_the_operator_agree(obj: dict[str, Any], field: str | None) -> None:
    kind = obj["kind"]
    refusals = _cel_refusals(kind, obj)
    defaulted = _defaulted(obj, _root(kind))
    assert _cel_refusals(kind, defaulted) == refusals, "a rule depends on defaulting"
    problems = _operator_problems(kind, obj)
    if field is None:
        assert refusals == [] and problems == []
        return
    assert {field_of(r) for r in refusals} == {field}, refusals
    named = [p for p in problems if field_of(p) == field]
    assert named, f"the operator does not name {field}: {problems}"
    for refusal in refusals:
        # Every spec field the CEL message names, the operator's message names too.
        assert _words(refusal) & FIELD_NAMES <= _words(" ".join(named)), (refusal, named)


def test_every_rule_refuses_a_case() -> None:
    fired: set[tuple[str, str, str]] = set()
    for _, obj, field in CASES:
        if field is not None:
            _cel_refusals(obj["kind"], obj, fired)
    rules = {(kind, at, rule["rule"])
             for kind in CRDS
             for _, schema, _, at in _schema_nodes(_root(kind), "")
             for rule in schema.get("x-kubernetes-validations", [])
             if "oldSelf" not in rule["rule"]}
    assert rules - fired == set()


def _schema_nodes(schema: dict[str, Any],
                  at: str) -> Iterator[tuple[None, dict[str, Any], None, str]]:
    yield None, schema, None, at
    for key, sub in schema.get("properties", {}).items():
        yield from _schema_nodes(sub, f"{at}.{key}".lstrip("."))
    if "items" in schema:
        yield from _schema_nodes(schema["items"], f"{at}[]")


def test_the_rules_repeat_the_operators_limits() -> None:
    assert set(cel_rules.RESERVED_VARIANT_NAMES) == k8s_meta.RESERVED_VARIANT_NAMES
    # The API server refuses a few names at apply time; the operator refuses them and more.
    assert set(cel_rules.OPERATOR_ENV) <= endpoint_validate.variant_operator_env(False)
    assert cel_rules.MAX_OBJECT_NAME == k8s_meta.MAX_NAME
    assert cel_rules.MAX_RESOURCE_NAME == endpoint_validate.MAX_ENDPOINT_NAME
    assert cel_rules.MAX_RESOURCE_NAME == job_validate.MAX_NAME
    assert endpoint_validate._ENDPOINT_NAME.pattern == cel_rules.NAME_PATTERN
    assert job_validate._NAME.pattern == cel_rules.NAME_PATTERN


#: A comprehension variable's field: ``v.name`` in ``self.variants.all(v, v.name …)``.
_ITEM_FIELD = re.compile(r"\b[a-z]\.([A-Za-z_][A-Za-z0-9_]*)")
_SELF_PATH = re.compile(r"\bself((?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _resolve(schema: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    for part in [p for p in dotted.split(".") if p]:
        found: dict[str, Any] | None = schema.get("properties", {}).get(part)
        if found is None:
            return None
        schema = found
    return schema


def test_rules_stay_within_the_api_servers_cost_budget() -> None:
    """What the API server's cost estimate needs: every list a rule sits in or walks has
    maxItems, and every string a rule reads has maxLength (an enum gets one), except the
    root's metadata.name (a regex on it costs about 3 % of the per-rule limit)."""
    for kind in CRDS:
        for at, schema, ancestors in _with_ancestors(_root(kind), "", []):
            rules = schema.get("x-kubernetes-validations", [])
            if not rules:
                continue
            unbounded = [a for a, s in ancestors if s.get("type") == "array"
                         and "maxItems" not in s]
            assert unbounded == [], f"{kind} {at}: rules inside unbounded lists {unbounded}"
            for rule in rules:
                for match in _SELF_PATH.finditer(rule["rule"]):
                    if rule["rule"][:match.start()].endswith(("has(", "size(")):
                        continue  # neither reads the value
                    target = _resolve(schema, match.group(1))
                    if target is None or match.group(1) == ".metadata.name":
                        continue
                    if target.get("type") == "array":
                        assert "maxItems" in target, (kind, at, rule["rule"], match.group(0))
                        items = target.get("items", {}).get("properties", {})
                        for name in _ITEM_FIELD.findall(rule["rule"]):
                            if items.get(name, {}).get("type") == "string":
                                assert "maxLength" in items[name], (kind, at, rule["rule"])
                    if target.get("type") == "string":
                        assert "maxLength" in target, (kind, at, rule["rule"], match.group(0))


def _with_ancestors(schema: dict[str, Any], at: str, ancestors: list[tuple[str, Any]],
                    ) -> Iterator[tuple[str, dict[str, Any], list[tuple[str, Any]]]]:
    yield at, schema, ancestors
    for key, sub in schema.get("properties", {}).items():
        yield from _with_ancestors(sub, f"{at}.{key}".lstrip("."), [*ancestors, (at, schema)])
    if "items" in schema:
        yield from _with_ancestors(schema["items"], f"{at}[]", [*ancestors, (at, schema)])
