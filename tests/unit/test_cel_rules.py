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
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.api import cel_rules, env_policy, placement
from kubeinfer_operator.api.crd import all_crds
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile import job_validate, rollout
from kubeinfer_operator.reconcile import validate as endpoint_validate
from kubeinfer_operator.reconcile.compile_validate import validate_compilation_job
from kubeinfer_operator.reconcile.edge_validate import validate_edge_fleet
from kubeinfer_operator.reconcile.recommend_validate import validate_recommendation_job
from kubeinfer_operator.reconcile.transform_validate import validate_transform_job
from kubeinfer_operator.render import compile_plan, k8s_meta, plan_steps, transform_plan

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


def _plan_transform(job: TransformJob) -> None:
    model = transform_plan.own_model(job.spec)
    if model is not None:  # (an endpointRef's model is the Endpoint's: not here)
        transform_plan.plan_transform(job, model)


def _validator(kind: str) -> Callable[[str, dict[str, Any]], object]:
    """The operator's validation of ``kind``, and its planning where the planner checks the
    spec further (the env policy of a TransformJob's and a CompilationJob's environment)."""
    if kind == "Endpoint":
        return lambda name, spec: endpoint_validate.validate_endpoint(name, "ml", spec)
    if kind == "TransformJob":
        return lambda name, spec: _plan_transform(validate_transform_job(name, "ml", spec))
    if kind == "RecommendationJob":
        return lambda name, spec: validate_recommendation_job(name, "ml", spec)
    if kind == "EdgeFleet":
        return lambda name, spec: validate_edge_fleet(name, "ml", spec)
    return lambda name, spec: compile_plan.plan_compile(validate_compilation_job(name, "ml", spec))


#: A planner's SpecError: '<Kind> <name> is invalid: <problem>; <problem>' (each problem
#: naming its field, from spec.).
_PLAN_ERROR = re.compile(r"^\w+ \S+ is invalid: ")


def _operator_problems(kind: str, obj: dict[str, Any]) -> list[str]:
    try:
        _validator(kind)(obj["metadata"]["name"], copy.deepcopy(obj["spec"]))
    except SpecError as exc:
        problems: list[str] | None = getattr(exc, "problems", None)
        if problems is None:
            problems = re.split(r"; (?=spec\.)", _PLAN_ERROR.sub("", str(exc)))
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
    # The operator names an entry of a map by its key (spec.environment.LD_PRELOAD); CEL, by
    # the map.
    field = re.sub(r"^(spec\.environment)\..*$", r"\1", field)
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


def edge(name: str = "sensors", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/mlp.onnx"}, "targets": [{"name": "x86-gateway"}],
        "registration": {"bootstrapTokenSecret": {"name": "fleet-bootstrap", "key": "token"}},
        "signing": {"keySecret": {"name": "fleet-signing", "key": "key"}},
        "packages": {"uri": "s3://edge-packages/"}, "redis": {"url": "redis://redis:6379/3"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "EdgeFleet",
            "metadata": {"name": name}, "spec": base}


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


def async_env(*names: str) -> dict[str, Any]:
    """An Async endpoint whose variant's env sets ``names``."""
    return endpoint(type="Async", **_async(ASYNC), variants=[
        {"name": "a", "model": {"uri": "s3://m/a.onnx"},
         "env": [{"name": n, "value": "1"} for n in names]}])


#: A podTemplate that neither the deny-list nor the reserved keys refuse (keys that only
#: look like a mesh's: the domain is a label of another name, not its end).
PLACED: dict[str, Any] = {
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                     "effect": "NoSchedule"}],
    "priorityClassName": "inference-high",
    "labels": {"example.com/team": "ml", "istio.io.example.com/ring": "early"},
    "annotations": {"prometheus.io/scrape": "true", "fooistio.io/x": "y",
                    "example.com/priority": "system-node-critical"}}
