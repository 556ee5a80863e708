"""Pod fields a real API server would refuse, for specs the operator's models accepted.

Each test restates one rule of Kubernetes' own validation (1.29-1.33) and holds
the operator's validation to it: whatever ``validate_endpoint`` (or a job's
validation, or ``PodTemplate``) accepts must pass the rule, since the operator
renders it into a pod as written. Neither kubernetes-validate (OpenAPI schema
only) nor the test emulator applies these rules.

* env var names (apimachinery ``IsEnvVarName``, strict until
  RelaxedEnvironmentVariableValidation: 1.29-1.31): not '.', '..' nor '..'-prefixed;
* tolerations (core ``ValidateTolerations``): an Equal value is a label value,
  ``tolerationSeconds`` only with effect NoExecute;
* topology spread constraints (``ValidateTopologySpreadConstraints``): a qualified
  topologyKey, minDomains >= 1 and only with DoNotSchedule, no repeated
  (topologyKey, whenUnsatisfiable), Honor/Ignore policies;
* pod annotations (``ValidateAnnotationsSize``): 256 KiB counted in bytes;
* pod template labels the Job and Deployment controllers set (``job-name``,
  ``controller-uid``, ``batch.kubernetes.io/*``: batch ``ValidateGeneratedSelector``
  refuses the Job; ``pod-template-hash`` is replaced);
* container resources (``validateContainerResourceName``,
  ``ValidateResourceRequirements``): known names, no negative quantity, extended
  resources whole and never overcommitted (the limit set, equal to the request).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubeinfer_operator.api.placement import PodTemplate
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile.compile_validate import validate_compilation_job
from kubeinfer_operator.reconcile.transform_validate import validate_transform_job
from kubeinfer_operator.reconcile.validate import validate_endpoint
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.render.transform_jobs import render_job
from kubeinfer_operator.render.transform_names import Step
from kubeinfer_operator.render.transform_plan import own_model, plan_transform
from kubeinfer_operator.settings import OperatorSettings

_ENV = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def api_env_name_ok(name: str) -> bool:
    return bool(_ENV.match(name)) and name not in (".", "..") and not name.startswith("..")


def endpoint_accepts(**variant: Any) -> bool:
    spec = {"variants": [{"name": "a", "model": {"uri": "s3://m/a.onnx"}, **variant}]}
    try:
        validate_endpoint("iris", "ml", spec)
    except SpecError:
        return False
    return True


ENV_NAMES = [".", "..", "..a", "../x", ".a", "a..b", "_X", "-x", "MY.NAME", "1A", "a=b"]


@pytest.mark.parametrize("name", ENV_NAMES)
def test_an_env_name_every_kind_accepts_is_one_the_api_server_accepts(name: str) -> None:
    transform = {"model": {"uri": "s3://m/a.onnx"},
                 "input": {"uri": "s3://d/in/", "contentType": "text/csv"},
                 "output": {"uri": "s3://d/out/"}, "environment": {name: "1"}}
    compile_spec = {"model": {"uri": "s3://m/a.onnx"}, "target": "native",
                    "output": {"uri": "s3://c/"}, "environment": {name: "1"}}
    accepted = {"Endpoint": endpoint_accepts(env=[{"name": name, "value": "1"}])}
    for kind, check, spec in (("TransformJob", validate_transform_job, transform),
                              ("CompilationJob", validate_compilation_job, compile_spec)):
        try:
            check("job", "ml", spec)
            accepted[kind] = True
        except SpecError:
            accepted[kind] = False
    assert accepted == dict.fromkeys(accepted, api_env_name_ok(name)), accepted


def test_a_dot_dot_env_name_no_longer_reaches_the_rendered_deployment() -> None:
    spec = {"variants": [{"name": "a", "model": {"uri": "s3://m/a.onnx"},
                          "env": [{"name": "..", "value": "x"}]}]}
    with pytest.raises(SpecError, match=r"spec\.variants\[0\]\.env\[0\]\.name"):
        validate_endpoint("iris", "ml", spec)
    # What was rendered before: every env name of the Deployment passes the API's rule.
    spec["variants"][0]["env"] = [{"name": ".x", "value": "1"}]
    ep = validate_endpoint("iris", "ml", spec)
    for m in render_endpoint(plan_endpoint(ep), Owner("iris", "ml", "u"), OperatorSettings()):
        for c in m.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert all(api_env_name_ok(e["name"]) for e in c.get("env", [])), c["env"]


def template_accepted(template: dict[str, Any]) -> bool:
    try:
        PodTemplate.model_validate(template)
    except ValueError:
        return False
    return True


def api_toleration_ok(t: dict[str, Any]) -> bool:
    op = t.get("operator", "")
    if not t.get("key") and op != "Exists":
        return False
    if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
        return False
    if op in ("", "Equal"):
        return isinstance(t.get("value", ""), str) and len(t.get("value", "")) <= 63 \
            and bool(_LABEL_VALUE.match(t.get("value", "")))
    return not t.get("value")


TOLERATIONS = [
    {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},
    {"key": "gpu", "operator": "Equal", "value": "a b", "effect": "NoSchedule"},
    {"key": "gpu", "value": "x" * 64},
    {"key": "gpu", "value": "-lead"},
    {"key": "gpu", "value": 5},
    {"key": "gpu", "operator": "Exists", "tolerationSeconds": 30},
    {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30},
    {"key": "gpu", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
]


@pytest.mark.parametrize("toleration", TOLERATIONS)
def test_a_toleration_the_model_accepts_is_one_the_api_server_accepts(
        toleration: dict[str, Any]) -> None:
    assert template_accepted({"tolerations": [toleration]}) == api_toleration_ok(toleration)


def api_spread_ok(items: list[dict[str, Any]]) -> bool:
    pairs = [(c["topologyKey"], c["whenUnsatisfiable"]) for c in items]
    if len(set(pairs)) != len(pairs):
        return False
    for c in items:
        if not _QUALIFIED.match(c["topologyKey"]):
            return False
        if "minDomains" in c and (c["minDomains"] < 1
                                  or c["whenUnsatisfiable"] != "DoNotSchedule"):
            return False
        if any(c.get(p, "Honor") not in ("Honor", "Ignore")
               for p in ("nodeAffinityPolicy", "nodeTaintsPolicy")):
            return False
    return True


ZONE = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "DoNotSchedule"}
SPREADS = [
    [ZONE],
    [{**ZONE, "topologyKey": "zone name"}],
    [{**ZONE, "topologyKey": "-zone"}],
    [{**ZONE, "minDomains": 0}],
    [{**ZONE, "minDomains": 2}],
    [{**ZONE, "minDomains": 2, "whenUnsatisfiable": "ScheduleAnyway"}],
    [ZONE, {**ZONE, "maxSkew": 2}],
    [ZONE, {**ZONE, "whenUnsatisfiable": "ScheduleAnyway"}],
    [{**ZONE, "nodeTaintsPolicy": "Always"}],
]


@pytest.mark.parametrize("spread", SPREADS)
def test_spread_constraints_the_model_accepts_are_ones_the_api_server_accepts(
        spread: list[dict[str, Any]]) -> None:
    assert template_accepted({"topologySpreadConstraints": spread}) == api_spread_ok(spread)


def test_pod_annotations_are_bounded_in_bytes_as_the_api_server_counts_them() -> None:
    # 100,000 characters of 'é' are 200,000 bytes: two such values pass 256 KiB.
    big = {"example.com/a": "é" * 100_000, "example.com/b": "é" * 100_000}
    assert sum(len(k.encode()) + len(v.encode()) for k, v in big.items()) > 256 * 1024
    assert not template_accepted({"annotations": big})
    assert template_accepted({"annotations": {"example.com/a": "x" * 200_000}})


def api_resources_ok(requests: dict[str, str], limits: dict[str, str]) -> bool:
    for name, value in [*requests.items(), *limits.items()]:
        if value.startswith("-"):
            return False
        if "/" not in name and name not in ("cpu", "memory", "ephemeral-storage") \
                and not name.startswith("hugepages-"):
            return False
        if "/" in name and not value.isdigit():
            return False
    for name, value in requests.items():
        if ("/" in name or name.startswith("hugepages-")) and limits.get(name) != value:
            return False
    return True


RESOURCES = [
    ({"cpu": "500m", "memory": "1Gi"}, {"memory": "2Gi"}),
    ({"cpu": "-1"}, {}),
    ({}, {"memory": "-1Gi"}),
    ({"gpu": "1"}, {}),
    ({"nvidia.com/gpu": "1"}, {}),
    ({}, {"nvidia.com/gpu": "1"}),
    ({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"}),
    ({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "2"}),
    ({}, {"nvidia.com/gpu": "0.5"}),
    ({"hugepages-2Mi": "64Mi"}, {}),
    ({"hugepages-2Mi": "64Mi"}, {"hugepages-2Mi": "64Mi"}),
]


@pytest.mark.parametrize(("requests", "limits"), RESOURCES)
def test_resources_the_operator_accepts_are_ones_the_api_server_accepts(
        requests: dict[str, str], limits: dict[str, str]) -> None:
    accepted = endpoint_accepts(resources={"requests": requests, "limits": limits})
    assert accepted == api_resources_ok(requests, limits)


@pytest.mark.parametrize("key", ["job-name", "controller-uid", "batch.kubernetes.io/job-name",
                                 "batch.kubernetes.io/controller-uid", "pod-template-hash"])
def test_a_template_label_a_controller_sets_is_refused(key: str) -> None:
    """The API server generates a Job's selector from ``job-name``/``controller-uid`` (and
    their batch.kubernetes.io/ twins) and refuses a template that sets one to anything else
    (``ValidateGeneratedSelector``); the Deployment controller replaces pod-template-hash."""
    spec = {"model": {"uri": "s3://m/a.onnx"},
            "input": {"uri": "s3://d/in/", "contentType": "text/csv"},
            "output": {"uri": "s3://d/out/"}, "podTemplate": {"labels": {key: "mine"}}}
    with pytest.raises(SpecError, match=r"spec\.podTemplate\.labels"):
        validate_transform_job("score", "ml", spec)
    assert not template_accepted({"labels": {key: "mine"}})


def test_every_job_template_label_leaves_the_generated_selector_matching() -> None:
    spec = {"model": {"uri": "s3://m/a.onnx"},
            "input": {"uri": "s3://d/in/", "contentType": "text/csv"},
            "output": {"uri": "s3://d/out/"},
            "podTemplate": {"labels": {"example.com/team": "ml", "job-owner": "ml"}}}
    job = validate_transform_job("score", "ml", spec)
    model = own_model(job.spec)
    assert model is not None
    plan = plan_transform(job, model)
    for step in Step:
        rendered = render_job(plan, step, namespace="ml", uid="u", settings=OperatorSettings(),
                              shards=3)
        labels = rendered["spec"]["template"]["metadata"]["labels"]
        assert not {"job-name", "controller-uid"} & set(labels)
        assert not [k for k in labels if k.startswith("batch.kubernetes.io/")]


@pytest.mark.parametrize("image", [" example.com/m:1", "example.com/m:1 ", "example.com/m :1"])
def test_an_image_with_whitespace_is_refused_before_its_pods_are(image: str) -> None:
    """Pod creation (``validateContainersOnlyForPod``) refuses an image with leading or
    trailing whitespace; a Deployment or Job template with one is stored, and its
    controller then fails to create every pod (FailedCreate)."""
    step = {"name": "img", "image": image}
    assert not endpoint_accepts(model=None, containers=[step])
    spec = {"containers": [step], "input": {"uri": "s3://d/in/", "contentType": "text/csv"},
            "output": {"uri": "s3://d/out/"}}
    with pytest.raises(SpecError, match="image"):
        validate_transform_job("score", "ml", spec)
    assert endpoint_accepts(model=None, containers=[{**step, "image": "example.com/m:1"}])
