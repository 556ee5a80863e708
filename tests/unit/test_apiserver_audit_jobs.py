"""Every Job the operator renders, held to the API server's Job rules.

kubernetes-validate checks the OpenAPI schema only, which says nothing of these
rules of Kubernetes' pkg/apis/batch/validation (``validateJobSpec``,
``validatePodFailurePolicy``, ``validatePodFailurePolicyRuleOnExitCodes``):

* a podFailurePolicy needs ``restartPolicy: Never``, has at most 20 rules, each with
  exactly one of onExitCodes and onPodConditions;
* onExitCodes: operator In or NotIn, 1 to 255 values, unique and in ascending order
  ("must be ordered"), no 0 with In, a containerName naming a container or init
  container of the template;
* action FailIndex only with backoffLimitPerIndex (which needs completionMode
  Indexed), maxFailedIndexes at most completions;
* the Job's name becomes the pods' ``batch.kubernetes.io/job-name`` label value: at
  most 63 characters.

The RecommendationJob's Job listed its exit codes as [42, 3]: refused, for every
RecommendationJob.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubeinfer_operator.render import recommend_jobs as rjobs
from kubeinfer_operator.render.transform_names import Step
from kubeinfer_operator.settings import OperatorSettings
from tests.unit import test_compile_render as compile_t
from tests.unit import test_edge_render as edge_t
from tests.unit import test_recommend_job as recommend_t
from tests.unit import test_transform_render as transform_t

SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1",
                            compiler_image="example.test/compiler:1")


def job_problems(job: dict[str, Any]) -> list[str]:
    """What the API server's Job validation would say of ``job`` (the rules above)."""
    problems: list[str] = []
    spec = job["spec"]
    pod = spec["template"]["spec"]
    if len(job["metadata"]["name"]) > 63:
        problems.append("metadata.name: the job-name label value passes 63 characters")
    policy = spec.get("podFailurePolicy")
    if policy is None:
        return problems
    if pod.get("restartPolicy") != "Never":
        problems.append("template.spec.restartPolicy must be Never with a podFailurePolicy")
    names = {c["name"] for c in [*pod.get("containers", []), *pod.get("initContainers", [])]}
    rules = policy["rules"]
    if len(rules) > 20:
        problems.append("podFailurePolicy.rules: more than 20")
    for i, rule in enumerate(rules):
        where = f"podFailurePolicy.rules[{i}]"
        if ("onExitCodes" in rule) == ("onPodConditions" in rule):
            problems.append(f"{where}: exactly one of onExitCodes and onPodConditions")
        if rule["action"] == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            problems.append(f"{where}.action: FailIndex needs backoffLimitPerIndex")
        codes = rule.get("onExitCodes")
        if codes is None:
            continue
        values = codes["values"]
        if codes["operator"] not in ("In", "NotIn"):
            problems.append(f"{where}.onExitCodes.operator")
        if not 1 <= len(values) <= 255:
            problems.append(f"{where}.onExitCodes.values: 1 to 255")
        if len(set(values)) != len(values):
            problems.append(f"{where}.onExitCodes.values: duplicates")
        if values != sorted(values):
            problems.append(f"{where}.onExitCodes.values: must be ordered")
        if codes["operator"] == "In" and 0 in values:
            problems.append(f"{where}.onExitCodes.values: 0 with In")
        if "containerName" in codes and codes["containerName"] not in names:
            problems.append(f"{where}.onExitCodes.containerName: no such container")
    if spec.get("backoffLimitPerIndex") is not None and spec.get("completionMode") != "Indexed":
        problems.append("backoffLimitPerIndex needs completionMode Indexed")
    if spec.get("maxFailedIndexes", 0) > spec.get("completions", 1):
        problems.append("maxFailedIndexes passes completions")
    return problems


def every_job() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    recommend = recommend_t.planned(recommend_t.doc())
    out.append(("recommend", rjobs.render_job(recommend, uid="u", settings=SETTINGS)))
    out.append(("compile", compile_t.rendered(compile_t.planned(compile_t.doc()))))
    for name, plan in (("transform", transform_t.planned(transform_t.doc())),
                       ("transform-no-failures", transform_t.planned(transform_t.doc(
                           errorPolicy={"maxFailedRecords": 0})))):
        for step, job in transform_t.jobs(plan).items():
            out.append((f"{name}-{step.value}", job))
    images = transform_t.planned(transform_t.doc(model=None, containers=[
        {"name": "img", "image": "example.com/m:1"}]))
    out.append(("transform-image-work", transform_t.jobs(images)[Step.WORK]))
    out += [(f"edge-{m['metadata']['name']}", m)
            for m in edge_t.objects(edge_t.planned(edge_t.doc())) if m["kind"] == "Job"]
    return out


JOBS = every_job()


@pytest.mark.parametrize(("name", "job"), JOBS, ids=[n for n, _ in JOBS])
def test_every_rendered_job_passes_the_api_servers_job_rules(name: str,
                                                            job: dict[str, Any]) -> None:
    assert job_problems(job) == []


def test_the_recommendation_jobs_exit_codes_are_in_ascending_order() -> None:
    job = rjobs.render_job(recommend_t.planned(recommend_t.doc()), uid="u", settings=SETTINGS)
    codes = job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]
    assert codes == sorted(codes) and len(set(codes)) == len(codes) == 2