#: What the podTemplate rules refuse: (case id, change to PLACED, the field named).
ESCALATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("keyless-toleration", {"tolerations": [{"key": "a", "operator": "Exists"},
                                            {"operator": "Exists"}]}, "tolerations"),
    ("empty-toleration-key", {"tolerations": [{"key": "", "operator": "Exists"}]},
     "tolerations"),
    ("control-plane-toleration", {"tolerations": [
        {"key": "node-role.kubernetes.io/master", "operator": "Exists",
         "effect": "NoSchedule"}]}, "tolerations"),
    ("system-priority", {"priorityClassName": "system-cluster-critical"}, "priorityClassName"),
    ("label-keys", {"labels": {"app.kubernetes.io/name": "x", "istio.io/dataplane-mode": "none",
                               "container.apparmor.security.beta.kubernetes.io/x": "unconfined"}},
     "labels"),
    ("annotation-keys", {"annotations": {
        "kubeinfer.io/server-hash": "x", "seccomp.security.alpha.kubernetes.io/pod": "unconfined",
        "container.seccomp.security.alpha.kubernetes.io/m": "unconfined",
        "config.linkerd.io/skip-outbound-ports": "443", "sidecar.istio.io/inject": "false"}},
     "annotations"),
]
#: Every kind and place that takes a podTemplate: (case id prefix, object of a template,
#: its field).
TEMPLATES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("gateway", lambda t: endpoint(gateway={"podTemplate": t}), "spec.gateway.podTemplate"),
    ("variant", lambda t: variant(podTemplate=t), "spec.variants.podTemplate"),
    ("shadow", lambda t: shadow(podTemplate=t), "spec.shadowVariants.podTemplate"),
    ("job", lambda t: transform(podTemplate=t), "spec.podTemplate"),
    ("compile-job", lambda t: compilation(podTemplate=t), "spec.podTemplate"),
    ("edge-fleet", lambda t: edge(server={"podTemplate": t}), "spec.server.podTemplate"),
]


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
    ("shadow-object-name-too-long", endpoint("e" * 40, shadowVariants=[
        {"name": "s" * 23, "model": {"uri": "s3://m/s.onnx"}}]), "spec.shadowVariants.name"),
    # 40 + 1 + 17 = 58 fits, but the green fleet's Service would be 64 characters long.
    ("green-fleet-name-too-long", endpoint(
        "e" * 40, variants=[{"name": "v" * 17, "model": {"uri": "s3://m/a.onnx"}}],
        deploymentConfig={"blueGreen": {"trafficRouting": {"type": "AllAtOnce"}}}),
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
    ("shadow-operator-setting-env", shadow(env=[{"name": "KUBEINFER_REDIS_URL",
                                                 "value": "redis://redis:6379/0"}]),
     "spec.shadowVariants.env.name"),
    ("shadow-loader-env", shadow(env=[{"name": "LD_AUDIT", "value": "/x.so"}]),
     "spec.shadowVariants.env.name"),
    ("shadow-resolver-env", shadow(env=[{"name": "LOCALDOMAIN", "value": "evil.test"}]),
     "spec.shadowVariants.env.name"),
    ("shadow-image-step-env", shadow(model=None, containers=[
        {**IMAGE_STEP, "env": [{"name": "SAGEMAKER_BIND_TO_PORT", "value": "9000"}]}]),
     "spec.shadowVariants.containers.env.name"),
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
    ("operator-env-model-uri", variant(env=[{"name": "KUBEINFER_MODEL_URI",
                                             "value": "s3://other/m.onnx"}]),
     "spec.variants.env.name"),
    # (the user's tuning, an Async worker's names on another type, names that only look
    # like refused ones)
    ("tuning-env", variant(env=[{"name": n, "value": "1"} for n in (
        "KUBEINFER_WORKERS", "KUBEINFER_INTRA_OP_THREADS", "KUBEINFER_MAX_PAYLOAD_BYTES",
        "KUBEINFER_QUEUE", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "LD", "ld_preload",
        "SAGEMAKER_BATCH", "CC")]), None),
    ("operator-setting-env", variant(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
     "spec.variants.env.name"),
    ("loader-env", variant(env=[{"name": "LD_PRELOAD", "value": "/x.so"},
                                {"name": "PYTHONPATH", "value": "/x"}]),
     "spec.variants.env.name"),
    ("resolver-env", variant(env=[{"name": "RES_OPTIONS", "value": "ndots:1"}]),
     "spec.variants.env.name"),
    ("async-tuning-env", async_env("KUBEINFER_WORKERS", "KUBEINFER_INFERENCE_THREADS"), None),
    ("async-worker-env", async_env("KUBEINFER_QUEUE"), "spec.variants.env.name"),
    ("async-worker-max-payload-env", async_env("KUBEINFER_WORKERS",
                                               "KUBEINFER_MAX_PAYLOAD_BYTES"),
     "spec.variants.env.name"),
    ("async-server-env", async_env("KUBEINFER_MODEL_URI"), "spec.variants.env.name"),
    ("image-step-env", steps({**IMAGE_STEP, "env": [
        {"name": "LD_PRELOAD", "value": "/x.so"}, {"name": "PATH", "value": "/bin"},
        {"name": "AWS_ACCESS_KEY_ID", "value": "x"}, {"name": "KUBEINFER_PORT", "value": "1"}]}),
     None),
    ("image-step-bind-port-env", steps({**IMAGE_STEP, "env": [
        {"name": "SAGEMAKER_BIND_TO_PORT", "value": "9000"}]}),
     "spec.variants.containers.env.name"),
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
    # its environment (render.transform_plan.env_problems): what the operator renders is
    # refused always; the rest only where it reaches kubeinfer's batch worker (an
    # endpointRef's Endpoint decides that: the operator's check, not CEL's)
    ("job-environment", transform(environment={"LOG_LEVEL": "debug", "OMP_NUM_THREADS": "2"}),
     None),
    ("job-environment-operator", transform(environment={"KUBEINFER_INPUT_URI": "s3://x/"}),
     "spec.environment"),
    ("job-environment-sagemaker-batch", transform(environment={"SAGEMAKER_BATCH_SIZE": "4"}),
     "spec.environment"),
    ("job-environment-setting", transform(environment={"AWS_ACCESS_KEY_ID": "AKIA"}),
     "spec.environment"),
    ("job-environment-loader", transform(environment={"LD_PRELOAD": "/x.so"}),
     "spec.environment"),
    ("job-environment-resolver", transform(environment={"LOCALDOMAIN": "evil.test"}),
     "spec.environment"),
    ("job-handler-environment-loader", transform(
        model=None, containers=[HANDLER, MODEL_STEP], environment={"PYTHONHOME": "/x"}),
     "spec.environment"),
    ("job-image-environment", transform(model=None, containers=[IMAGE_STEP], environment={
        "LD_PRELOAD": "/x.so", "AWS_ACCESS_KEY_ID": "AKIA"}), None),
    ("job-image-environment-operator", transform(model=None, containers=[IMAGE_STEP],
                                                 environment={"SAGEMAKER_BATCH": "true"}),
     "spec.environment"),
    ("job-image-step-env", transform(model=None, containers=[{**IMAGE_STEP, "env": [
        {"name": "LD_PRELOAD", "value": "/x.so"}, {"name": "SAGEMAKER_BATCH_X", "value": "1"}]}]),
     None),
    ("job-image-step-operator-env", transform(model=None, containers=[{**IMAGE_STEP, "env": [
        {"name": "SAGEMAKER_MAX_PAYLOAD_IN_MB", "value": "6"}]}]), "spec.containers.env.name"),
    # CompilationJob
    ("compile-job-ok", compilation(batchSizes=[1, 64]), None),
    ("compile-job-environment", compilation(environment={"TVM_NUM_THREADS": "2",
                                                         "KUBEINFER_MEASURE_S": "5"}), None),
    ("compile-job-environment-operator", compilation(environment={"KUBEINFER_TARGET": "x86-64"}),
     "spec.environment"),
    ("compile-job-environment-setting", compilation(environment={"KUBEINFER_S3_SECRET_KEY": "x"}),
     "spec.environment"),
    ("compile-job-environment-loader", compilation(environment={"LD_LIBRARY_PATH": "/x"}),
     "spec.environment"),
    ("compile-job-environment-resolver", compilation(environment={"HOSTALIASES": "/x"}),
     "spec.environment"),
    ("compile-job-environment-compiler", compilation(environment={"CC": "/tmp/cc"}),
     "spec.environment"),
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
    # podTemplate (api.placement), wherever a kind takes one
    *((f"{where}-placed", make(PLACED), None) for where, make, _ in TEMPLATES),
    *((f"{where}-{case}", make({**PLACED, **change}), f"{field}.{named}")
      for where, make, field in TEMPLATES for case, change, named in ESCALATIONS),
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
    assert cel_rules.MAX_OBJECT_NAME == k8s_meta.MAX_NAME
    assert cel_rules.GREEN_SUFFIX == rollout.GREEN_SUFFIX
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
                    if target.get("type") == "object" and "additionalProperties" in target:
                        # (its keys cost nothing to the estimate: the API server sizes them 0)
                        assert "maxProperties" in target, (kind, at, rule["rule"])


def _with_ancestors(schema: dict[str, Any], at: str, ancestors: list[tuple[str, Any]],
                    ) -> Iterator[tuple[str, dict[str, Any], list[tuple[str, Any]]]]:
    yield at, schema, ancestors
    for key, sub in schema.get("properties", {}).items():
        yield from _with_ancestors(sub, f"{at}.{key}".lstrip("."), [*ancestors, (at, schema)])
    if "items" in schema:
        yield from _with_ancestors(schema["items"], f"{at}[]", [*ancestors, (at, schema)])


def test_the_examples_pass_every_rule() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    docs = [d for path in sorted(examples.glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") in CRDS]
    assert len({d["kind"] for d in docs}) == len(CRDS)
    for doc in docs:
        assert _cel_refusals(doc["kind"], doc) == [], doc["metadata"]["name"]


# -- the env policy and the podTemplate rules: generated from the operator's own sets ---------


def test_the_env_rules_repeat_the_names_the_operator_renders() -> None:
    variant_env = endpoint_validate.variant_operator_env
    assert variant_env(False) == cel_rules.SERVER_OPERATOR_ENV
    assert variant_env(True) - variant_env(False) == cel_rules.ASYNC_WORKER_OPERATOR_ENV
    assert plan_steps.IMAGE_STEP_ENV == cel_rules.IMAGE_STEP_OPERATOR_ENV
    assert transform_plan.BATCH_ENV | transform_plan.SAGEMAKER_ENV == cel_rules.BATCH_OPERATOR_ENV
    assert transform_plan.SAGEMAKER_ENV == cel_rules.BATCH_IMAGE_STEP_OPERATOR_ENV
    assert compile_plan.COMPILER_OPERATOR_ENV == cel_rules.COMPILER_OPERATOR_ENV


#: Every name a rule or the policy lists, and names that only look like them.
ENV_NAMES = sorted(
    cel_rules.SERVER_OPERATOR_ENV | cel_rules.ASYNC_WORKER_OPERATOR_ENV
    | cel_rules.BATCH_OPERATOR_ENV | cel_rules.COMPILER_OPERATOR_ENV
    | env_policy.OPERATOR_SETTINGS_ENV | env_policy.INTERPRETER_ENV | env_policy.COMPILER_ENV
    | {"LD_PRELOAD", "LD_", "LD", "ld_preload", "SAGEMAKER_BATCH_SIZE", "SAGEMAKER_BATCHING",
       "KUBEINFER_WORKERS", "KUBEINFER_INTRA_OP_THREADS", "OMP_NUM_THREADS", "PYTHONUNBUFFERED",
       "HOME", "PATH_INFO"})
_BATCH = {n for n in ENV_NAMES if n.startswith(cel_rules.BATCH_OPERATOR_PREFIXES)}

#: (container, the rules' reasons, what the operator renders there, its refusal's flags)
ENV_CONTEXTS: list[tuple[str, tuple[cel_rules.EnvRefusal, ...], frozenset[str], bool, bool]] = [
    ("model server", cel_rules.SERVER_ENV_REFUSALS, endpoint_validate.variant_operator_env(False),
     True, False),
    ("image step", cel_rules.IMAGE_STEP_ENV_REFUSALS, frozenset(plan_steps.IMAGE_STEP_ENV),
     False, False),
    ("batch worker", cel_rules.BATCH_ENV_REFUSALS,
     transform_plan.BATCH_ENV | transform_plan.SAGEMAKER_ENV | _BATCH, True, False),
    ("batch image", cel_rules.BATCH_ENV_REFUSALS[:1],
     transform_plan.BATCH_ENV | transform_plan.SAGEMAKER_ENV | _BATCH, False, False),
    ("batch image step", cel_rules.BATCH_IMAGE_STEP_ENV_REFUSALS,
     frozenset(transform_plan.SAGEMAKER_ENV), False, False),
    ("compiler", cel_rules.COMPILER_ENV_REFUSALS, compile_plan.COMPILER_OPERATOR_ENV, True, True),
]


@pytest.mark.parametrize(("refusals", "operator_env", "kubeinfer_image", "compiler"),
                         [c[1:] for c in ENV_CONTEXTS], ids=[c[0] for c in ENV_CONTEXTS])
def test_the_env_rules_refuse_each_name_as_the_policy_does(
        refusals: tuple[cel_rules.EnvRefusal, ...], operator_env: frozenset[str],
        kubeinfer_image: bool, compiler: bool) -> None:
    """Each name: refused by one rule, with the policy's message, or by none, as the policy
    (the rules' CEL is run on every reason by the table above)."""
    for name in ENV_NAMES:
        why = env_policy.refusal(name, operator_env, kubeinfer_image=kubeinfer_image,
                                 compiler=compiler)
        rules = [r for r in refusals if r.matches(name)]
        assert len(rules) <= 1, (name, rules)
        assert [f"{name} {r.message}" for r in rules] == ([why] if why else []), name


def test_an_async_endpoints_rules_refuse_what_its_workers_policy_does() -> None:
    """The same names (the two the operator renders into a worker that are also its own
    settings, KUBEINFER_OUTBOUND_ALLOW and KUBEINFER_REDIS_URL, with the settings' message)."""
    for name in ENV_NAMES:
        why = env_policy.refusal(name, endpoint_validate.variant_operator_env(True))
        refused = (name in cel_rules.ASYNC_WORKER_ONLY_ENV
                   or any(r.matches(name) for r in cel_rules.SERVER_ENV_REFUSALS))
        assert refused == (why is not None), name


def _literals(rules: list[dict[str, str]]) -> tuple[set[str], set[str]]:
    """The names in the list literals of ``rules``, and the prefixes they test."""
    text = " ".join(r["rule"] for r in rules)
    names = {n for literal in re.findall(r"\[('[^\]]*')\]", text)
             for n in re.findall(r"'([^']*)'", literal)}
    return names, set(re.findall(r"startsWith\('([^']*)'\)", text))


def _rules_at(kind: str, at: str, field_path: str | None = None) -> list[dict[str, str]]:
    rules: list[dict[str, str]] = cel_rules._node(_root(kind), at).get(
        "x-kubernetes-validations", [])
    return [r for r in rules if field_path is None or r.get("fieldPath") == field_path]


def test_the_crds_list_literals_are_the_policys_sets() -> None:
    """What the generated CRDs list equals the operator's constants, read at their source."""
    policy = (env_policy.OPERATOR_SETTINGS_ENV | env_policy.INTERPRETER_ENV
              | env_policy.RESOLVER_ENV)
    server = endpoint_validate.variant_operator_env(False)
    for fleet in ("variants", "shadowVariants"):
        assert _literals(_rules_at("Endpoint", f"spec.{fleet}[].env[]")) == (
            set(server | policy), set(env_policy.INTERPRETER_PREFIXES))
        assert _literals(_rules_at("Endpoint", f"spec.{fleet}[].containers[].env[]")) == (
            set(plan_steps.IMAGE_STEP_ENV), set())
    asynchronous = [r for r in _rules_at("Endpoint", "spec") if "v.env" in r["rule"]]
    assert _literals(asynchronous)[0] | server | policy == (
        endpoint_validate.variant_operator_env(True) | policy)
    assert _literals(_rules_at("TransformJob", "spec", ".environment")) == (
        set(transform_plan.BATCH_ENV | transform_plan.SAGEMAKER_ENV | policy),
        {"SAGEMAKER_BATCH", *env_policy.INTERPRETER_PREFIXES})
    assert _literals(_rules_at("TransformJob", "spec.containers[].env[]")) == (
        set(transform_plan.SAGEMAKER_ENV), set())
    assert _literals(_rules_at("CompilationJob", "spec", ".environment")) == (
        set(compile_plan.COMPILER_OPERATOR_ENV | policy | env_policy.COMPILER_ENV),
        set(env_policy.INTERPRETER_PREFIXES))
    template = "spec.podTemplate"
    assert _literals(_rules_at("TransformJob", f"{template}.tolerations[]"))[0] == set(
        placement.CONTROL_PLANE_TAINTS)
    assert _literals(_rules_at("TransformJob", f"{template}.priorityClassName"))[1] == {
        placement.SYSTEM_PRIORITY_PREFIX}
    for keys in ("labels", "annotations"):
        rules = _rules_at("TransformJob", f"{template}.{keys}")
        assert _literals(rules)[1] == {*placement.RESERVED_PREFIXES,
                                       *placement.CONFINEMENT_PREFIXES}
        assert all(re.escape(d).replace("\\", "\\\\") in " ".join(r["rule"] for r in rules)
                   for d in placement.MESH_DOMAINS)


def test_a_reason_leaves_what_an_earlier_reason_refuses_to_it() -> None:
    """A prefix that also matches a name an earlier reason refuses leaves it to that one (not
    the case of today's sets: the CEL of the exception is checked here)."""
    ours, _, loader, _ = cel_rules.env_refusals(frozenset({"LD_OURS"}))
    assert ours.names == {"LD_OURS"} and loader.unless == {"LD_OURS"}
    program = _program(f"!({loader.refuses('self.name')})")
    for name, refused in (("LD_OURS", False), ("LD_PRELOAD", True), ("PATH", True),
                          ("HOME", False)):
        assert bool(program.evaluate({"self": celpy.json_to_cel({"name": name})})) != refused


def test_every_env_and_pod_template_carries_the_policys_rules() -> None:
    """A new env list, environment map or podTemplate in any kind gets the rules too."""
    for kind in CRDS:
        for _, schema, _, at in _schema_nodes(_root(kind), ""):
            props = schema.get("properties", {})
            if "podTemplate" in props:
                for field in ("tolerations[]", "priorityClassName", "labels", "annotations"):
                    assert _rules_at(kind, f"{at}.podTemplate.{field}"), (kind, at, field)
            env = props.get("env", {})
            if env.get("type") == "array" and "name" in env["items"].get("properties", {}):
                assert _rules_at(kind, f"{at}.env[]"), (kind, at)
            if "environment" in props:
                assert _rules_at(kind, at, ".environment"), (kind, at)


# -- every rule compiles as the API server compiles it -------------------------------------------

_MACRO_VARIABLE = re.compile(r"\.(?:all|exists|exists_one|filter|map)\(\s*([A-Za-z_]\w*)\s*,")


def _rules(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            yield rule["rule"]
        for value in schema.values():
            yield from _rules(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _rules(value)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_rule_names_only_self_and_its_own_variables(kind: str) -> None:
    """The API server type-checks each rule when the CRD is applied and refuses the whole
    CRD for one undeclared name; cel-python only fails on evaluating it, and a branch no
    test takes (a default for a required field once rendered ``PydanticUndefined``) never
    is. So every variable a rule names must be ``self``, ``oldSelf`` or a macro's own."""
    rules = list(_rules(_root(kind)))
    assert rules
    for rule in rules:
        tree = ENV.compile(rule)
        named = {str(node.children[0]) for node in tree.find_data("ident")}
        allowed = {"self", "oldSelf", *_MACRO_VARIABLE.findall(rule)}
        assert named <= allowed, (kind, rule, named - allowed)
